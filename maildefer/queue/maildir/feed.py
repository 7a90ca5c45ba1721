"""The claims of a maildir queue as they arrive: inotify hints, scans and timers.

:class:`MaildirFeed` turns a :class:`~maildefer.queue.maildir.MaildirQueue` (anything
that is a :class:`FeedSource`) into an async iterator of
:class:`~maildefer.queue.backend.Claim`. It claims a message only when its
consumer asks for the next one, so a worker with no free handler slot reads nothing
(pull-based backpressure).

Where the candidate names come from (watchfiles' pitfalls, docs/reliability.md R16-R19):

- **inotify through watchfiles** ``awatch`` on ``new/`` and ``later/``, with ``step`` and
  ``debounce`` of a few milliseconds (its defaults, 50 ms and 1.6 s, suit a code reloader,
  not a queue), ``watch_filter=None`` (its default filter drops names ending in ``~`` or
  ``.swp``) and ``recursive=False``. Events are hints: an ``added`` name in ``new/``
  becomes a candidate; an ``added`` name in ``later/`` only moves the retry timer to its
  due time (read from its ``,T=`` field, no listing).
- **scans** of ``new/`` with ``scandir``, read one batch at a time and only when the
  candidates run out, so a drain of 100k queued files holds one batch of names, never the
  whole listing, and costs O(1) per message. The watcher is armed *before* the first scan,
  so a file landing in between is seen by one or the other.
- **timers**: a rescan every ``rescan_interval`` (watchfiles silently drops inotify's
  overflow event, so a burst can go unseen), with dead workers' claims recovered at the
  same time; ``promote_due`` when the earliest retry in ``later/`` is due. With
  ``shared_fs = true`` no watcher runs (inotify cannot see other hosts' writes) and
  ``new/`` is listed every ``poll_interval`` instead.

A watcher that raises is logged and rebuilt after a short, growing pause, and ``new/`` is
rescanned, so a broken watcher degrades to polling at the rescan interval, never a crash
loop. The watcher is also rebuilt when ``new/`` has been replaced by another directory.

Claims happen in the event loop's thread on a local disk: a claim is a ``rename`` and a
read of a small file from the page cache, cheaper than the thread hop that would carry
it (bench/bench_worker.py measures both). On a shared filesystem, where one syscall can
stall, each claim takes one executor hop, rename and read together.

Example:
    >>> import asyncio, tempfile
    >>> from maildefer.queue.maildir import MaildirQueue
    >>> async def demo():
    ...     q = MaildirQueue(tempfile.mkdtemp())
    ...     await q.push(b"Subject: hi\\n\\n")
    ...     return [c.message["Subject"] async for c in MaildirFeed(q, burst=True).claims()]
    >>> asyncio.run(demo())
    ['hi']
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Protocol

import structlog
from watchfiles import Change, awatch

from maildefer.errors import QueueError
from maildefer.queue.backend import Claim, QueueOptions, RecoveryReport
from maildefer.queue.maildir.names import MaildirName

WatchFactory = Callable[..., AsyncIterator[set[tuple[Change, str]]]]
"""Anything called like ``watchfiles.awatch`` (the seam tests use to lose events)."""


class FeedSource(Protocol):
    """What a feed needs of its queue (:class:`~maildefer.queue.maildir.MaildirQueue`).

    A Protocol rather than the class: the queue module builds its feeds, so this one
    must not import it back.
    """

    options: QueueOptions
    url: str

    def dir(self, name: str) -> Path:
        """A subdirectory of the queue (``new``, ``later``)."""
        ...

    def ensure(self) -> None:
        """Create the queue's directories where missing."""
        ...

    def scan_new(self, batch: int = ...) -> Iterator[list[str]]:
        """The file names in ``new/``, in batches."""
        ...

    def claim_sync(self, filename: str) -> Claim | None:
        """Claim one file of ``new/`` (``None``: lost the race, or corrupt); blocking."""
        ...

    async def release(self, claim: Claim) -> None:
        """Give a claim back to ``new/`` unhandled."""
        ...

    def promote_due(self, now: float | None = ...) -> tuple[int, float | None]:
        """Move due retries to ``new/``: how many, and seconds until the next is due."""
        ...

    def recover_sync(self, now: float | None = ...) -> RecoveryReport:
        """Return dead workers' claims, clean ``tmp/``, promote due retries; blocking."""
        ...


STEP_MS = 1
"""Quiet time after an event before watchfiles hands a batch over (its default: 50)."""

DEBOUNCE_MS = 20
"""Longest a batch is held while events keep coming (its default: 1600)."""

RUST_TIMEOUT_MS = 5_000
"""How long the watcher thread waits before it reports a timeout and is called again."""

SCAN_BATCH = 1024
"""Names read per ``scandir`` step: one batch in memory, however long ``new/`` is."""

WATCHER_RETRY_MAX = 5.0
"""Longest pause before rebuilding a watcher that keeps failing."""


class MaildirFeed:
    """Claims from a maildir queue, one each time the consumer asks.

    Args:
        queue: the maildir queue (its options give ``rescan_interval``, ``shared_fs``
            and ``poll_interval``).
        burst: drain what is there and stop: messages in ``new/`` and retries already
            due, pass after pass until a pass finds nothing; no watcher, and retries due
            later stay in ``later/``.
        watch: the watcher factory (``watchfiles.awatch``).
        step_ms: watchfiles ``step``.
        debounce_ms: watchfiles ``debounce``.
        scan_batch: names per ``scandir`` batch.
        claim_in_thread: claim through the executor (default: on a shared filesystem).
        ready: the event to set once the feed is live (see :attr:`ready`); a new one by
            default.

    Attributes:
        ready: set once the watcher is armed (when there is one) and the first batch of
            the first scan of ``new/`` is in: from then on a file landing in ``new/`` is
            picked up without waiting for a rescan. The worker's ``READY=1`` waits for it.

    Example:
        >>> import asyncio, tempfile
        >>> from maildefer.queue.maildir import MaildirQueue
        >>> async def first_claim():
        ...     q = MaildirQueue(tempfile.mkdtemp())
        ...     feed = MaildirFeed(q)
        ...     claims = feed.claims()
        ...     waiting = asyncio.ensure_future(anext(claims))  # arms the watcher, waits
        ...     await feed.ready.wait()
        ...     key = await q.push(b"Subject: late\\n\\n")  # seen by inotify, not a scan
        ...     claim = await waiting
        ...     await q.ack(claim); await claims.aclose()
        ...     return claim.key == key, claim.message["Subject"]
        >>> asyncio.run(first_claim())
        (True, 'late')
    """

    def __init__(
        self,
        queue: FeedSource,
        *,
        burst: bool = False,
        watch: WatchFactory = awatch,
        step_ms: int = STEP_MS,
        debounce_ms: int = DEBOUNCE_MS,
        scan_batch: int = SCAN_BATCH,
        claim_in_thread: bool | None = None,
        ready: asyncio.Event | None = None,
    ) -> None:
        self.queue = queue
        self.ready = asyncio.Event() if ready is None else ready
        self.burst = burst
        self._watch = watch
        self._step_ms = step_ms
        self._debounce_ms = debounce_ms
        self._scan_batch = scan_batch
        opts = queue.options
        self._polling = opts.shared_fs
        self._in_thread = opts.shared_fs if claim_in_thread is None else claim_in_thread
        self._scan_every = opts.poll_interval if opts.shared_fs else opts.rescan_interval
        self._maintain_every = opts.rescan_interval
        # Candidates: names in arrival order, and the same names as a set to merge the
        # duplicates that events and scans produce.
        self._pending: deque[str] = deque()
        self._queued: set[str] = set()
        self._wake = asyncio.Event()
        self._armed = asyncio.Event()
        self._scan: Iterator[list[str]] | None = None
        self._scan_at = 0.0
        self._maintain_at = 0.0
        self._due_at: float | None = None
        self._pass_claims = 0
        self._since_batch = 0
        self._watched_inode: int | None = None
        self._random = random.Random()
        self._watcher: asyncio.Task[None] | None = None
        self._log = structlog.get_logger("maildefer.queue")
        self.scans = 0
        self.watcher_restarts = 0

    # -- candidates --------------------------------------------------------------------

    def _offer(self, name: str) -> None:
        if name not in self._queued:
            self._queued.add(name)
            self._pending.append(name)

    def _on_changes(self, changes: set[tuple[Change, str]]) -> None:
        new_dir = str(self.queue.dir("new"))
        for change, path in sorted(changes, key=lambda c: c[1]):
            if change == Change.deleted:
                continue  # our own claims and acks, mostly
            folder, _, name = path.rpartition(os.sep)
            if not name or name.startswith("."):
                continue  # maildir readers skip dot-files
            if folder == new_dir:
                self._offer(name)
            else:
                self._retry_due_in((MaildirName.parse(name).due_ms / 1000) - time.time())
        self._wake.set()

    def _retry_due_in(self, seconds: float | None) -> None:
        if seconds is None:
            return
        due = time.monotonic() + max(seconds, 0.0)
        if self._due_at is None or due < self._due_at:
            self._due_at = due

    # -- the iterator --------------------------------------------------------------------

    async def claims(self) -> AsyncIterator[Claim]:
        """Claims, each made when the consumer asks for it; waits when there are none.

        In burst mode the iterator ends when a full pass over ``new/`` claims nothing.
        Cancelling the consumer while it waits here loses nothing: a claim caught in
        flight is given back.

        Example:
            >>> import asyncio, tempfile
            >>> from maildefer.queue.maildir import MaildirQueue
            >>> q = MaildirQueue(tempfile.mkdtemp())
            >>> async def demo():
            ...     return [c async for c in MaildirFeed(q, burst=True).claims()]
            >>> asyncio.run(demo())
            []
        """
        loop = asyncio.get_running_loop()
        # Burst mode: the worker recovered at start; no periodic maintenance.
        self._maintain_at = math.inf if self.burst else time.monotonic() + self._maintain_every
        try:
            if not self.burst:
                if not self._polling:
                    self._start_watcher()
                    await self._armed.wait()
                _, due = await loop.run_in_executor(None, self.queue.promote_due)
                self._retry_due_in(due)
            self._begin_scan()
            while True:
                name = await self._next_name()
                if name is None:
                    return
                claim = await self._claim(name)
                if claim is not None:
                    self._pass_claims += 1
                    yield claim
        finally:
            await self._stop_watcher()
            self._end_scan()

    async def _next_name(self) -> str | None:
        """The next candidate name; refills from scans and timers, or waits for events.

        The timers are checked on every call, not only when idle, so a queue under
        sustained load still rescans, recovers and promotes; and an active scan gets a
        batch in at least every ``scan_batch`` names, so files that arrived while no
        event was seen are not starved by a steady stream of newer ones.
        """
        loop = asyncio.get_running_loop()
        while True:
            now = time.monotonic()
            if now >= self._maintain_at:
                await self._maintain()
                continue
            if self._due_at is not None and now >= self._due_at:
                await self._promote()
                continue
            if self._scan is None and now >= self._scan_at and not self.burst:
                self._begin_scan()
            if self._scan is not None and (
                not self._pending or self._since_batch >= self._scan_batch
            ):
                self._since_batch = 0
                batch = await loop.run_in_executor(None, self._next_batch)
                # Live once the first batch is in, not once the whole first scan is: a
                # backlog of 100k files is read batch by batch as handler slots free up,
                # and readiness must not wait for the backlog (systemd's start timeout).
                self.ready.set()
                if batch is not None:
                    # Start at a random point of the batch: workers scanning the same
                    # new/ then claim different files instead of racing for the same
                    # ones in the same order (a lost race costs a failed rename).
                    start = self._random.randrange(len(batch)) if batch else 0
                    for name in batch[start:] + batch[:start]:
                        self._offer(name)
                    continue
                self._end_scan()
                continue
            if self._pending:
                self._since_batch += 1
                name = self._pending.popleft()
                self._queued.discard(name)
                return name
            if self.burst:
                # A pass over new/ is over: another one if this one found anything
                # (handlers may have queued more, retries may have come due).
                if not self._pass_claims:
                    return None
                await self._promote()
                self._begin_scan()
                continue
            deadline = min(self._scan_at, self._maintain_at, self._due_at or self._scan_at)
            self._wake.clear()
            try:
                async with asyncio.timeout(max(deadline - now, 0.0)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _claim(self, name: str) -> Claim | None:
        try:
            if not self._in_thread:
                return self.queue.claim_sync(name)
            future = asyncio.get_running_loop().run_in_executor(None, self.queue.claim_sync, name)
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                # The thread finishes the rename anyway: take the claim and give it back.
                claim = await asyncio.shield(future)
                if claim is not None:
                    await self.queue.release(claim)
                raise
        except (OSError, QueueError, ValueError) as exc:
            # One bad file must not stop the queue: it stays where it is (in cur/ if the
            # rename happened, recovered when this worker exits) and the rest flows.
            self._log.error("claim_failed", queue=self.queue.url, file=name, error=str(exc))
            return None

    # -- scans and timers --------------------------------------------------------------

    def _begin_scan(self) -> None:
        self._end_scan()
        self._scan = self.queue.scan_new(self._scan_batch)
        self._scan_at = time.monotonic() + self._scan_every
        self._pass_claims = 0
        self.scans += 1

    def _end_scan(self) -> None:
        if self._scan is not None:
            scan, self._scan = self._scan, None
            close = getattr(scan, "close", None)
            if close is not None:
                close()

    def _next_batch(self) -> list[str] | None:
        scan = self._scan
        if scan is None:
            return None
        try:
            return next(scan, None)
        except OSError as exc:
            self._log.error("scan_failed", queue=self.queue.url, error=str(exc))
            return None

    async def _promote(self) -> None:
        self._due_at = None
        loop = asyncio.get_running_loop()
        try:
            moved, due = await loop.run_in_executor(None, self.queue.promote_due)
        except OSError as exc:
            self._log.error("promote_failed", queue=self.queue.url, error=str(exc))
            self._retry_due_in(self._maintain_every)
            return
        self._retry_due_in(due)
        if moved and (self._polling or self.burst):
            self._begin_scan()  # no watcher sees the renames into new/

    async def _maintain(self) -> None:
        """The safety net: recover dead workers' claims, promote due retries, rescan."""
        self._maintain_at = time.monotonic() + self._maintain_every
        loop = asyncio.get_running_loop()
        try:
            report = await loop.run_in_executor(None, self.queue.recover_sync)
        except OSError as exc:
            self._log.error("recover_failed", queue=self.queue.url, error=str(exc))
        else:
            if report.returned or report.quarantined:
                self._log.warning(
                    "recovered",
                    queue=self.queue.url,
                    returned=report.returned,
                    quarantined=report.quarantined,
                )
        await self._promote()
        if not self._polling and self._watcher_stale():
            self._log.warning("watcher_stale", queue=self.queue.url)
            await self._stop_watcher()
            self._start_watcher()
            await self._armed.wait()
        self._begin_scan()

    # -- the watcher ---------------------------------------------------------------------

    def _new_inode(self) -> int | None:
        try:
            return os.stat(self.queue.dir("new")).st_ino
        except OSError:
            return None

    def _watcher_stale(self) -> bool:
        """Whether ``new/`` is not the directory the watcher was armed on."""
        return (
            self._watcher is None
            or self._watcher.done()
            or (self._new_inode() != self._watched_inode)
        )

    def _start_watcher(self) -> None:
        self.queue.ensure()
        self._armed.clear()
        self._watcher = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _stop_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.wait([watcher])

    async def _watch_loop(self) -> None:
        """Feed events into the candidates; rebuild the watcher when it fails."""
        failures = 0
        paths = (self.queue.dir("new"), self.queue.dir("later"))
        while True:
            self._watched_inode = self._new_inode()
            watcher: AsyncIterator[set[tuple[Change, str]]] | None = None
            first: asyncio.Future[set[tuple[Change, str]]] | None = None
            try:
                watcher = self._watch(
                    *paths,
                    watch_filter=None,
                    recursive=False,
                    step=self._step_ms,
                    debounce=self._debounce_ms,
                    rust_timeout=RUST_TIMEOUT_MS,
                )
                first = asyncio.ensure_future(anext(watcher))
                # The first step of the generator sets up inotify before its first wait;
                # once it has run, a scan cannot miss a file the watcher would not see.
                await asyncio.sleep(0)
                self._armed.set()
                self._scan_at = 0.0
                self._wake.set()
                self._on_changes(await first)
                failures = 0
                async for changes in watcher:
                    self._on_changes(changes)
                error = "watcher stopped"
            except StopAsyncIteration:
                error = "watcher stopped"
            except Exception as exc:  # any watcher failure means: rebuild it
                error = f"{type(exc).__name__}: {exc}"
            finally:
                if first is not None and not first.done():
                    first.cancel()
                    await asyncio.wait([first])
                if watcher is not None:
                    await _close(watcher)
            failures += 1
            pause = min(0.05 * 2**failures, WATCHER_RETRY_MAX)
            self.watcher_restarts += 1
            self._log.warning("watcher_failed", queue=self.queue.url, error=error, restart_in=pause)
            self._armed.set()  # a consumer waiting for the first arming must not hang
            # Until the new watcher is armed, the rescan catches what this one missed.
            self._scan_at = 0.0
            self._wake.set()
            await asyncio.sleep(pause)


async def _close(watcher: AsyncIterator[object]) -> None:
    """Close a watcher generator, whatever state it is in."""
    aclose = getattr(watcher, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:  # it is going away; its failure was logged already
        return
