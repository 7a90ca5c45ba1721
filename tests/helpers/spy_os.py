"""An ``os`` stand-in that records (and can fail or hold) the calls the maildir queue makes.

Installed at the seam ``maildefer.queue.maildir.queue.os`` (and ``writer.os``, with
:meth:`SpyOS.syncfs` as ``writer.sync_filesystem``); every other attribute is the real
``os``. Events are appended from whichever thread makes the call (list.append is atomic),
so the list is the real order of calls across the executor's threads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from maildefer.queue.maildir.writer import sync_filesystem

Fault = Callable[[str], BaseException | None]


class SpyOS:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.flags: dict[str, int] = {}
        self.faults: dict[str, Fault] = {}
        self._fds: dict[int, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _fault(self, op: str, path: str) -> None:
        fault = self.faults.get(op)
        if fault is not None:
            exc = fault(path)
            if exc is not None:
                raise exc

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        p = os.fspath(path)
        self._fault("open", p)
        fd = os.open(path, flags, mode)
        self._fds[fd] = p
        self.flags.setdefault(p, flags)  # the creating open's flags, not a later reopen
        self.events.append(("open", p))
        return fd

    def write(self, fd: int, data: Any) -> int:
        p = self._fds.get(fd, "?")
        self._fault("write", p)
        n = os.write(fd, data)
        self.events.append(("write", p))
        return n

    def fsync(self, fd: int) -> None:
        p = self._fds.get(fd, "?")
        self.events.append(("fsync-start", p))
        self._fault("fsync", p)
        os.fsync(fd)
        self.events.append(("fsync", p))

    def syncfs(self, fd: int) -> None:
        """Stands in for ``maildefer.queue.maildir.writer.sync_filesystem`` (the syncfs seam)."""
        p = self._fds.get(fd, "?")
        self.events.append(("syncfs-start", p))
        self._fault("syncfs", p)
        sync_filesystem(fd)
        self.events.append(("syncfs", p))

    def close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        os.close(fd)

    def link(self, src: Any, dst: Any) -> None:
        self._fault("link", os.fspath(dst))
        os.link(src, dst)
        self.events.append(("link", os.fspath(dst)))

    def unlink(self, path: Any) -> None:
        os.unlink(path)
        self.events.append(("unlink", os.fspath(path)))

    def rename(self, src: Any, dst: Any) -> None:
        os.rename(src, dst)
        self.events.append(("rename", os.fspath(dst)))

    def scandir(self, path: Any) -> Any:
        self.events.append(("scandir", os.fspath(path)))
        return os.scandir(path)

    def listdir(self, path: Any = ".") -> list[str]:
        self.events.append(("listdir", os.fspath(path)))
        return os.listdir(path)
