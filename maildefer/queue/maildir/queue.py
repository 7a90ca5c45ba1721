"""The maildir queue backend: durable push, atomic claim, ack, retry, bury, recover.

Layout of a queue directory (``tmp/ new/ cur/`` make it a real maildir that mutt and
``mailbox.Maildir`` read; ``later/`` and ``errors/`` are maildefer's own)::

    tmp/     files being written; never read by anyone else
    new/     waiting messages: what a worker claims (and where other programs may drop mail)
    cur/     claimed messages, the name saying which worker holds them (,W=host~pid~start)
    later/   messages waiting out a retry backoff (,T=<due ms>)
    errors/  <key>.json: the last error of a retried or buried message

Every state change is a single ``rename`` of one file (its state lives in its name, see
:mod:`maildefer.queue.maildir.names`), so it is atomic and exactly one of two racing workers wins
a claim; the loser gets ``ENOENT``, which means "gone", not an error. Nothing here lists a
directory per message: push, claim and ack are O(1) (``count``, ``keys`` and the other
look-ups of :mod:`.store` may list). Recovery of dead workers' claims is :mod:`.recovery`.

Durability of push (docs/reliability.md R1): the file is written in ``tmp/`` with
``O_EXCL``, fsync'd, ``link``-ed into ``new/`` (never renamed over an existing name), and
``new/`` is fsync'd before ``push`` returns. The directory fsync is shared by every push
that linked before it started (group commit), which is where concurrent pushers gain
over one fsync each, without ever returning before their own link is on disk.

Example:
    >>> import asyncio, tempfile
    >>> async def demo():
    ...     q = MaildirQueue(tempfile.mkdtemp())
    ...     key = await q.push(b"Subject: hi\\n\\nbody\\n")
    ...     return await q.count(), (await q.get(key))["Subject"]
    >>> asyncio.run(demo())
    (1, 'hi')
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import random
import shutil
import socket
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from maildefer.errors import ConfigError, CorruptMessageError, QueueError
from maildefer.mail import MailRequest
from maildefer.queue.backend import BuryReason, Claim, Pushable, QueueOptions, RecoveryReport
from maildefer.queue.envelope import push_parts, request_from_file, wrap_payload
from maildefer.queue.keys import NameGenerator, escape_host, key_time
from maildefer.queue.maildir import recovery
from maildefer.queue.maildir.feed import MaildirFeed, WatchFactory
from maildefer.queue.maildir.names import MaildirName
from maildefer.queue.maildir.store import MaildirStore, read_file
from maildefer.queue.maildir.writer import (
    MaildirWriter,
    SyncMode,
    fsync_dir,
    fsync_file,
    syncfs_available,
    unlink_quietly,
)


def _sync_mode(options: QueueOptions, url: str) -> SyncMode:
    """The writer's sync mode for a queue's ``sync`` option (``auto``: syncfs where safe).

    Example:
        >>> _sync_mode(QueueOptions(sync="fsync"), "q")
        'fsync'
        >>> _sync_mode(QueueOptions(shared_fs=True), "q")
        'fsync'
    """
    if options.sync == "fsync" or (options.sync == "auto" and options.shared_fs):
        return "fsync"
    if syncfs_available():
        return "syncfs"
    if options.sync == "syncfs":
        raise ConfigError(
            f"queue {url}: sync = 'syncfs' needs Linux 5.8 or later (set sync = 'fsync')"
        )
    return "fsync"


class MaildirQueue(MaildirStore):
    """A queue stored as a maildir directory on local (or shared) disk.

    The look-ups and admin operations (``locate``, ``get``, ``count``, ``keys``,
    ``remove``, ``clear``, ``requeue``, ``error_record``) are :class:`MaildirStore`'s.

    Args:
        path: the queue directory; ``tmp/ new/ cur/ later/ errors/`` are created on
            first use.
        options: retry and recovery policy (defaults as in ``[queues.NAME]``).
        undeliverable: the maildir where buried messages go (``undeliverable`` beside
            the queue by default).
        host: this machine's name, in keys and claim owners.
        watch: the watcher factory a worker's feed uses (``watchfiles.awatch`` when
            ``None``); tests pass one that loses events.

    Example:
        >>> q = MaildirQueue("/srv/run/posts")
        >>> q.url, q.undeliverable
        ('/srv/run/posts', PosixPath('/srv/run/undeliverable'))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        options: QueueOptions | None = None,
        undeliverable: str | os.PathLike[str] | None = None,
        host: str | None = None,
        watch: WatchFactory | None = None,
    ) -> None:
        super().__init__(path)
        self.watch = watch
        self.options = options or QueueOptions()
        self.undeliverable = (
            Path(undeliverable).absolute()
            if undeliverable is not None
            else self.path.parent / "undeliverable"
        )
        self.host = host or socket.gethostname()
        self._names = NameGenerator(host=self.host)
        self._random = random.Random()
        self._new = f"{self.path}/new/"
        self._cur = f"{self.path}/cur/"
        self._writer = MaildirWriter(
            self.path, self._names, self.url, sync=_sync_mode(self.options, self.url)
        )
        # A queue dropped (a Queue made per request) ends its writer threads at once.
        weakref.finalize(self, self._writer.release)
        self._owner_cache: tuple[int, str] | None = None

    def _owner(self) -> str:
        """This process's claim token, recomputed after a fork."""
        pid = os.getpid()
        if self._owner_cache is None or self._owner_cache[0] != pid:
            owner = recovery.Owner.current(escape_host(self.host))
            self._owner_cache = (pid, owner.token())
        return self._owner_cache[1]

    # -- push and claims -----------------------------------------------------------------

    async def push(self, message: Pushable) -> str:
        """Store a message durably in ``new/``; return its key once it is on disk.

        Raises:
            QueueError: the write failed (ENOSPC, EIO, permissions); nothing is left in
                ``new/`` or ``tmp/``.

        Example:
            >>> import asyncio, tempfile
            >>> q = MaildirQueue(tempfile.mkdtemp())
            >>> key = asyncio.run(q.push(b"Subject: x\\n\\n"))
            >>> (q.dir("new") / key).exists()
            True
        """
        raw, envelope = push_parts(message)  # a spooled message stays in its file
        data = wrap_payload(raw, envelope)
        self.ensure()
        # The queue's writer thread writes and fsyncs each file and shares one new/
        # fsync across every push waiting with it (group commit; see writer.py).
        return await self._writer.write(data)

    def push_sync(self, message: Pushable) -> str:
        """:meth:`push` from synchronous code or any thread, in that thread; durable.

        Raises:
            QueueError: the write failed (ENOSPC, EIO, permissions); nothing is left in
                ``new/`` or ``tmp/``.
            RuntimeError: called from a running event loop's thread (``await push``).

        Example:
            >>> import tempfile
            >>> q = MaildirQueue(tempfile.mkdtemp())
            >>> key = q.push_sync(b"Subject: from a script\\n\\n")
            >>> q.claim_sync(key).message["Subject"]
            'from a script'
        """
        raw, envelope = push_parts(message)  # a spooled message stays in its file
        data = wrap_payload(raw, envelope)
        self.ensure()
        return self._writer.write_blocking(data)

    def claim_sync(self, filename: str) -> Claim | None:
        """Claim one file of ``new/`` by renaming it into ``cur/``; blocking.

        Returns ``None`` when another worker got it first (or it vanished) and when the
        file was corrupt (then it has been buried with reason ``corrupt``).

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> key = asyncio.run(q.push(b"\\n"))
            >>> q.claim_sync(key).key == key, q.claim_sync(key)
            (True, None)
        """
        owner = self._owner()
        if "," in filename or ":" in filename:
            claimed = MaildirName.parse(filename).with_fields(W=owner)
            dst = self._cur + claimed.filename
            attempts, recoveries = claimed.attempts, claimed.recoveries
        else:
            # A fresh key (the usual case): nothing to parse, the owner goes last.
            claimed = MaildirName.claimed(filename, owner)
            dst = self._cur + claimed.filename
            attempts = recoveries = 0
        # Plain strings, not Path joins: on the drain path they were a tenth of the cost.
        try:
            os.rename(self._new + filename, dst)
        except FileNotFoundError:
            # Lost the race. On NFS a retransmitted rename can report ENOENT although it
            # succeeded: the target existing says it was ours (R9).
            if not self.options.shared_fs or not os.path.exists(dst):
                return None
        return self._read_claim(claimed, dst, attempts, recoveries)

    def _read_claim(
        self, name: MaildirName, path: str, attempts: int, recoveries: int
    ) -> Claim | None:
        try:
            data = read_file(path, local=not self.options.shared_fs)
        except FileNotFoundError:
            return None
        try:
            request = request_from_file(data)
        except CorruptMessageError as exc:
            self._bury_sync(name, Path(path), f"corrupt: {exc}", "corrupt")
            return None
        key = name.key
        return Claim(key, request, attempts, recoveries, key_time(key), name)

    async def claim(self, filename: str) -> Claim | None:
        """Claim one file of ``new/`` (see :meth:`claim_sync`) without blocking the loop.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> async def demo():
            ...     key = await q.push(b"\\n")
            ...     return (await q.claim(key)).attempts
            >>> asyncio.run(demo())
            0
        """
        return await asyncio.get_running_loop().run_in_executor(None, self.claim_sync, filename)

    def consume(self) -> AsyncIterator[Claim]:
        """Claims as messages arrive: inotify wake-ups, a start scan and a rescan timer.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> async def first():
            ...     key = await q.push(b"\\n")
            ...     claims = q.consume()
            ...     claim = await anext(claims)
            ...     await q.ack(claim)
            ...     await claims.aclose()
            ...     return claim.key == key
            >>> asyncio.run(first())
            True
        """
        return self.claims(prefetch=1, burst=False, ready=asyncio.Event())

    def claims(self, *, prefetch: int, burst: bool, ready: asyncio.Event) -> AsyncIterator[Claim]:
        """A worker's claims: a :class:`~maildefer.queue.maildir.feed.MaildirFeed` on ``new/``.

        ``prefetch`` does not matter here: a maildir claim is taken only when the worker
        asks for one, so the rest stay in ``new/`` for other workers.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> async def drain():
            ...     await q.push(b"\\n"); await q.push(b"\\n")
            ...     ready = asyncio.Event()
            ...     keys = [c.key async for c in q.claims(prefetch=1, burst=True, ready=ready)]
            ...     return len(keys), ready.is_set()
            >>> asyncio.run(drain())
            (2, True)
        """
        if self.watch is None:
            return MaildirFeed(self, burst=burst, ready=ready).claims()
        return MaildirFeed(self, burst=burst, watch=self.watch, ready=ready).claims()

    def _claim_path(self, claim: Claim) -> tuple[MaildirName, str]:
        name = claim.handle
        if not isinstance(name, MaildirName):
            raise TypeError("claim was not made by a MaildirQueue")
        return name, self._cur + name.filename

    def ack_sync(self, claim: Claim) -> None:
        """The handler succeeded: delete the claimed file; blocking.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> key = asyncio.run(q.push(b"\\n")); q.ack_sync(q.claim_sync(key))
            >>> asyncio.run(q.count())
            0
        """
        name, path = self._claim_path(claim)
        # Not fsync'd: should the unlink be lost in a crash, the message is handled again
        # (at-least-once); paying a directory fsync per ack would halve drain speed.
        unlink_quietly(path)
        if name.attempts:
            unlink_quietly(self.error_path(name.key))

    async def ack(self, claim: Claim) -> None:
        """The handler succeeded: the message leaves the queue.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> async def demo():
            ...     await q.ack(await q.claim(await q.push(b"\\n")))
            ...     return await q.count()
            >>> asyncio.run(demo())
            0
        """
        self.ack_sync(claim)

    @property
    def lease_renewal(self) -> float | None:
        """A third of the lease on a shared filesystem (peers recover older claims), else never.

        Example:
            >>> MaildirQueue("/q", options=QueueOptions(shared_fs=True, lease=60)).lease_renewal
            20.0
            >>> MaildirQueue("/q").lease_renewal is None
            True
        """
        return self.options.lease / 3 if self.options.shared_fs else None

    async def renew(self, claims: Sequence[Claim]) -> None:
        """Renew the lease of claims (their mtime) in one thread hop: see :meth:`touch`.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> async def demo():
            ...     claim = await q.claim(await q.push(b"\\n"))
            ...     os.utime(q.dir("cur") / claim.handle.filename, (0, 0))
            ...     await q.renew([claim])
            ...     return (q.dir("cur") / claim.handle.filename).stat().st_mtime > 0
            >>> asyncio.run(demo())
            True
        """
        await asyncio.get_running_loop().run_in_executor(None, self.touch, claims)

    def touch(self, claims: Sequence[Claim]) -> None:
        """Renew the lease of claims (mtime), so other hosts do not recover them; blocking.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> claim = q.claim_sync(asyncio.run(q.push(b"\\n")))
            >>> path = q.dir("cur") / claim.handle.filename; os.utime(path, (0, 0))
            >>> q.touch([claim]); time.time() - path.stat().st_mtime < 60
            True
        """
        now = time.time()
        for claim in claims:
            _, path = self._claim_path(claim)
            try:
                os.utime(path, (now, now))
            except FileNotFoundError:
                continue

    async def retry(self, claim: Claim, error: str, delay: float | None = None) -> bool:
        """Count a failed attempt: back off and retry, or bury after ``max_attempts``.

        Args:
            claim: the claim whose handlers failed.
            error: what failed, recorded in ``errors/`` (and in the bury's record).
            delay: seconds before the retry instead of the backoff (a handler's
                ``Retry``); the message waits in ``later/`` until then, or goes back to
                ``new/`` at once for 0.

        Returns:
            ``True`` if the message will be retried, ``False`` if it was buried.

        Example:
            >>> import asyncio, tempfile
            >>> q = MaildirQueue(tempfile.mkdtemp(), options=QueueOptions(max_attempts=2))
            >>> async def demo():
            ...     first = await q.retry(await q.claim(await q.push(b"\\n")), "boom", delay=60)
            ...     return first, q.promote_due(), q.promote_due(now=time.time() + 61)[0]
            >>> asyncio.run(demo())
            (True, (0, ...), 1)
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.retry_sync, claim, error, delay)

    def retry_sync(self, claim: Claim, error: str, delay: float | None = None) -> bool:
        """Blocking form of :meth:`retry`."""
        name, path = self._claim_path(claim)
        attempts = name.attempts + 1
        if attempts >= self.options.max_attempts:
            self._bury_sync(name.with_fields(A=attempts), path, error, "failed")
            return False
        if delay is None:
            delay = self.options.backoff(attempts - 1, jitter=self._random.uniform(0.8, 1.2))
        self._write_error(self, name.key, error, "retry", attempts, sync=False)
        if delay <= 0:
            os.rename(path, self.path / "new" / name.with_fields(W=None, A=attempts).filename)
        else:
            # Rounded up: a requested delay is a minimum (Retry), never a millisecond short.
            due = math.ceil((time.time() + delay) * 1000)
            later = name.with_fields(W=None, A=attempts, T=due)
            os.rename(path, self.path / "later" / later.filename)
        return True

    async def release(self, claim: Claim) -> None:
        """Give a claimed message back to ``new/`` unhandled; no attempt is counted.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> async def demo():
            ...     key = await q.push(b"\\n"); await q.release(await q.claim(key))
            ...     return [n for b in q.scan_new() for n in b] == [key]
            >>> asyncio.run(demo())
            True
        """
        name, path = self._claim_path(claim)
        try:
            os.rename(path, self.path / "new" / name.with_fields(W=None).filename)
        except FileNotFoundError:
            return

    async def bury(self, claim: Claim, error: str, reason: BuryReason) -> None:
        """Move a claimed message to the undeliverable queue, its error beside it.

        Example:
            >>> import asyncio, tempfile; d = tempfile.mkdtemp()
            >>> q = MaildirQueue(d + "/q", undeliverable=d + "/dead")
            >>> async def demo():
            ...     await q.bury(await q.claim(await q.push(b"\\n")), "boom", "failed")
            ...     return await MaildirQueue(d + "/dead").count()
            >>> asyncio.run(demo())
            1
        """
        name, path = self._claim_path(claim)
        await asyncio.get_running_loop().run_in_executor(
            None, self._bury_sync, name, path, error, reason
        )

    def _bury_sync(
        self, name: MaildirName, path: str | Path, error: str, reason: BuryReason
    ) -> None:
        dead = MaildirStore(self.undeliverable)
        dead.ensure()
        # The record first and durable: if we crash between the two steps, the message
        # is still in cur/ (recovered later) and a stray record is harmless.
        self._write_error(dead, name.key, error, reason, name.attempts, sync=True)
        target = dead.dir("new") / name.with_fields(W=None, T=None).filename
        try:
            os.rename(path, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise QueueError(f"{self.url}: cannot bury {name.key}: {exc}") from exc
            # Another filesystem: copy through tmp/ like any delivery, so a full disk
            # leaves no partial copy in new/; the original goes only once the copy is in.
            staged = dead.dir("tmp") / target.name
            try:
                shutil.copyfile(path, staged)
                fsync_file(str(staged))
                os.link(staged, target)
            except OSError as copy_exc:
                unlink_quietly(staged)
                raise QueueError(f"{self.url}: cannot bury {name.key}: {copy_exc}") from copy_exc
            unlink_quietly(staged)
            os.unlink(path)
        fsync_dir(dead.dir("new"))
        unlink_quietly(self.error_path(name.key))

    def _write_error(
        self, store: MaildirStore, key: str, error: str, reason: str, attempts: int, *, sync: bool
    ) -> None:
        # In this queue's errors/ (a retry) or the undeliverable one's (a bury), where
        # the "queue" field says where requeue sends the message back to.
        record = {
            "queue": str(self.path),
            "reason": reason,
            "attempts": attempts,
            "error": error,
            "at": time.time(),
            "host": self.host,
        }
        store.write_error_record(key, record, sync=sync)

    # -- retries and recovery (see recovery.py) -------------------------------------------

    def promote_due(self, now: float | None = None) -> tuple[int, float | None]:
        """Move messages whose backoff is over from ``later/`` to ``new/``.

        Returns:
            How many were moved, and the seconds until the next one is due (``None`` if
            none waits).

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> async def demo():
            ...     await q.retry(await q.claim(await q.push(b"\\n")), "boom")
            ...     return q.promote_due(), q.promote_due(now=time.time() + 3600)
            >>> asyncio.run(demo())
            ((0, ...), (1, None))
        """
        self.ensure()
        return recovery.promote_due(self.path, now)

    def recover_sync(self, now: float | None = None) -> RecoveryReport:
        """Blocking form of :meth:`recover`; ``now`` sets the clock the ages are read on."""
        self.ensure()
        now = time.time() if now is None else now
        report = RecoveryReport()
        report.returned, report.quarantined = recovery.recover_claims(
            self.path,
            escape_host(self.host),
            lease=self.options.lease,
            max_recoveries=self.options.max_recoveries,
            quarantine=lambda name, path, error: self._bury_sync(name, path, error, "poison"),
            now=now,
        )
        report.tmp_removed = recovery.clean_tmp(self.dir("tmp"), escape_host(self.host), now)
        report.due, _ = self.promote_due(now)
        return report

    async def recover(self) -> RecoveryReport:
        """Return dead workers' claims, quarantine poison, clean tmp/, promote retries.

        A claim whose worker died goes back to ``new/`` with an attempt counted; a
        message that killed its worker ``max_recoveries`` times is buried as poison;
        tmp/ files untouched for 36 h are deleted.

        Example:
            >>> import asyncio, tempfile
            >>> asyncio.run(MaildirQueue(tempfile.mkdtemp()).recover()).returned
            0
        """
        return await asyncio.get_running_loop().run_in_executor(None, self.recover_sync)

    # -- the user-facing queue API (the rest is MaildirStore's) -------------------------

    async def pop(self) -> tuple[str, MailRequest] | None:
        """Take one waiting message off the queue (claim, read, delete), or ``None``.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> async def demo():
            ...     await q.push(b"Subject: a\\n\\n")
            ...     key, msg = await q.pop()
            ...     return msg["Subject"], await q.pop()
            >>> asyncio.run(demo())
            ('a', None)
        """

        def pop() -> tuple[str, MailRequest] | None:
            for batch in self.scan_new(batch=64):
                for filename in batch:
                    claim = self.claim_sync(filename)
                    if claim is not None:
                        self.ack_sync(claim)
                        return claim.key, claim.message
            return None

        return await asyncio.to_thread(pop)

    async def close(self) -> None:
        """Finish the pushes in flight and stop the writer thread (made again if needed).

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> async def demo():
            ...     key = await q.push(b"\\n")
            ...     await q.close()
            ...     return (q.dir("new") / key).exists(), await q.count()
            >>> asyncio.run(demo())
            (True, 1)
        """
        await self._writer.close()

    def close_sync(self) -> None:
        """:meth:`close` for synchronous code: blocks until the writer threads end.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> key = asyncio.run(q.push(b"\\n")); q.close_sync()
            >>> (q.dir("new") / key).exists()
            True
        """
        self._writer.close_sync()
