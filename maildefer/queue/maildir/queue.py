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
directory per message: push, claim and ack are O(1) (``count``, ``keys`` and the admin
look-ups may list).

Durability of push (RELIABILITY.md R1): the file is written in ``tmp/`` with ``O_EXCL``,
fsync'd, ``link``-ed into ``new/`` (never renamed over an existing name), and ``new/`` is
fsync'd before ``push`` returns. The directory fsync is shared by every push that linked
before it started (group commit), which is where concurrent pushers gain over one
fsync each, without ever returning before their own link is on disk.

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
import json
import os
import random
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maildefer.errors import ConfigError, CorruptMessageError, QueueError
from maildefer.mail import MailRequest
from maildefer.queue.backend import BuryReason, Claim, Pushable, QueueOptions, RecoveryReport
from maildefer.queue.envelope import message_parts, request_from_file, wrap
from maildefer.queue.maildir.names import MaildirName, NameGenerator, escape_host
from maildefer.queue.maildir.writer import (
    MaildirWriter,
    SyncMode,
    fsync_dir,
    syncfs_available,
    unlink_quietly,
)

if TYPE_CHECKING:
    from maildefer.queue.maildir.feed import WatchFactory

TMP_MAX_AGE = 36 * 3600.0
"""tmp/ files untouched this long are debris of a crashed writer (qmail's maildir(5))."""

STATE_DIRS = ("new", "later", "cur")

# The names NameGenerator makes: which process on which host is writing a tmp/ file.
_TMP_NAME = re.compile(r"\d+\.M\d+P(?P<pid>\d+)Q\d+R[0-9a-f]+\.(?P<host>.+)")

_READ_SIZE = 64 * 1024
"""First read of a claimed file: most messages fit, so two reads (the second says EOF).

Not larger: a buffer over 128 KiB is an mmap and munmap per read."""


def _process_start(pid: int) -> str | None:
    """The start time of a process in clock ticks since boot, or ``None`` if it is gone.

    A pid alone is reused by the kernel; pid plus start time names one process.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so split after its ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None


@dataclass(frozen=True)
class _Owner:
    host: str
    pid: int
    start: str

    @classmethod
    def parse(cls, value: str) -> _Owner | None:
        host, _, rest = value.rpartition("~")
        host, _, pid = host.rpartition("~")
        if not host or not pid.isdigit():
            return None
        return cls(host, int(pid), rest)

    def token(self) -> str:
        return f"{self.host}~{self.pid}~{self.start}"


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


def _key_time(key: str) -> float | None:
    """When a key made by :class:`NameGenerator` was made, from its ``sec.M<usec>`` part."""
    sec, _, rest = key.partition(".")
    if not sec.isdigit() or not rest.startswith("M"):
        return None
    usec = rest[1:].partition("P")[0]
    return int(sec) + (int(usec) / 1e6 if usec.isdigit() else 0.0)


def read_file(path: str, *, local: bool = False) -> bytes:
    """A whole file's bytes, with as few system calls as the kernel allows.

    ``open(path, "rb").read()`` also makes an ``fstat``, an ``ioctl`` (is it a tty?) and
    a buffered reader: about 10 µs of a claim here.

    Args:
        path: the file.
        local: the file is on a local filesystem, where a read of a regular file returns
            less than asked only at its end, so a short first read is the whole file
            (one ``read`` fewer per claim). Otherwise (NFS) it reads until ``read``
            returns nothing.

    Example:
        >>> import pathlib, tempfile; p = pathlib.Path(tempfile.mkdtemp()) / "m"
        >>> _ = p.write_bytes(b"x" * 70000); len(read_file(str(p)))
        70000
        >>> _ = p.write_bytes(b"x" * 700); len(read_file(str(p), local=True))
        700
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, _READ_SIZE)
        if local and len(data) < _READ_SIZE:
            return data
        more = os.read(fd, _READ_SIZE) if data else b""
        if not more:
            return data
        chunks = [data, more]
        while more:
            more = os.read(fd, max(_READ_SIZE, sum(map(len, chunks))))
            chunks.append(more)
        return b"".join(chunks)
    finally:
        os.close(fd)


class MaildirQueue:
    """A queue stored as a maildir directory on local (or shared) disk.

    Args:
        path: the queue directory; ``tmp/ new/ cur/ later/`` are created on first use.
        options: retry and recovery policy (defaults as in ``[queues.NAME]``).
        undeliverable: the maildir where buried messages go (``run/undeliverable``
            beside the queue by default).
        host: this machine's name, in keys and claim owners.

    Example:
        >>> q = MaildirQueue("/tmp/q-doc2", undeliverable="/tmp/q-doc2-dead")
        >>> q.url
        '/tmp/q-doc2'
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
        self.path = Path(path).absolute()
        # The watcher factory a worker's feed uses (watchfiles.awatch when None); tests
        # pass one that loses events.
        self.watch = watch
        self.url = str(path)
        self.options = options or QueueOptions()
        self.undeliverable = (
            Path(undeliverable).absolute()
            if undeliverable is not None
            else self.path.parent / "undeliverable"
        )
        self.host = host or socket.gethostname()
        self._names = NameGenerator(host=self.host)
        self._random = random.Random()
        self._ready = False
        self._new = f"{self.path}/new/"
        self._cur = f"{self.path}/cur/"
        self._writer = MaildirWriter(
            self.path, self._names, self.url, sync=_sync_mode(self.options, self.url)
        )
        self._owner_cache: tuple[int, str] | None = None

    # -- layout -------------------------------------------------------------------------

    def dir(self, name: str) -> Path:
        """One of the queue's subdirectories.

        Example:
            >>> MaildirQueue("/srv/q").dir("new")
            PosixPath('/srv/q/new')
        """
        return self.path / name

    def ensure(self) -> None:
        """Create the queue's directories if they do not exist (idempotent, cached).

        Example:
            >>> import tempfile; q = MaildirQueue(tempfile.mkdtemp() + "/q"); q.ensure()
            >>> sorted(p.name for p in q.path.iterdir())
            ['cur', 'errors', 'later', 'new', 'tmp']
        """
        if self._ready:
            return
        for sub in ("tmp", "new", "cur", "later", "errors"):
            (self.path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._ready = True

    def _owner(self) -> str:
        """This process's claim token, recomputed after a fork."""
        pid = os.getpid()
        if self._owner_cache is None or self._owner_cache[0] != pid:
            start = _process_start(pid) or "0"
            self._owner_cache = (pid, _Owner(escape_host(self.host), pid, start).token())
        return self._owner_cache[1]

    # -- push ----------------------------------------------------------------------------

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
        raw, envelope = message_parts(message)
        data = wrap(raw, envelope)
        self.ensure()
        # The queue's writer thread writes and fsyncs each file and shares one new/
        # fsync across every push waiting with it (group commit; see writer.py).
        return await self._writer.write(data)

    # -- claiming ------------------------------------------------------------------------

    def scan_new(self, batch: int = 1024) -> Iterator[list[str]]:
        """The file names in ``new/``, in batches (scandir; dot-files skipped).

        Example:
            >>> import tempfile; q = MaildirQueue(tempfile.mkdtemp()); q.ensure()
            >>> list(q.scan_new())
            []
        """
        self.ensure()
        names: list[str] = []
        with os.scandir(self.path / "new") as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                names.append(entry.name)
                if len(names) >= batch:
                    yield names
                    names = []
        if names:
            yield names

    def claim_now(self, filename: str) -> Claim | None:
        """Claim one file of ``new/`` by renaming it into ``cur/``; blocking.

        Returns ``None`` when another worker got it first (or it vanished) and when the
        file was corrupt (then it has been buried with reason ``corrupt``).

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> key = asyncio.run(q.push(b"\\n"))
            >>> q.claim_now(key).key == key, q.claim_now(key)
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
            self._bury_now(name, Path(path), f"corrupt: {exc}", "corrupt")
            return None
        key = name.key
        return Claim(key, request, attempts, recoveries, _key_time(key), name)

    async def claim(self, filename: str) -> Claim | None:
        """Claim one file of ``new/`` (see :meth:`claim_now`) without blocking the loop.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> async def demo():
            ...     key = await q.push(b"\\n")
            ...     return (await q.claim(key)).attempts
            >>> asyncio.run(demo())
            0
        """
        return await asyncio.get_running_loop().run_in_executor(None, self.claim_now, filename)

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
        from maildefer.queue.maildir.feed import MaildirFeed

        if self.watch is None:
            return MaildirFeed(self, burst=burst, ready=ready).claims()
        return MaildirFeed(self, burst=burst, watch=self.watch, ready=ready).claims()

    def _claim_path(self, claim: Claim) -> tuple[MaildirName, str]:
        name = claim.handle
        if not isinstance(name, MaildirName):
            raise TypeError("claim was not made by a MaildirQueue")
        return name, self._cur + name.filename

    def ack_now(self, claim: Claim) -> None:
        """The handler succeeded: delete the claimed file; blocking.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> key = asyncio.run(q.push(b"\\n")); q.ack_now(q.claim_now(key))
            >>> asyncio.run(q.count())
            0
        """
        name, path = self._claim_path(claim)
        # Not fsync'd: should the unlink be lost in a crash, the message is handled again
        # (at-least-once); paying a directory fsync per ack would halve drain speed.
        unlink_quietly(path)
        if name.attempts:
            unlink_quietly(self.path / "errors" / f"{name.key}.json")

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
        self.ack_now(claim)

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
            >>> import asyncio; asyncio.run(MaildirQueue("/tmp/q-doc4").renew([]))
        """
        await asyncio.get_running_loop().run_in_executor(None, self.touch, claims)

    def touch(self, claims: Sequence[Claim]) -> None:
        """Renew the lease of claims (mtime), so other hosts do not recover them.

        Example:
            >>> MaildirQueue("/tmp/q-doc4").touch([])
        """
        now = time.time()
        for claim in claims:
            _, path = self._claim_path(claim)
            try:
                os.utime(path, (now, now))
            except FileNotFoundError:
                continue

    async def retry(self, claim: Claim, error: str) -> bool:
        """Count a failed attempt: back off and retry, or bury after ``max_attempts``.

        Returns:
            ``True`` if the message will be retried, ``False`` if it was buried.

        Example:
            >>> import asyncio, tempfile
            >>> q = MaildirQueue(tempfile.mkdtemp(), options=QueueOptions(max_attempts=1))
            >>> async def demo():
            ...     return await q.retry(await q.claim(await q.push(b"\\n")), "boom")
            >>> asyncio.run(demo())
            False
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.retry_now, claim, error)

    def retry_now(self, claim: Claim, error: str) -> bool:
        """Blocking form of :meth:`retry`."""
        name, path = self._claim_path(claim)
        attempts = name.attempts + 1
        if attempts >= self.options.max_attempts:
            self._bury_now(name.with_fields(A=attempts), path, error, "failed")
            return False
        delay = self.options.backoff(attempts - 1, jitter=self._random.uniform(0.8, 1.2))
        self._write_error(self.path / "errors", name.key, error, "retry", attempts, sync=False)
        if delay <= 0:
            os.rename(path, self.path / "new" / name.with_fields(W=None, A=attempts).filename)
        else:
            due = int((time.time() + delay) * 1000)
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
            None, self._bury_now, name, path, error, reason
        )

    def _bury_now(
        self, name: MaildirName, path: str | Path, error: str, reason: BuryReason
    ) -> None:
        dead = MaildirQueue(self.undeliverable, host=self.host)
        dead.ensure()
        # The record first and durable: if we crash between the two steps, the message
        # is still in cur/ (recovered later) and a stray record is harmless.
        self._write_error(dead.dir("errors"), name.key, error, reason, name.attempts, sync=True)
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
                fd = os.open(staged, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.link(staged, target)
            except OSError as copy_exc:
                unlink_quietly(staged)
                raise QueueError(f"{self.url}: cannot bury {name.key}: {copy_exc}") from copy_exc
            unlink_quietly(staged)
            os.unlink(path)
        fsync_dir(dead.dir("new"))
        unlink_quietly(self.path / "errors" / f"{name.key}.json")

    def _write_error(
        self, folder: Path, key: str, error: str, reason: str, attempts: int, *, sync: bool
    ) -> None:
        record = {
            "queue": str(self.path),
            "reason": reason,
            "attempts": attempts,
            "error": error,
            "at": time.time(),
            "host": self.host,
        }
        data = json.dumps(record, indent=1).encode("utf-8", "surrogateescape")
        tmp = folder / f".{key}.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, folder / f"{key}.json")
        except BaseException:
            unlink_quietly(tmp)  # a failed record leaves no debris behind
            raise

    # -- retries and recovery -------------------------------------------------------------

    def promote_due(self, now: float | None = None) -> tuple[int, float | None]:
        """Move messages whose backoff is over from ``later/`` to ``new/``.

        Returns:
            How many were moved, and the seconds until the next one is due (``None`` if
            none waits).

        Example:
            >>> import tempfile; MaildirQueue(tempfile.mkdtemp()).promote_due()
            (0, None)
        """
        self.ensure()
        now_ms = int((time.time() if now is None else now) * 1000)
        moved, next_due = 0, None
        with os.scandir(self.path / "later") as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                name = MaildirName.parse(entry.name)
                if name.due_ms <= now_ms:
                    try:
                        os.rename(entry.path, self.path / "new" / name.with_fields(T=None).filename)
                        moved += 1
                    except FileNotFoundError:
                        continue  # another worker promoted it
                else:
                    wait = (name.due_ms - now_ms) / 1000
                    next_due = wait if next_due is None else min(next_due, wait)
        return moved, next_due

    def recover_now(self, now: float | None = None) -> RecoveryReport:
        """Blocking form of :meth:`recover`."""
        self.ensure()
        now = time.time() if now is None else now
        report = RecoveryReport()
        me = escape_host(self.host)
        with os.scandir(self.path / "cur") as it:
            entries = [e for e in it if not e.name.startswith(".")]
        for entry in entries:
            name = MaildirName.parse(entry.name)
            owner_field = name.field("W")
            if owner_field is None:
                continue  # a maildir reader's message, not a claim of ours
            owner = _Owner.parse(owner_field)
            if owner is not None and owner.host == me:
                if _process_start(owner.pid) == owner.start:
                    continue  # the claimer is alive
            else:
                try:
                    if now - entry.stat().st_mtime < self.options.lease:
                        continue  # another host's claim, lease still running
                except FileNotFoundError:
                    continue
            recoveries = name.recoveries + 1
            back = name.with_fields(W=None, R=recoveries, A=name.attempts + 1)
            if recoveries >= self.options.max_recoveries:
                msg = f"worker died {recoveries} times while handling it; quarantined"
                try:
                    self._bury_now(back, Path(entry.path), msg, "poison")
                except FileNotFoundError:
                    continue
                report.quarantined += 1
            else:
                try:
                    os.rename(entry.path, self.path / "new" / back.filename)
                except FileNotFoundError:
                    continue  # another worker recovered it first
                report.returned += 1
        report.tmp_removed = self._clean_tmp(now)
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
        return await asyncio.get_running_loop().run_in_executor(None, self.recover_now)

    def _clean_tmp(self, now: float) -> int:
        """Delete tmp/ files no writer will finish; returns how many.

        Any file untouched for 36 h goes (qmail's rule, for any program's files). Our own
        files go at once when the name says they were written on this host by a process
        that is gone: a push killed mid-write (SIGKILL of serve) never comes back for it.
        """
        removed = 0
        me = escape_host(self.host)
        with os.scandir(self.path / "tmp") as it:
            for entry in it:
                writer = _TMP_NAME.match(entry.name)
                if writer is not None and writer["host"] == me:
                    if not os.path.exists(f"/proc/{writer['pid']}"):
                        unlink_quietly(entry.path)
                        removed += 1
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if now - max(st.st_mtime, st.st_atime) >= TMP_MAX_AGE:
                    unlink_quietly(Path(entry.path))
                    removed += 1
        return removed

    # -- the user-facing queue API ------------------------------------------------------

    def _entries(self, dirs: tuple[str, ...] = STATE_DIRS) -> Iterator[tuple[str, str]]:
        """(directory, file name) of every message, in ``dirs``."""
        self.ensure()
        for sub in dirs:
            with os.scandir(self.path / sub) as it:
                for entry in it:
                    if not entry.name.startswith("."):
                        yield sub, entry.name

    def locate(self, key: str) -> tuple[str, str] | None:
        """Where a message is: ``(directory, file name)``, or ``None``.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> key = asyncio.run(q.push(b"\\n")); q.locate(key) == ("new", key)
            True
        """
        self.ensure()
        if (self.path / "new" / key).exists():
            return "new", key
        for sub, filename in self._entries():
            if MaildirName.parse(filename).key == key:
                return sub, filename
        return None

    def read_now(self, sub: str, filename: str) -> MailRequest:
        """Read one message file (envelope applied); blocking.

        Raises:
            CorruptMessageError: the file fails its envelope check.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> key = asyncio.run(q.push(MailRequest(b"\\n", mail_from="a@x")))
            >>> q.read_now("new", key).mail_from
            'a@x'
        """
        return request_from_file((self.path / sub / filename).read_bytes())

    def error_record(self, key: str) -> dict[str, Any] | None:
        """The last error recorded for a message (retry or bury), or ``None``.

        Example:
            >>> import tempfile; MaildirQueue(tempfile.mkdtemp()).error_record("nope") is None
            True
        """
        try:
            data = json.loads((self.path / "errors" / f"{key}.json").read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    async def count(self) -> int:
        """How many messages are in the queue: waiting, delayed or claimed.

        Example:
            >>> import asyncio, tempfile; asyncio.run(MaildirQueue(tempfile.mkdtemp()).count())
            0
        """
        return await asyncio.to_thread(lambda: sum(1 for _ in self._entries()))

    async def keys(self) -> list[str]:
        """The keys of every message in the queue (waiting, delayed, claimed).

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> key = asyncio.run(q.push(b"\\n")); asyncio.run(q.keys()) == [key]
            True
        """
        return await asyncio.to_thread(
            lambda: [MaildirName.parse(f).key for _, f in self._entries()]
        )

    async def get(self, key: str) -> MailRequest | None:
        """One message by key, or ``None`` if it is not in the queue.

        Example:
            >>> import asyncio, tempfile
            >>> asyncio.run(MaildirQueue(tempfile.mkdtemp()).get("nope")) is None
            True
        """

        def read() -> MailRequest | None:
            where = self.locate(key)
            if where is None:
                return None
            try:
                return self.read_now(*where)
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(read)

    async def remove(self, key: str) -> bool:
        """Delete one message by key; ``True`` if it was there.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> key = asyncio.run(q.push(b"\\n")); asyncio.run(q.remove(key))
            True
        """

        def remove() -> bool:
            where = self.locate(key)
            if where is None:
                return False
            try:
                os.unlink(self.path / where[0] / where[1])
            except FileNotFoundError:
                return False
            unlink_quietly(self.path / "errors" / f"{key}.json")
            return True

        return await asyncio.to_thread(remove)

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
                    claim = self.claim_now(filename)
                    if claim is not None:
                        self.ack_now(claim)
                        return claim.key, claim.message
            return None

        return await asyncio.to_thread(pop)

    async def clear(self) -> int:
        """Delete every message in the queue (waiting, delayed, claimed); return how many.

        Example:
            >>> import asyncio, tempfile; q = MaildirQueue(tempfile.mkdtemp())
            >>> _ = asyncio.run(q.push(b"\\n")); asyncio.run(q.clear())
            1
        """

        def clear() -> int:
            removed = 0
            for sub, filename in list(self._entries()):
                try:
                    os.unlink(self.path / sub / filename)
                    removed += 1
                except FileNotFoundError:
                    continue
                unlink_quietly(self.path / "errors" / f"{MaildirName.parse(filename).key}.json")
            return removed

        return await asyncio.to_thread(clear)

    async def requeue(self, *, source: str | None = None) -> int:
        """Move buried messages from this (undeliverable) queue back where they came from.

        Attempts and recoveries start again from zero.

        Args:
            source: only messages buried from this queue directory (all when ``None``).

        Returns:
            How many messages were moved.

        Example:
            >>> import asyncio, tempfile; d = tempfile.mkdtemp()
            >>> q = MaildirQueue(d + "/q", undeliverable=d + "/dead")
            >>> async def demo():
            ...     await q.bury(await q.claim(await q.push(b"\\n")), "boom", "failed")
            ...     return await MaildirQueue(d + "/dead").requeue(), await q.count()
            >>> asyncio.run(demo())
            (1, 1)
        """
        wanted = None if source is None else str(Path(source).absolute())

        def requeue() -> int:
            moved = 0
            touched: set[Path] = set()
            for sub, filename in list(self._entries()):
                name = MaildirName.parse(filename)
                record = self.error_record(name.key) or {}
                origin = record.get("queue")
                if not isinstance(origin, str) or (wanted is not None and origin != wanted):
                    continue
                target = MaildirQueue(origin, host=self.host)
                target.ensure()
                try:
                    os.rename(self.path / sub / filename, target.dir("new") / name.fresh().filename)
                except FileNotFoundError:
                    continue
                touched.add(target.dir("new"))
                unlink_quietly(self.path / "errors" / f"{name.key}.json")
                moved += 1
            for folder in touched:
                fsync_dir(folder)
            return moved

        return await asyncio.to_thread(requeue)

    async def close(self) -> None:
        """Finish the pushes in flight and stop the writer thread (made again if needed).

        Example:
            >>> import asyncio; asyncio.run(MaildirQueue("/tmp/q-doc5").close())
        """
        await self._writer.close()
