"""Writing a queued file whose message is in a spool file, without reading it into memory.

``serve`` spools a large message to a file as it arrives (:mod:`maildefer.smtp.spool`);
a push of it to a maildir queue gets a :class:`~maildefer.queue.envelope.FilePayload`.
The writer thread writes its envelope record (hashing the file first if the head was
replaced), the head, and then copies the body from the spool file in the kernel:
``copy_file_range(2)`` (a reflink or an in-kernel copy on one filesystem, which the
default spool directory, the queue's own ``tmp/``, is), else ``sendfile(2)``, else
chunked reads and writes. The file is then fsync'd and linked as any other push
(:mod:`maildefer.queue.maildir.writer`): the same durability, a bounded amount of memory.

Example:
    >>> import tempfile
    >>> from maildefer.queue.envelope import Envelope, FilePayload, unwrap
    >>> from maildefer.queue.spooled import SpooledContent
    >>> spool = tempfile.NamedTemporaryFile()
    >>> _ = spool.write(b"A: 1\\n\\n" + b"x" * 9); spool.flush()
    >>> content = SpooledContent(spool.name, b"A: 1\\n\\n", 6, 9)
    >>> payload = FilePayload(content, Envelope("a@x", ["b"]))
    >>> fd, name = tempfile.mkstemp()
    >>> write_payload(fd, payload); os.close(fd)
    >>> from pathlib import Path
    >>> spool.close(); unwrap(Path(name).read_bytes())[1]
    b'A: 1\\n\\nxxxxxxxxx'
"""

from __future__ import annotations

import errno
import os

from maildefer.queue.envelope import FilePayload

COPY_STEP = 1 << 30
"""Bytes asked of one ``copy_file_range``/``sendfile`` call (the kernel may do fewer)."""

READ_STEP = 1 << 20
"""Bytes per read in the fallback copy: the most memory a copy holds."""

# copy_file_range refuses some pairs of files (across filesystems before Linux 5.3, some
# network and special filesystems); sendfile then, else plain reads.
_NOT_SUPPORTED = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


def write_payload(fd: int, payload: FilePayload) -> None:
    """Write a spooled message's queued file to ``fd``: record, head, then the body.

    Raises:
        OSError: a write failed, or the spool file is gone or shorter than the message.
    """
    _write_all(fd, payload.prefix())
    content = payload.content
    if content.head:
        _write_all(fd, content.head)
    source = os.open(content.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        copy_range(source, fd, content.body_offset, content.body_size)
    finally:
        os.close(source)


def copy_range(source: int, target: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes of ``source`` from ``offset`` to ``target``'s current position.

    Raises:
        OSError: a copy failed, or ``source`` ended first.

    Example:
        >>> import tempfile
        >>> src = tempfile.TemporaryFile(); _ = src.write(b"0123456789"); src.flush()
        >>> dst = tempfile.TemporaryFile()
        >>> copy_range(src.fileno(), dst.fileno(), 2, 5); _ = dst.seek(0); dst.read()
        b'23456'
        >>> src.close(); dst.close()
    """
    left = count
    for step in (_copy_file_range, _sendfile, _read_write):
        try:
            while left > 0:
                done = step(source, target, offset, left)
                if done == 0:
                    raise OSError(errno.EIO, "spool file shorter than its message")
                offset += done
                left -= done
            return
        except OSError as exc:
            if exc.errno not in _NOT_SUPPORTED:
                raise


def _copy_file_range(source: int, target: int, offset: int, left: int) -> int:
    return os.copy_file_range(source, target, min(left, COPY_STEP), offset)


def _sendfile(source: int, target: int, offset: int, left: int) -> int:
    return os.sendfile(target, source, offset, min(left, COPY_STEP))


def _read_write(source: int, target: int, offset: int, left: int) -> int:
    chunk = os.pread(source, min(left, READ_STEP), offset)
    _write_all(target, chunk)
    return len(chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
