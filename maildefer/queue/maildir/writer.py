"""Durable maildir delivery: a few writer threads, and flushes shared by many pushes.

Each queue has a small pool of writer threads (started on demand, at most
``WRITER_THREADS``, each ending after ``IDLE_SECONDS`` without work) that take pushes
from one shared deque and create each file in ``tmp/`` (``O_EXCL``) in parallel. How
the files are made durable is the queue's ``sync`` mode; both keep docs/reliability.md
R1's order (the file's data on disk, then its ``link`` into ``new/``, then that entry on
disk, then the push returns):

- ``fsync``: each thread fsyncs its file and links it; the ``new/`` fsync is a group
  commit with no fixed wait: a thread that has linked a file and finds no ``new/`` fsync
  running starts one, covering every link made so far; links made while it runs wait for
  the next one, which the same thread starts as soon as the first ends.
- ``syncfs`` (Linux >= 5.8, the default there unless ``shared_fs``): files are written
  without an fsync each; one committer at a time flushes every file written so far with
  one ``syncfs(2)``, links them, and the next ``syncfs`` (or a ``new/`` fsync when no file
  is waiting) puts those links on disk: pipelined, one flush per batch under load. It
  flushes the whole filesystem the queue lives on, so other writers' dirty data there
  adds to its time. Measured here (bench/bench_queue.py, 10 pushers), 1.0-2.0x the pushes
  per second of ``fsync`` mode on this disk's ext4 without a journal; on a journaled ext4
  the two are within 10 % (docs/benchmarks.md).

Each flush hands its keys back to the event loop with one wake-up. Synchronous code
pushes with :meth:`MaildirWriter.write_blocking`, in its own thread, in the same order.

A caller cancelled while its message is being written gets nothing back, but the thread
finishes the write or cleans it up: there is one whole message in ``new/`` or none, never
``tmp/`` debris (R7).

Example:
    >>> import asyncio, tempfile
    >>> from pathlib import Path
    >>> from maildefer.queue.keys import NameGenerator
    >>> d = Path(tempfile.mkdtemp())
    >>> for sub in ("tmp", "new"): (d / sub).mkdir()
    >>> async def demo():
    ...     writer = MaildirWriter(d, NameGenerator(host="h"))
    ...     keys = await asyncio.gather(*(writer.write(b"x") for _ in range(3)))
    ...     await writer.close()
    ...     return len({k for k in keys if (d / "new" / k).exists()})
    >>> asyncio.run(demo())
    3
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import deque
from pathlib import Path
from typing import Literal

from maildefer.errors import QueueError
from maildefer.queue.backend import refuse_running_loop
from maildefer.queue.envelope import FilePayload
from maildefer.queue.keys import NameGenerator
from maildefer.queue.maildir.files import write_payload
from maildefer.queue.maildir.handoff import PendingPush, hand_back

# Re-exported: the writer's OS-call seam (tests replace ``writer.sync_filesystem``), and
# where the rest of the package has always found them.
from maildefer.queue.maildir.syncfs import sync_filesystem as sync_filesystem
from maildefer.queue.maildir.syncfs import syncfs_available as syncfs_available
from maildefer.queue.maildir.writerthreads import WriterThreads

WRITER_THREADS = 4
"""Writer threads per queue at most: enough file fsyncs in flight for ext4 to merge them."""

IDLE_SECONDS = 1.0
"""How long a writer thread waits for another push before it ends (a push starts one again).

Pushes closer than that keep their thread (a new one costs about 85 µs here). A writer
whose queue was dropped (:meth:`MaildirWriter.release`) does not wait: issue 13 counted
21 threads left by 20 ``Queue(path).push`` calls when they never ended.
"""

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC

SyncMode = Literal["fsync", "syncfs"]
"""How a writer makes files durable: an fsync per file, or one ``syncfs`` per batch."""


def fsync_dir(path: str | Path) -> None:
    """Fsync a directory, so the entries made in it survive a crash.

    Example:
        >>> import tempfile; fsync_dir(tempfile.mkdtemp())
    """
    _fsync_by_name(path, os.O_DIRECTORY)


def fsync_file(path: str) -> None:
    """Fsync a file by name (opened read-only: Linux flushes it all the same).

    Example:
        >>> import tempfile; fsync_file(tempfile.mkstemp()[1])
    """
    _fsync_by_name(path, 0)


def _fsync_by_name(path: str | Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str | Path) -> None:
    """Remove a file that may already be gone.

    Example:
        >>> unlink_quietly("/nonexistent/file")
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        return


def replace_file(path: Path, data: bytes, *, sync: bool) -> None:
    """Write ``path`` whole or not at all: a dot-file beside it, then a ``rename`` over it.

    Readers see the old content or the new, never part of it (maildir readers skip the
    dot-file). The directory is not fsync'd.

    Args:
        path: the file to create or replace.
        data: its new content.
        sync: fsync the data before the rename (it survives a crash once this returns,
            given a directory fsync).

    Raises:
        OSError: the write failed; the dot-file is gone and ``path`` is as it was.

    Example:
        >>> import tempfile; p = Path(tempfile.mkdtemp()) / "r.json"
        >>> replace_file(p, b"1", sync=False); replace_file(p, b"2", sync=True)
        >>> p.read_bytes(), sorted(os.listdir(p.parent))
        (b'2', ['r.json'])
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        unlink_quietly(tmp)  # a failed write leaves no debris behind
        raise


class MaildirWriter(WriterThreads):
    """Writes messages durably into a maildir's ``new/``, sharing the directory fsync.

    Args:
        path: the maildir (``tmp/`` and ``new/`` must exist).
        names: where unique keys come from.
        label: how errors name the queue.
        threads: writer threads at most (started as pushes wait for one).
        idle: seconds a thread without work waits for a push before it ends.
        sync: ``fsync`` (each file, then ``new/``) or ``syncfs`` (one flush of the
            filesystem per batch of files, then ``new/``; see :func:`sync_filesystem`).

    Example:
        >>> MaildirWriter(Path("/srv/q"), NameGenerator()).path
        PosixPath('/srv/q')
    """

    def __init__(
        self,
        path: Path,
        names: NameGenerator,
        label: str = "",
        threads: int = WRITER_THREADS,
        sync: SyncMode = "fsync",
        idle: float = IDLE_SECONDS,
    ) -> None:
        self.path = path
        self.label = label or str(path)
        self.sync = sync
        self._names = names
        self._max_threads = max(1, threads)
        self._idle_seconds = idle
        self._sync_fd: int | None = None
        self._tmp = f"{path}/tmp/"
        self._new = f"{path}/new/"
        self._new_dir = f"{path}/new"
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: deque[PendingPush] = deque()
        # Linked into new/, waiting for a directory fsync that starts after their link.
        self._linked: list[PendingPush] = []
        self._syncing = False
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._pid = 0
        self._stopping = False
        self._released = False

    async def write(self, data: bytes | FilePayload) -> str:
        """Store ``data`` as a new message; returns its key once it is durable.

        Raises:
            QueueError: the write or an fsync failed; nothing of it is left behind.

        Example:
            >>> import asyncio, tempfile
            >>> d = Path(tempfile.mkdtemp())
            >>> for sub in ("tmp", "new"): (d / sub).mkdir()
            >>> async def demo():
            ...     writer = MaildirWriter(d, NameGenerator(host="h"))
            ...     key = await writer.write(b"Subject: x\\n\\n")
            ...     await writer.close()
            ...     return (d / "new" / key).read_bytes(), os.listdir(d / "tmp")
            >>> asyncio.run(demo())
            (b'Subject: x\\n\\n', [])
        """
        loop = asyncio.get_running_loop()
        push = (
            _SpooledPush(data, loop, loop.create_future())
            if isinstance(data, FilePayload)
            else PendingPush(data, loop, loop.create_future())
        )
        pid = os.getpid()
        with self._lock:
            if self._pid != pid:
                # A forked child inherits no threads: it starts its own (and drops the
                # parent's pushes, which belong to the parent's event loop).
                self._pending.clear()
                self._linked = []
                self._syncing = False
                self._threads = []
                self._idle = 0
                self._pid = pid
                self._sync_fd = None  # the parent's; the child opens its own
            self._pending.append(push)
            if self._idle:
                self._wake.notify()
            elif len(self._threads) < self._max_threads:
                self._start_thread()
        return await push.future

    def _start_thread(self) -> None:
        thread = threading.Thread(
            target=self._run,
            name=f"maildefer-writer:{self.path.name}:{len(self._threads)}",
            daemon=True,
        )
        self._threads.append(thread)
        thread.start()

    def _run(self) -> None:
        pending = self._pending
        if self.sync == "syncfs":
            # Before this thread creates a file: syncfs reports only the writeback errors
            # met since the fd was opened, and it stays open while any thread lives.
            with contextlib.suppress(OSError):  # if it fails, the batch's syncfs says so
                self._open_sync_fd()
        while True:
            with self._lock:
                while not pending:
                    if self._stopping or self._released:
                        self._retire()
                        return
                    self._idle += 1
                    woken = self._wake.wait(self._idle_seconds)
                    self._idle -= 1
                    if not woken and not pending:
                        self._retire()  # idle: a later push starts a thread again
                        return
                push = pending.popleft()
            if not push.future.done():  # a push cancelled before we began is not written
                data = push.payload if isinstance(push, _SpooledPush) else push.data
                try:
                    if self.sync == "syncfs":
                        push.tmp = self._create(data)  # synced and linked in the commit
                    else:
                        push.key = self.write_sync(data)
                except BaseException as exc:  # handed to the caller, never swallowed
                    push.error = exc
            with self._lock:
                self._linked.append(push)
                if self._syncing:
                    continue  # the running fsync's thread starts the next one, for us too
                self._syncing = True
            self._commit_linked()

    def _commit_syncfs(self) -> None:
        """Commit in syncfs mode: one ``syncfs`` per batch, pipelined, until nothing is left.

        Each ``syncfs`` flushes the data of the files created since the last one (then
        they are linked into ``new/``) and, with them, the ``new/`` entries of the batch
        linked before it: those pushes return. Under a steady load that is one flush per
        batch; when no new file is waiting, one ``new/`` fsync returns the last batch.
        A batch of one file is flushed with that file's own fsync instead, then linked,
        and one ``new/`` fsync returns it with the batch before it (a file's fsync need
        not flush another directory's entries). A lone push then does not wait for other
        writers' dirty data on the same filesystem; measured for one pusher: 1.04-1.32x
        pushes/s on journaled ext4, 0.94-1.0x on ext4 without a journal.
        """
        carry: list[PendingPush] = []  # linked into new/; the entries are not known on disk yet
        with contextlib.suppress(OSError):  # if it fails, the batch's syncfs says so
            self._open_sync_fd()  # at the first push, not the first batch: one fd for good
        while True:
            with self._lock:
                batch = self._linked
                self._linked = []
                if not batch and not carry:
                    self._syncing = False
                    return
            created = [p for p in batch if p.tmp is not None]
            if len(created) > 1:
                try:
                    self._syncfs()
                except OSError as exc:
                    error = self._error(exc)
                    self._drop_created(created, error)
                    self._take_back(carry, error)
                else:
                    self._link_created(created)
                if carry:
                    hand_back(carry)
                carry = [p for p in batch if p.key is not None]
                failed = [p for p in batch if p.key is None]
                if failed:
                    hand_back(failed)  # errors, and pushes cancelled before they began
                continue
            if created:
                try:
                    fsync_file(str(created[0].tmp))
                except OSError as exc:
                    self._drop_created(created, self._error(exc))
                else:
                    self._link_created(created)
            linked = carry + [p for p in batch if p.key is not None]
            if linked:
                try:
                    fsync_dir(self._new_dir)
                except OSError as exc:
                    self._take_back(linked, self._error(exc))
            done, carry = carry + batch, []
            hand_back(done)  # every one has its key on disk, or its error

    def _drop_created(self, created: list[PendingPush], error: QueueError) -> None:
        for push in created:
            unlink_quietly(str(push.tmp))
            push.tmp, push.error = None, error

    def _link_created(self, created: list[PendingPush]) -> None:
        for push in created:
            try:
                push.key = self._link(str(push.tmp))
            except BaseException as exc:
                push.error = exc
            push.tmp = None

    def _open_sync_fd(self) -> int:
        with self._lock:
            if self._sync_fd is None:
                # Kept open while threads live: syncfs reports the writeback errors met
                # since this fd was opened, so an error hit between two batches is seen.
                self._sync_fd = os.open(
                    self._tmp.rstrip("/"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                )
            return self._sync_fd

    def _retire(self) -> None:
        """With the lock held, a thread about to end: the last one closes the sync fd.

        No file is in flight then (each is written by a live thread), so the next
        thread's fd, opened before it writes, misses no error of theirs.
        """
        with contextlib.suppress(ValueError):  # a forked child forgot the parent's threads
            self._threads.remove(threading.current_thread())
        if not self._threads and self._sync_fd is not None:
            fd, self._sync_fd = self._sync_fd, None
            os.close(fd)

    def _syncfs(self) -> None:
        sync_filesystem(self._open_sync_fd())

    def _take_back(self, linked: list[PendingPush], error: QueueError) -> None:
        """Fail pushes whose links may not survive a crash, and take the links out.

        The sender's retry is then the only copy.
        """
        for push in linked:
            unlink_quietly(self._new + str(push.key))
            push.key, push.error = None, error

    def _create(self, data: bytes | FilePayload, *, sync: bool = False) -> str:
        """Write ``data`` to a new file in tmp/ (O_EXCL), fsync'd if ``sync``; its path."""
        for _ in range(100):
            tmp = self._tmp + self._names.next_key()
            try:
                fd = os.open(tmp, _CREATE, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise self._error(exc) from exc
            try:
                try:
                    if isinstance(data, FilePayload):
                        write_payload(fd, data)  # copied from the spool file, not read
                    else:
                        write_all(fd, data)
                    if sync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                unlink_quietly(tmp)
                raise self._error(exc) from exc
            except BaseException:
                unlink_quietly(tmp)
                raise
            return tmp
        raise QueueError(f"{self.label}: push failed: could not find a free name")

    def _link(self, tmp: str) -> str:
        """Link a synced tmp/ file into new/ under a free key (never overwriting); the key."""
        try:
            for _ in range(100):
                key = tmp.rpartition("/")[2]
                try:
                    os.link(tmp, self._new + key)
                except FileExistsError:
                    # Someone else's file has that name in new/: the data is what was
                    # synced, only the name changes.
                    tmp_key = self._names.next_key()
                    os.rename(tmp, self._tmp + tmp_key)
                    tmp = self._tmp + tmp_key
                    continue
                unlink_quietly(tmp)
                return key
        except OSError as exc:
            unlink_quietly(tmp)
            raise self._error(exc) from exc
        unlink_quietly(tmp)
        raise QueueError(f"{self.label}: push failed: could not find a free name")

    def _error(self, exc: OSError) -> QueueError:
        error = QueueError(f"{self.label}: push failed: {exc.strerror or exc}")
        error.__cause__ = exc
        return error

    def _commit_linked(self) -> None:
        """Fsync ``new/`` for everything linked so far, again until nothing is left."""
        if self.sync == "syncfs":
            self._commit_syncfs()
            return
        while True:
            with self._lock:
                batch = self._linked
                if not batch:
                    self._syncing = False
                    return
                self._linked = []
            written = [p for p in batch if p.key is not None]
            if written:
                try:
                    fsync_dir(self._new_dir)
                except OSError as exc:
                    self._take_back(written, self._error(exc))
            hand_back(batch)

    def write_sync(self, data: bytes | FilePayload) -> str:
        """Write ``data`` into tmp/, fsync it, link it into new/; blocking; no dir fsync.

        Raises:
            QueueError: the write failed; nothing of it is left in tmp/ or new/.

        Example:
            >>> import tempfile
            >>> d = Path(tempfile.mkdtemp())
            >>> for sub in ("tmp", "new"): (d / sub).mkdir()
            >>> key = MaildirWriter(d, NameGenerator(host="h")).write_sync(b"x")
            >>> (d / "new" / key).read_bytes(), os.listdir(d / "tmp")
            (b'x', [])
        """
        return self._link(self._create(data, sync=True))

    def write_blocking(self, data: bytes | FilePayload) -> str:
        """Store ``data`` durably from synchronous code; its key once it is on disk.

        The calling thread does it all, in :meth:`write`'s order (file fsync'd, linked into
        ``new/``, ``new/`` fsync'd): no thread or loop is left behind. Concurrent callers
        each pay their own ``new/`` fsync (the group commit is :meth:`write`'s).

        Raises:
            QueueError: the write or an fsync failed; nothing of it is left in tmp/ or new/.
            RuntimeError: called from a running event loop's thread (``await`` write).

        Example:
            >>> import tempfile
            >>> d = Path(tempfile.mkdtemp())
            >>> for sub in ("tmp", "new"): (d / sub).mkdir()
            >>> key = MaildirWriter(d, NameGenerator(host="h")).write_blocking(b"x")
            >>> (d / "new" / key).read_bytes(), os.listdir(d / "tmp")
            (b'x', [])
        """
        refuse_running_loop("push_sync")
        key = self.write_sync(data)
        try:
            fsync_dir(self._new_dir)
        except OSError as exc:
            # Its entry might not survive a crash: take it out, the caller keeps the message.
            unlink_quietly(self._new + key)
            raise self._error(exc) from exc
        return key

    def _stopped(self) -> None:
        with self._lock:
            # Threads started by a push made meanwhile keep running as usual.
            self._threads = [t for t in self._threads if t.is_alive()]
            self._stopping = False
            if not self._threads and self._sync_fd is not None:
                fd, self._sync_fd = self._sync_fd, None
                os.close(fd)


class _SpooledPush(PendingPush):
    """A push of a spooled message (``serve``): its payload in place of bytes."""

    __slots__ = ("payload",)

    def __init__(
        self, payload: FilePayload, loop: asyncio.AbstractEventLoop, future: asyncio.Future[str]
    ) -> None:
        super().__init__(b"", loop, future)
        self.payload = payload


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, finishing any short write.

    Example:
        >>> import tempfile
        >>> fd, name = tempfile.mkstemp()
        >>> write_all(fd, b"x" * 100_000); os.close(fd); os.path.getsize(name)
        100000
    """
    written = os.write(fd, data)
    if written < len(data):  # short write: finish it
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view) :]
