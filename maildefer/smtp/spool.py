"""Bounded memory under big mail: one budget for message bytes, and a spool for the rest.

Every session's DATA goes through a :class:`MessageSink`. A message stays in memory
while it is at most ``[server] spool_threshold`` bytes and the :class:`MemoryBudget`
(``[server] memory_budget``, shared by all sessions of the listener) has room for it;
otherwise what it holds so far, and the rest as it arrives, goes to a spool file in
``CHUNK``-sized writes made by a small thread pool (one hop off the loop per chunk), and
its budget is released. A spooling session holds at most one chunk in memory, reserved
from the budget as it fills; when the budget has no room, the session writes what it
has at once instead of waiting, so no session is ever refused for memory: ``452 4.3.1``
(RFC 5321 §4.5.3.1.9) is the answer only when the spool cannot be written (a disk
error), or at MAIL FROM when an announced ``SIZE=`` does not fit in the spool's free
space. What memory the budget does not cover: per connection, one read of the stream
(its buffer limit) and the line being handled, and whatever a handler loads from a
spooled message (``message.raw``, see :class:`~maildefer.queue.spooled.SpooledMailRequest`).

Spool files are named like maildir keys (``<sec>.M<usec>P<pid>Q<seq>R<random>.<host>``)
in the spool directory (by default the first maildir queue's ``tmp/``): a push copies
one into the queue on the same filesystem, and after a crash of ``serve`` the queue's
recovery deletes it at once (its pid is gone; ``clean_tmp``). A session removes its file
once its DATA reply is sent, or when the client goes away mid-DATA.

Example:
    >>> import asyncio, tempfile
    >>> from pathlib import Path
    >>> spool = Spool(Path(tempfile.mkdtemp()), MemoryBudget(1 << 20), threshold=1 << 16)
    >>> async def receive(lines):
    ...     sink = spool.sink()
    ...     for line in lines:
    ...         sink.lines.append(line)
    ...         await sink.overflow(len(line))
    ...     result = await sink.finish()
    ...     kept = type(result).__name__, spool.budget.used > 0
    ...     sink.close()
    ...     return kept, spool.budget.used
    >>> asyncio.run(receive([b"Subject: hi\\r\\n", b"\\r\\n", b"small\\r\\n"]))
    (('bytes', True), 0)
    >>> asyncio.run(receive([b"Subject: big\\r\\n", b"\\r\\n"] + [b"x" * 998 + b"\\r\\n"] * 100))
    (('SpooledContent', False), 0)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import structlog
from aiosmtpd.smtp import Envelope

from maildefer.mail import header_end
from maildefer.queue.keys import NameGenerator, escape_host
from maildefer.queue.maildir.recovery import clean_tmp
from maildefer.queue.maildir.writer import write_all
from maildefer.queue.spooled import SpooledContent
from maildefer.settings import ServerSettings, Settings

log = structlog.get_logger("maildefer.smtp")

GRANULE = 64 * 1024
"""Budget is reserved in steps of this many bytes (one call per step, not per line)."""

CHUNK = 1 << 20
"""A spooling session writes when it holds this much (fewer, larger writes)."""

THREADS = 4
"""Spool writer threads: writes of many sessions overlap, and a slow disk stalls no loop."""

REPLY_NO_STORAGE = "452 4.3.1 Error: insufficient system storage"

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


class MemoryBudget:
    """Message bytes held in memory across all sessions: reserved, released, capped.

    Used from the event loop's thread only (no lock).

    Args:
        limit: the most bytes that may be reserved at once.

    Example:
        >>> budget = MemoryBudget(100)
        >>> budget.reserve(60), budget.reserve(60), budget.used
        (True, False, 60)
        >>> budget.release(60); budget.used, budget.peak
        (0, 60)
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0

    def reserve(self, size: int) -> bool:
        """Take ``size`` bytes of the budget; ``False`` (nothing taken) if they do not fit."""
        if self.used + size > self.limit:
            return False
        self.used += size
        self.peak = max(self.peak, self.used)
        return True

    def release(self, size: int) -> None:
        """Give back bytes taken with :meth:`reserve`."""
        self.used -= size


class Spool:
    """Where a listener's sessions put message data: the budget and the spool directory.

    Args:
        directory: where spool files are made (created if missing).
        budget: the listener's memory budget.
        threshold: a message larger than this is spooled even if the budget has room.
        host: the host name in spool file names (the queues' recovery matches it).
        statvfs: ``os.statvfs`` (a test's seam for the free-space check).

    Example:
        >>> import io, tempfile
        >>> from maildefer import logs; logs.configure(stream=io.StringIO())
        >>> spool = Spool(Path(tempfile.mkdtemp()), MemoryBudget(1 << 20), threshold=1 << 16)
        >>> spool.size_refusal(1000), spool.size_refusal(2**62)
        (None, '452 4.3.1 Error: insufficient system storage')
    """

    def __init__(
        self,
        directory: Path,
        budget: MemoryBudget,
        threshold: int,
        *,
        host: str | None = None,
        statvfs: Callable[[Path], os.statvfs_result] = os.statvfs,
    ) -> None:
        self.directory = directory
        self.budget = budget
        self.threshold = threshold
        self.names = NameGenerator(host=host or socket.gethostname())
        self._statvfs = statvfs
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def sink(self) -> MessageSink:
        """A new sink for one DATA (the module example uses it)."""
        return MessageSink(self)

    def size_refusal(self, size: int) -> str | None:
        """``452 4.3.1`` when an announced ``SIZE=`` cannot be spooled; else ``None``.

        A message that small stays in memory; a larger one needs that much free space
        in the spool directory (the queue it is pushed to has its own guard).
        """
        if size <= self.threshold:
            return None
        try:
            stats = self._statvfs(self.directory)
        except OSError:
            return REPLY_NO_STORAGE
        if stats.f_bavail * stats.f_frsize < size:
            log.info("size_refused", size=size, free=stats.f_bavail * stats.f_frsize)
            return REPLY_NO_STORAGE
        return None

    def submit(self, job: Callable[[], None]) -> concurrent.futures.Future[None]:
        """Run a blocking spool job on the spool's threads (started on first use)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                THREADS, thread_name_prefix="maildefer-spool"
            )
        return self._executor.submit(job)

    def close(self) -> None:
        """Let the threads end once their jobs are done (a later spool starts them again).

        Example:
            >>> import tempfile
            >>> Spool(Path(tempfile.mkdtemp()), MemoryBudget(1 << 20), 1 << 16).close()
        """
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


class MessageSink:
    """One DATA's bytes: in :attr:`lines` under the budget, else in a spool file.

    The session appends each (dot-unstuffed) line to :attr:`lines` and, whenever the
    message's byte count passes :attr:`mark`, awaits :meth:`overflow`: that reserves more
    budget, or writes the lines to the spool and empties the list. :meth:`finish` gives
    the message (bytes, or a :class:`SpooledContent`); :meth:`close` releases everything
    (the budget, the file) and must run whatever happened (the module example).

    Args:
        spool: the listener's spool.
    """

    def __init__(self, spool: Spool) -> None:
        self.lines: list[bytes] = []
        self.mark = 0
        self.failed = False  # the spool could not be written: the reply is 452 4.3.1
        self._spool = spool
        self._reserved = 0
        self._flushed = 0  # the byte count overflow() was given at the last write
        self._written = 0  # bytes in the file (dot-unstuffed: not the same count)
        self._fd: int | None = None
        self._path: str | None = None
        self._hasher: hashlib._Hash | None = None  # on the first write: most mail never is
        self._head: bytes | None = None
        self._writing: concurrent.futures.Future[None] | None = None
        self._spooling = False

    @property
    def spooled(self) -> bool:
        """Whether the message goes to a spool file (it is, or will be, on disk)."""
        return self._spooling

    async def overflow(self, total: int) -> None:
        """The message holds ``total`` bytes, past :attr:`mark`: reserve more, or spool.

        Raises:
            asyncio.CancelledError: the session was cancelled during a write (the
                file is removed by :meth:`close`).
        """
        budget = self._spool.budget
        if self.failed:
            self.lines.clear()  # drained to the terminator, then 452: nothing is kept
            self.mark = total + GRANULE
            return
        # Spooling: hold up to a chunk, as the budget allows, then write it; else in memory
        # while small enough.
        room = total - self._flushed < CHUNK if self._spooling else total <= self._spool.threshold
        if room and budget.reserve(GRANULE):
            self._reserved += GRANULE
        else:
            await self._flush(total)
        self.mark = self._flushed + self._reserved

    async def finish(self) -> bytes | SpooledContent | None:
        """The message, after the terminator; ``None`` if the spool failed (say 452)."""
        if not self._spooling:
            data = b"".join(self.lines)
            self.lines.clear()
            return data
        if self.lines and not self.failed:
            await self._flush(self._flushed + sum(map(len, self.lines)))
        if self.failed or self._path is None:
            return None
        head = self._head or b""
        assert self._hasher is not None  # a spool file was written (its path is set)
        digest = self._hasher.hexdigest()
        return SpooledContent(self._path, head, len(head), self._written - len(head), digest)

    def discard(self) -> None:
        """Drop what was received (the message is refused): the lines and the file."""
        self.lines.clear()
        self._release()
        self._remove_file()

    def close(self) -> None:
        """Release the budget and remove the spool file: the DATA is over, however."""
        self.discard()

    def _release(self) -> None:
        self._spool.budget.release(self._reserved)
        self._reserved = 0

    async def _flush(self, total: int) -> None:
        self._spooling = True
        chunk = b"".join(self.lines)
        self.lines.clear()
        if self._head is None:
            end = header_end(chunk)
            # The header section is kept in memory only if it ends in the first chunk
            # (else head is b"" and the whole message counts as the body).
            ended = end < len(chunk) or chunk.endswith((b"\n\n", b"\n\r\n")) or end <= 2
            self._head = chunk[:end] if ended else b""
        job = self._spool.submit(lambda: self._write(chunk))
        # Kept while the job may run: a session cancelled meanwhile (the client went away)
        # leaves it to the job's end to remove the file (see _remove_file).
        self._writing = job
        try:
            await asyncio.wrap_future(job)
        except OSError as exc:
            log.error("spool_failed", error=str(exc))
            self.failed = True
        self._writing = None
        if self.failed:
            self._remove_file()
        self._flushed = total
        self._release()

    def _write(self, chunk: bytes) -> None:
        """In a spool thread: create the file (first chunk), hash and write ``chunk``."""
        if self._fd is None:
            for _ in range(100):
                path = f"{self._spool.directory}/{self._spool.names.next_key()}"
                try:
                    self._fd = os.open(path, _CREATE, 0o600)
                except FileExistsError:
                    continue
                except FileNotFoundError:  # the directory, made on first use
                    os.makedirs(self._spool.directory, exist_ok=True)
                    self._fd = os.open(path, _CREATE, 0o600)
                self._path = path
                break
            else:
                raise OSError(f"{self._spool.directory}: no free spool file name")
        if self._hasher is None:
            self._hasher = hashlib.sha256()
        self._hasher.update(chunk)
        write_all(self._fd, chunk)
        self._written += len(chunk)

    def _remove_file(self) -> None:
        writing = self._writing
        if writing is not None and not writing.done():
            # A write still runs in a spool thread (the session was cancelled during it):
            # the file it may be creating goes when it ends, not under it.
            writing.add_done_callback(lambda _: self._remove_now())
        else:
            self._remove_now()

    def _remove_now(self) -> None:
        path, self._path = self._path, None
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def default_spool(settings: ServerSettings) -> Spool:
    """A spool for a listener of these settings: ``spool_dir``, else ``$TMPDIR/maildefer-spool``.

    ``serve`` makes its own with :func:`spool_for`; this one serves tests and the log
    server (a relative ``spool_dir`` is taken as it is).

    Example:
        >>> default_spool(ServerSettings(spool_dir="/srv/spool")).directory
        PosixPath('/srv/spool')
    """
    directory = settings.spool_dir or Path(tempfile.gettempdir()) / "maildefer-spool"
    return Spool(directory, MemoryBudget(settings.memory_budget), settings.spool_threshold)


def spool_for(settings: Settings) -> Spool:
    """``serve``'s spool: ``[server] spool_dir``, else the first maildir queue's ``tmp/``.

    Without either (only amqp queues), ``$TMPDIR/maildefer-spool``. Files an earlier
    ``serve`` on this host left there when it crashed are deleted now (the queue's own
    recovery does the same for its ``tmp/``), and any file untouched for 36 hours: the
    directory must be maildefer's own.

    Example:
        >>> import tempfile
        >>> s = Settings(root=Path(tempfile.mkdtemp()), queues={"p": {"path": "run/p"}})
        >>> spool_for(s).directory.relative_to(s.root)
        PosixPath('run/p/tmp')
    """
    server = settings.server
    maildirs = [q.path for q in settings.queues.values() if "://" not in q.path]
    if server.spool_dir is not None:
        directory = settings.resolve(server.spool_dir)
    elif maildirs:
        # A push copies the spool file within one filesystem (copy_file_range), and the
        # queue's recovery reaps what a crash left.
        directory = settings.resolve(maildirs[0]) / "tmp"
    else:
        directory = Path(tempfile.gettempdir()) / "maildefer-spool"
    directory.mkdir(parents=True, exist_ok=True)
    spool = Spool(directory, MemoryBudget(server.memory_budget), server.spool_threshold)
    clean_tmp(directory, escape_host(spool.names.host))
    return spool


def attach(envelope: Envelope, content: bytes | SpooledContent) -> None:
    """Hand a received message from the session to the policy, on its aiosmtpd envelope.

    Bytes are the envelope's ``content`` as aiosmtpd has it; a spooled message is put
    beside it (``content`` stays ``None``: the bytes are not in memory).

    Example:
        >>> env = Envelope()
        >>> attach(env, SpooledContent("/spool/f", b"", 0, 0)); spooled_content(env).path
        '/spool/f'
        >>> attach(env, b"x"); env.original_content, spooled_content(env)
        (b'x', None)
    """
    if isinstance(content, bytes):
        envelope.content = envelope.original_content = content
        vars(envelope).pop(_ATTRIBUTE, None)
    else:
        vars(envelope)[_ATTRIBUTE] = content


def spooled_content(envelope: object) -> SpooledContent | None:
    """The spooled message :func:`attach` put on an envelope, or ``None`` (in memory).

    Example:
        >>> import types
        >>> spooled_content(types.SimpleNamespace()) is None
        True
    """
    content = vars(envelope).get(_ATTRIBUTE)
    return content if isinstance(content, SpooledContent) else None


_ATTRIBUTE = "maildefer_spooled"
