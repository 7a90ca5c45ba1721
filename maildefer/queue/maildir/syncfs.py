"""``syncfs(2)`` for the maildir writer: whether it can be trusted here, and the call.

The writer's ``syncfs`` mode flushes a whole batch of files with one ``syncfs`` of the
filesystem holding the queue (see :mod:`maildefer.queue.maildir.writer`). The C library
function is reached through ctypes, which releases the GIL for the call, so other
writer threads keep writing files while the flush runs.

Example:
    >>> import os, tempfile
    >>> fd = os.open(tempfile.mkdtemp(), os.O_RDONLY | os.O_DIRECTORY)
    >>> if syncfs_available():
    ...     sync_filesystem(fd)  # every dirty file of that filesystem is on disk now
    >>> os.close(fd)
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable
from typing import cast


def syncfs_available() -> bool:
    """Whether ``syncfs(2)`` is there and reports writeback errors (Linux 5.8 and later).

    Before 5.8, ``syncfs`` returned 0 whatever happened to the data, so an I/O error
    would go unseen: the writer then fsyncs each file instead.

    Example:
        >>> major, minor = os.uname().release.split(".")[:2]
        >>> syncfs_available() == (sys.platform == "linux" and (int(major), int(minor)) >= (5, 8))
        True
    """
    if not sys.platform.startswith("linux"):
        return False
    release = os.uname().release.split(".")
    try:
        version = (int(release[0]), int(release[1].split("-")[0]))
    except (IndexError, ValueError):
        return False
    return version >= (5, 8) and _libc_syncfs() is not None


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return cast(Callable[[int], int], function)


def sync_filesystem(fd: int) -> None:
    """``syncfs(fd)``: flush every dirty file of the filesystem holding ``fd`` to disk.

    The call releases the GIL (ctypes does) and raises :class:`OSError` for a writeback
    error on that filesystem since ``fd`` was opened or last reported one.

    Example:
        >>> import tempfile
        >>> fd = os.open(tempfile.mkdtemp(), os.O_RDONLY | os.O_DIRECTORY)
        >>> sync_filesystem(fd) if syncfs_available() else None
        >>> os.close(fd)
    """
    function = _libc_syncfs()
    if function is None:
        raise OSError(38, "syncfs is not available")  # ENOSYS
    if function(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
