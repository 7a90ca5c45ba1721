"""Durable maildir delivery in batches: one writer thread per queue, one ``new/`` fsync each.

Measured here (2 cores, sandboxed, ext4), a durable create costs about 0.4 ms for the file
fsync and 1.3 ms for the directory fsync; and pushing from many threads at once spent its
time handing the GIL around rather than on the disk. So each queue has one thread that
takes every push waiting, writes each file (``tmp/`` with ``O_EXCL``, write, fsync,
``link`` into ``new/``), fsyncs ``new/`` once for the whole batch, and only then hands the
keys back to the event loop, with one wake-up per batch. No push returns before its own
link is covered by a directory fsync that began after it (RELIABILITY.md R1).

A caller cancelled while its message is being written gets nothing back, but the thread
finishes the write or cleans it up: there is one whole message in ``new/`` or none, never
``tmp/`` debris (R7).

Example:
    >>> import asyncio, tempfile
    >>> from pathlib import Path
    >>> from maildefer.queue.names import NameGenerator
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
import os
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from maildefer.errors import QueueError
from maildefer.queue.names import NameGenerator

MAX_BATCH = 128
"""Messages written behind one directory fsync at most (bounds one batch's latency)."""


def fsync_dir(path: str | Path) -> None:
    """Fsync a directory, so the entries made in it survive a crash.

    Example:
        >>> import tempfile; fsync_dir(tempfile.mkdtemp())
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
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


@dataclass(eq=False)
class _Push:
    data: bytes
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[str]
    key: str | None = None
    error: BaseException | None = None


class MaildirWriter:
    """Writes messages durably into a maildir's ``new/``, batching the directory fsync.

    Args:
        path: the maildir (``tmp/`` and ``new/`` must exist).
        names: where unique keys come from.
        label: how errors name the queue.

    Example:
        >>> MaildirWriter(Path("/srv/q"), NameGenerator()).path
        PosixPath('/srv/q')
    """

    def __init__(self, path: Path, names: NameGenerator, label: str = "") -> None:
        self.path = path
        self.label = label or str(path)
        self._names = names
        self._tmp = f"{path}/tmp/"
        self._new = f"{path}/new/"
        self._new_dir = f"{path}/new"
        self._cv = threading.Condition()
        self._pending: deque[_Push] = deque()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stopping = False

    async def write(self, data: bytes) -> str:
        """Store ``data`` as a new message; returns its key once it is durable.

        Raises:
            QueueError: the write or an fsync failed; nothing of it is left behind.

        Example:
            >>> MaildirWriter.write.__name__
            'write'
        """
        loop = asyncio.get_running_loop()
        push = _Push(data, loop, loop.create_future())
        with self._cv:
            self._start_if_needed()
            self._pending.append(push)
            self._cv.notify()
        return await push.future

    def _start_if_needed(self) -> None:
        # A forked child inherits no threads: start one of its own (and drop the parent's
        # queue of pushes, which belongs to the parent's event loop).
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        if self._pid != os.getpid():
            self._pending.clear()
        self._pid = os.getpid()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"maildefer-writer:{self.path.name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopping:
                    self._cv.wait()
                if not self._pending:
                    return
                count = min(len(self._pending), MAX_BATCH)
                batch = [self._pending.popleft() for _ in range(count)]
            self._write_batch(batch)

    def _write_batch(self, batch: list[_Push]) -> None:
        index = 0
        while index < len(batch):
            push = batch[index]
            index += 1
            try:
                push.key = self.write_now(push.data)
            except BaseException as exc:  # handed to the caller, never swallowed
                push.error = exc
            if index == len(batch) and len(batch) < MAX_BATCH:
                # Pushes that arrived while we wrote join this batch: linked before the
                # directory fsync starts, they are covered by it. Without this, batches
                # alternate between one early push and all the others.
                with self._cv:
                    while self._pending and len(batch) < MAX_BATCH:
                        batch.append(self._pending.popleft())
        written = [p for p in batch if p.key is not None]
        if written:
            try:
                fsync_dir(self._new_dir)
            except OSError as exc:
                # The links may not survive a crash: take them out, so the sender's retry
                # is the only copy, and fail every push this fsync was to cover.
                error = QueueError(f"{self.label}: push failed: {exc.strerror or exc}")
                error.__cause__ = exc
                for push in written:
                    unlink_quietly(self._new + str(push.key))
                    push.key, push.error = None, error
        by_loop: dict[asyncio.AbstractEventLoop, list[_Push]] = {}
        for push in batch:
            by_loop.setdefault(push.loop, []).append(push)
        for loop, pushes in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, pushes)
            except RuntimeError:
                continue  # that loop is closed: nobody waits for these any more

    def write_now(self, data: bytes) -> str:
        """Write ``data`` into tmp/, fsync it, link it into new/; blocking; no dir fsync.

        Raises:
            QueueError: the write failed; nothing of it is left in tmp/ or new/.

        Example:
            >>> MaildirWriter.write_now.__name__
            'write_now'
        """
        for _ in range(100):
            key = self._names.next_key()
            tmp = self._tmp + key
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise QueueError(f"{self.label}: push failed: {exc.strerror or exc}") from exc
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                # link, not rename: an existing name in new/ is never overwritten.
                os.link(tmp, self._new + key)
            except FileExistsError:
                os.unlink(tmp)
                continue
            except OSError as exc:
                unlink_quietly(tmp)
                raise QueueError(f"{self.label}: push failed: {exc.strerror or exc}") from exc
            except BaseException:
                unlink_quietly(tmp)
                raise
            unlink_quietly(tmp)
            return key
        raise QueueError(f"{self.label}: push failed: could not find a free name")

    async def close(self) -> None:
        """Finish the pushes in flight and stop the thread (a later push starts it again).

        Example:
            >>> import asyncio; asyncio.run(MaildirWriter(Path("/x"), NameGenerator()).close())
        """
        with self._cv:
            thread = self._thread if self._pid == os.getpid() else None
            self._stopping = True
            self._cv.notify()
        if thread is not None:
            await asyncio.to_thread(thread.join)
        self._thread = None


def _settle(pushes: list[_Push]) -> None:
    """On the event loop: hand each push its key or its error."""
    for push in pushes:
        if push.future.done():
            continue  # the caller was cancelled; the message is whole in new/ or absent
        if push.error is not None:
            push.future.set_exception(push.error)
        else:
            push.future.set_result(str(push.key))
