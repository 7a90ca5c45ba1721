"""A received message kept in a file: what ``serve`` hands handlers for a large message.

``serve`` keeps a message in memory while it is small and ``[server] memory_budget``
allows; past that it is spooled to a file as it arrives (:mod:`maildefer.smtp.spool`).
Handlers still get a :class:`~maildefer.mail.MailRequest`, a :class:`SpooledMailRequest`,
whose header section is in memory and whose body stays in the file:
:meth:`~maildefer.queue.maildir.MaildirQueue.push` copies the file into the queue without
reading it into memory (:mod:`maildefer.queue.maildir.files`).

Here, in the queue folder, because both sides use it: the SMTP side builds it and the
queue's envelope code (:func:`maildefer.queue.envelope.push_parts`) streams it.

Example:
    >>> import tempfile
    >>> f = tempfile.NamedTemporaryFile(); _ = f.write(b"Subject: s\\n\\nbig\\n"); f.flush()
    >>> m = SpooledMailRequest(SpooledContent(f.name, b"Subject: s\\n\\n", 12, 4))
    >>> m["Subject"], m.content.size
    ('s', 16)
    >>> f.close()
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from functools import cached_property
from typing import Any

from maildefer.mail import MailRequest

CHUNK = 1 << 20
"""Bytes per read when a spooled message is hashed or read back."""


class SpooledContent:
    """A message in a spool file: the head in memory, the body in the file.

    The message is ``head`` followed by ``body_size`` bytes of ``path`` from
    ``body_offset``. The file belongs to the SMTP session: it is removed once the DATA
    reply is sent (and reaped after a crash, see docs/operations.md).

    Args:
        path: the spool file.
        head: the header section, in memory.
        body_offset: where the body starts in the file.
        body_size: the body's length.
        digest: the sha256 (hex) of the whole message, when known (the spool hashed it).

    Example:
        >>> import tempfile
        >>> f = tempfile.NamedTemporaryFile(); _ = f.write(b"A: 1\\n\\nbody\\n"); f.flush()
        >>> c = SpooledContent(f.name, b"A: 1\\n\\n", 6, 5)
        >>> c.read(), c.with_head(b"B: 2\\n\\n").read(), c.size
        (b'A: 1\\n\\nbody\\n', b'B: 2\\n\\nbody\\n', 11)
        >>> f.close()
    """

    __slots__ = ("body_offset", "body_size", "digest", "head", "path")

    def __init__(
        self, path: str, head: bytes, body_offset: int, body_size: int, digest: str | None = None
    ) -> None:
        self.path, self.head, self.digest = path, head, digest
        self.body_offset, self.body_size = body_offset, body_size

    @property
    def size(self) -> int:
        """The message's length in bytes (the class example shows it)."""
        return len(self.head) + self.body_size

    def with_head(self, head: bytes) -> SpooledContent:
        """The same body after another head (the class example shows it)."""
        return SpooledContent(self.path, head, self.body_offset, self.body_size)

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The message in pieces of at most ``size`` bytes: the head, then the file's.

        Raises:
            OSError: the file is gone or shorter than the message.

        Example:
            >>> import tempfile
            >>> f = tempfile.NamedTemporaryFile(); _ = f.write(b"xyz"); f.flush()
            >>> list(SpooledContent(f.name, b"h", 1, 2).chunks(1))
            [b'h', b'y', b'z']
            >>> f.close()
        """
        if self.head:
            yield self.head
        with open(self.path, "rb", buffering=0) as file:
            file.seek(self.body_offset)
            left = self.body_size
            while left > 0:
                chunk = file.read(min(size, left))
                if not chunk:
                    raise OSError(f"{self.path}: spool file shorter than its message")
                left -= len(chunk)
                yield chunk

    def read(self) -> bytes:
        """The whole message, read into memory (the class example shows it)."""
        return b"".join(self.chunks())

    def sha256(self) -> str:
        """The sha256 (hex) of the message: the spool's, else hashed from the file once.

        Blocking (it may read the file): called from a writer thread.

        Example:
            >>> import tempfile
            >>> f = tempfile.NamedTemporaryFile(); _ = f.write(b"xyz"); f.flush()
            >>> SpooledContent(f.name, b"", 0, 3).sha256() == hashlib.sha256(b"xyz").hexdigest()
            True
            >>> f.close()
        """
        if self.digest is None:
            hasher = hashlib.sha256()
            for chunk in self.chunks():
                hasher.update(chunk)
            self.digest = hasher.hexdigest()
        return self.digest


class SpooledMailRequest(MailRequest):
    """A :class:`~maildefer.mail.MailRequest` whose bytes are in a spool file.

    Headers (``message["Subject"]``, :meth:`keys`, :attr:`head`) come from the head in
    memory. ``raw``, ``email`` and ``body()`` read the whole message into memory on first
    use and keep it for this request: that memory is outside ``[server] memory_budget``,
    so a handler that only queues a message should not touch them (``Queue.push`` to a
    maildir streams the file; an amqp push reads ``raw``). Setting ``raw`` replaces the
    message with those bytes. The file is removed after the DATA reply: a handler that
    keeps the message past its return must read it first.

    Args:
        content: the spooled message.
        fields: the envelope, as :class:`~maildefer.mail.MailRequest` takes it.

    Example:
        >>> import tempfile
        >>> f = tempfile.NamedTemporaryFile(); _ = f.write(b"Subject: s\\n\\nbig\\n"); f.flush()
        >>> c = SpooledContent(f.name, b"Subject: s\\n\\n", 12, 4)
        >>> m = SpooledMailRequest(c, rcpt_tos=["a@x", "b@x"])
        >>> m.for_recipient("b@x").rcpt_to, m.raw
        ('b@x', b'Subject: s\\n\\nbig\\n')
        >>> m.replace_head(b"X: 1\\n\\n"); m.content.read(), m.head, m["X"]
        (b'X: 1\\n\\nbig\\n', b'X: 1\\n\\n', '1')
        >>> f.close()
    """

    def __init__(self, content: SpooledContent, **fields: Any) -> None:
        super().__init__(b"", **fields)
        self.__dict__["content"] = content
        self.__dict__["_loaded"] = None

    @property
    def content(self) -> SpooledContent | None:
        """The spooled message; ``None`` once ``raw`` was set to bytes."""
        content: SpooledContent | None = self.__dict__["content"]
        return content

    @property
    def raw(self) -> bytes:
        """The whole message, read from the spool file on first use (see the class)."""
        loaded: bytes | None = self.__dict__.get("_loaded")
        if loaded is None:
            content = self.__dict__.get("content")
            loaded = b"" if content is None else content.read()
            self.__dict__["_loaded"] = loaded
        return loaded

    @raw.setter
    def raw(self, value: bytes) -> None:
        # MailRequest's __init__ sets raw too (to b""): the content set after it wins.
        self.__dict__["_loaded"] = value
        self.__dict__["content"] = None

    @property
    def head(self) -> bytes:
        """The header section: from memory while the message is spooled."""
        content = self.content
        return super().head if content is None else content.head

    def replace_head(self, new_head: bytes) -> None:
        """As :meth:`MailRequest.replace_head`; the body stays in the file."""
        content = self.content
        if content is None:
            super().replace_head(new_head)
            return
        self.__dict__["content"] = content.with_head(new_head)
        self.__dict__["_loaded"] = None
        self._forget_parsed()

    @cached_property
    def _headers(self) -> MailRequest:
        return MailRequest(self.head)

    def __getitem__(self, name: str) -> str | None:
        """A header, from the head only (the class example shows it)."""
        return self._headers[name] if self.content is not None else super().__getitem__(name)

    def keys(self) -> list[str]:
        """The header names, from the head only.

        Example:
            >>> SpooledMailRequest(SpooledContent("/nonexistent", b"A: 1\\n\\n", 0, 0)).keys()
            ['A']
        """
        return self._headers.keys() if self.content is not None else super().keys()

    def for_recipient(self, rcpt_to: str) -> MailRequest:
        """The same message for one recipient, sharing the spool file."""
        twin = copy.copy(self)
        twin.rcpt_to = rcpt_to
        return twin

    def __repr__(self) -> str:
        content = self.content
        size = len(self.raw) if content is None else content.size
        return (
            f"<SpooledMailRequest from={self.mail_from!r} to={self.rcpt_to!r} "
            f"rcpts={len(self.rcpt_tos)} bytes={size}>"
        )
