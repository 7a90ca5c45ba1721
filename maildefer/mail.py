"""Messages: :class:`MailRequest` (mail received) and :class:`MailResponse` (mail to send).

A ``MailRequest`` keeps the bytes exactly as received (``raw``) beside the SMTP envelope,
and parses them into a stdlib :class:`email.message.EmailMessage` only when a handler asks
(``message.email``, ``message["Subject"]``): messages that are only moved to a queue are
never parsed. Header access never raises, however broken the message.

Example:
    >>> raw = b"Subject: hi\\r\\n\\r\\nbody\\r\\n"
    >>> m = MailRequest(raw, mail_from="a@x.org", rcpt_tos=["b@y.org"])
    >>> m["Subject"], m.rcpt_to, m.body().strip()
    ('hi', 'b@y.org', 'body')
"""

from __future__ import annotations

import email.header
import email.policy
import email.utils
import time
from dataclasses import dataclass, field, replace
from email.message import EmailMessage, Message
from email.parser import BytesParser
from functools import cached_property


@dataclass(eq=False)
class MailRequest:
    """A received message: the envelope and the raw bytes, parsed lazily.

    Args:
        raw: the message bytes exactly as received (after SMTP dot-unstuffing).
        mail_from: the envelope sender (``MAIL FROM``); ``""`` for the null sender.
        rcpt_tos: every envelope recipient of the transaction.
        rcpt_to: the recipient this handler call is for (the first one by default).
        peer: the client's address, ``"host:port"``, or ``""`` when not from SMTP.
        received_at: when the message was accepted (Unix time).
        key: in a worker, the queue key that ``push`` returned; ``None`` in ``serve``.
        attempt: in a worker, the attempt number (1 for the first); ``None`` in ``serve``.
        queued_at: in a worker, when the message was first queued (Unix time, the first
            ``push``, not the latest retry); ``None`` in ``serve`` or when unknown (a file
            another program dropped in with a name that carries no time).

    The worker sets the last three on the message of each claim.

    Example:
        >>> m = MailRequest(b"\\n", mail_from="a@x.org", rcpt_tos=["b@y.org", "c@y.org"])
        >>> m.for_recipient("c@y.org").rcpt_to
        'c@y.org'

        A worker handler that keeps a record per message and attempt:

        >>> async def START(message):
        ...     if message.attempt is not None and message.attempt > 1:
        ...         print(f"{message.key}: attempt {message.attempt}")
        >>> import asyncio
        >>> asyncio.run(START(MailRequest(b"\\n", key="1700000000.M1P2Q3.h", attempt=2)))
        1700000000.M1P2Q3.h: attempt 2
    """

    raw: bytes
    mail_from: str = ""
    rcpt_tos: list[str] = field(default_factory=list)
    rcpt_to: str = ""
    peer: str = ""
    received_at: float = field(default_factory=time.time)
    key: str | None = None
    attempt: int | None = None
    queued_at: float | None = None

    def __post_init__(self) -> None:
        if not self.rcpt_to and self.rcpt_tos:
            self.rcpt_to = self.rcpt_tos[0]

    def for_recipient(self, rcpt_to: str) -> MailRequest:
        """The same message addressed to one of its recipients (shares the parsed form).

        Example:
            >>> m = MailRequest(b"\\n", rcpt_tos=["a@x", "b@x"])
            >>> m.for_recipient("b@x").rcpt_tos
            ['a@x', 'b@x']
        """
        copy = replace(self, rcpt_to=rcpt_to)
        if "email" in self.__dict__:
            copy.__dict__["email"] = self.__dict__["email"]
        return copy

    @cached_property
    def email(self) -> EmailMessage:
        """The message parsed by the stdlib ``email`` package (modern policy).

        Example:
            >>> MailRequest(b"Subject: x\\n\\ny\\n").email.get_content().strip()
            'y'
        """
        parsed = BytesParser(policy=email.policy.default).parsebytes(self.raw)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @cached_property
    def _legacy(self) -> Message:
        # compat32 keeps headers as plain strings: the fallback when the modern policy's
        # header parser raises on a pathological header (it does, for some defects).
        return BytesParser(policy=email.policy.compat32).parsebytes(self.raw)

    def __getitem__(self, name: str) -> str | None:
        """A header, decoded to text; ``None`` when absent. Never raises.

        Example:
            >>> MailRequest(b"Subject: =?utf-8?q?caf=C3=A9?=\\n\\n")["Subject"]
            'café'
        """
        try:
            value = self.email[name]
            return None if value is None else str(value)
        except Exception:
            raw_value = self._legacy[name]
            if raw_value is None:
                return None
            return _decode_legacy_header(str(raw_value))

    def get(self, name: str, default: str | None = None) -> str | None:
        """Like ``self[name]`` with a default.

        Example:
            >>> MailRequest(b"\\n").get("X-Missing", "none")
            'none'
        """
        value = self[name]
        return default if value is None else value

    def keys(self) -> list[str]:
        """The header names, in order.

        Example:
            >>> MailRequest(b"A: 1\\nB: 2\\n\\n").keys()
            ['A', 'B']
        """
        return list(self._legacy.keys())

    def body(self) -> str:
        """The text body: the plain part if there is one, else the first text part.

        Undecodable bytes are replaced rather than raising.

        Example:
            >>> MailRequest(b"Content-Type: text/plain\\n\\nhello\\n").body()
            'hello\\n'
        """
        try:
            part = self.email.get_body(preferencelist=("plain", "html"))
            if part is not None:
                content = part.get_content()
                if isinstance(content, str):
                    return content
        except Exception:
            pass
        payload = self._legacy.get_payload(decode=True)
        if isinstance(payload, bytes):
            charset = self._legacy.get_content_charset() or "utf-8"
            try:
                return payload.decode(charset, errors="replace")
            except LookupError:
                return payload.decode("utf-8", errors="replace")
        return ""

    def __repr__(self) -> str:
        return (
            f"<MailRequest from={self.mail_from!r} to={self.rcpt_to!r} "
            f"rcpts={len(self.rcpt_tos)} bytes={len(self.raw)}>"
        )


def _decode_legacy_header(value: str) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except Exception:
        return value


def addresses_from_headers(message: MailRequest, *names: str) -> list[str]:
    """The addresses named in some headers, for files queued without an envelope.

    Example:
        >>> m = MailRequest(b"To: A <a@x.org>, b@x.org\\nCc: c@x.org\\n\\n")
        >>> addresses_from_headers(m, "To", "Cc")
        ['a@x.org', 'b@x.org', 'c@x.org']
    """
    values: list[str] = []
    for name in names:
        try:
            values.extend(str(v) for v in (message._legacy.get_all(name) or []))
        except Exception:
            continue
    return [addr for _, addr in email.utils.getaddresses(values) if addr]


class MailResponse:
    """A message to send: a reply or a notification, built from a few fields.

    Args:
        To: recipient address(es), a string or a list.
        From: sender address.
        Subject: subject line.
        Body: plain text body.
        Html: optional HTML alternative.
        headers: extra headers.

    Example:
        >>> r = MailResponse(To="a@x.org", From="blog@y.org", Subject="Hi", Body="Thanks")
        >>> r.to_message()["To"]
        'a@x.org'
    """

    def __init__(
        self,
        To: str | list[str] = "",
        From: str = "",
        Subject: str = "",
        Body: str = "",
        Html: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.to = [To] if isinstance(To, str) else list(To)
        self.from_ = From
        self.subject = Subject
        self.body = Body
        self.html = Html
        self.headers = dict(headers or {})
        self.attachments: list[tuple[bytes, str, str]] = []

    def attach(self, data: bytes, filename: str, content_type: str) -> None:
        """Add an attachment.

        Example:
            >>> r = MailResponse(To="a@x", From="b@x", Body="see file")
            >>> r.attach(b"1,2", "t.csv", "text/csv")
            >>> r.to_message().is_multipart()
            True
        """
        self.attachments.append((data, filename, content_type))

    def to_message(self) -> EmailMessage:
        """The response as a stdlib message, with Date and Message-ID.

        Example:
            >>> MailResponse(To="a@x", From="b@x", Subject="s").to_message()["Subject"]
            's'
        """
        msg = EmailMessage()
        msg["From"] = self.from_
        msg["To"] = ", ".join(self.to)
        msg["Subject"] = self.subject
        msg["Date"] = email.utils.formatdate(localtime=True)
        msg["Message-ID"] = email.utils.make_msgid()
        for name, value in self.headers.items():
            msg[name] = value
        msg.set_content(self.body)
        if self.html is not None:
            msg.add_alternative(self.html, subtype="html")
        for data, filename, content_type in self.attachments:
            maintype, _, subtype = content_type.partition("/")
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
        return msg

    def as_bytes(self) -> bytes:
        """The response serialized with CRLF line ends, ready for SMTP.

        Example:
            >>> MailResponse(To="a@x", From="b@x").as_bytes().startswith(b"From: b@x\\r\\n")
            True
        """
        return self.to_message().as_bytes(policy=email.policy.SMTP)
