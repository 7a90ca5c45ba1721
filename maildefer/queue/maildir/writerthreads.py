"""Ending a maildir writer's threads: on release, and on close (async or blocking).

:class:`WriterThreads` is a base of :class:`~maildefer.queue.maildir.writer.MaildirWriter`
(which starts the threads and owns their state): what ends them, kept apart so the
writer module keeps to the write path. No OS call is made here: the writer's own
``os`` (a test's seam, tests/helpers/spy_os.py) sees every one.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from maildefer.queue.maildir.handoff import joined


class WriterThreads:
    """What ends a writer's threads; :class:`MaildirWriter` derives from it.

    Example:
        >>> from maildefer.queue.maildir.writer import MaildirWriter
        >>> issubclass(MaildirWriter, WriterThreads)
        True
    """

    path: Path
    _lock: threading.Lock
    _wake: threading.Condition
    _threads: list[threading.Thread]
    _pid: int
    _stopping: bool
    _released: bool

    def _stopped(self) -> None:
        """After the threads ended: forget them, close the sync fd (the writer's)."""
        raise NotImplementedError

    def release(self) -> None:
        """Its queue is gone: each thread ends once no push waits, without waiting for more.

        Never blocks, from any thread (a finalizer's); a later push still works.

        Example:
            >>> import asyncio, tempfile
            >>> from maildefer.queue.maildir.writer import MaildirWriter, NameGenerator
            >>> d = Path(tempfile.mkdtemp()); (d / "tmp").mkdir(); (d / "new").mkdir()
            >>> writer = MaildirWriter(d, NameGenerator(host="h"), idle=60)
            >>> key = asyncio.run(writer.write(b"a"))
            >>> writer.release()  # MaildirQueue's finalizer, when the queue is dropped
        """
        self._released = True  # each thread reads it before it waits again
        # A finalizer runs wherever the collector does, maybe in a thread holding this
        # lock: never wait for it (idle threads end after IDLE_SECONDS anyway).
        if self._lock.acquire(blocking=False):
            try:
                self._wake.notify_all()
            finally:
                self._lock.release()

    def _stop(self) -> list[threading.Thread]:
        """Ask the threads to end once the pushes waiting are done; the ones to wait for."""
        with self._lock:
            threads = list(self._threads) if self._pid == os.getpid() else []
            self._stopping = True
            self._wake.notify_all()
        return threads

    async def close(self) -> None:
        """Finish the pushes in flight and stop the threads (a later push starts them again).

        Example:
            >>> import asyncio, tempfile
            >>> from maildefer.queue.maildir.writer import MaildirWriter, NameGenerator
            >>> d = Path(tempfile.mkdtemp()); (d / "tmp").mkdir(); (d / "new").mkdir()
            >>> writer = MaildirWriter(d, NameGenerator(host="h"), idle=60)
            >>> async def demo():
            ...     await writer.write(b"a"); await writer.close()
            ...     key = await writer.write(b"b")  # the threads start again
            ...     await writer.close()
            ...     mine = f"maildefer-writer:{d.name}:"
            ...     alive = [t for t in threading.enumerate() if t.name.startswith(mine)]
            ...     return (d / "new" / key).exists(), alive
            >>> asyncio.run(demo())
            (True, [])
        """
        threads = self._stop()
        if threads:
            await joined(threads)
        self._stopped()

    def close_sync(self) -> None:
        """:meth:`close` for synchronous code: blocks until the threads have ended.

        Example:
            >>> import asyncio, tempfile
            >>> from maildefer.queue.maildir.writer import MaildirWriter, NameGenerator
            >>> d = Path(tempfile.mkdtemp()); (d / "tmp").mkdir(); (d / "new").mkdir()
            >>> writer = MaildirWriter(d, NameGenerator(host="h"), idle=60)
            >>> key = asyncio.run(writer.write(b"a")); writer.close_sync()
            >>> mine = f"maildefer-writer:{d.name}:"
            >>> [t for t in threading.enumerate() if t.name.startswith(mine)]
            []
        """
        for thread in self._stop():
            thread.join()
        self._stopped()
