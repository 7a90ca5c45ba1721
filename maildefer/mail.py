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

import contextlib
import email.header
import email.policy
import email.utils
import mimetypes
import os
import time
from dataclasses import dataclass, field, replace
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.parser import BytesParser
from functools import cached_property
from pathlib import Path

from maildefer.auth import AuthResults


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
        auth: the SPF/DKIM/DMARC verdicts (``serve`` with ``[auth] verify = true``);
            ``None`` where no verification ran (:mod:`maildefer.auth`).

    The worker sets ``key``, ``attempt`` and ``queued_at`` on the message of each claim.

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
    auth: AuthResults | None = None

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

    @property
    def head(self) -> bytes:
        """The header section as received, through the empty line that ends it.

        Example:
            >>> MailRequest(b"A: 1\\r\\n\\r\\nbody\\r\\n").head
            b'A: 1\\r\\n\\r\\n'
        """
        raw = self.raw
        return raw[: header_end(raw)]

    def replace_head(self, new_head: bytes) -> None:
        """Make the message ``new_head`` followed by the body (what is stored and pushed).

        Example:
            >>> m = MailRequest(b"A: 1\\n\\nbody\\n")
            >>> m.replace_head(b"X: 0\\nA: 1\\n\\n"); m.raw, m["X"]
            (b'X: 0\\nA: 1\\n\\nbody\\n', '0')
        """
        raw = self.raw
        self.raw = new_head + raw[header_end(raw) :]
        self._forget_parsed()

    def _forget_parsed(self) -> None:
        for name in ("email", "_legacy", "_headers"):
            self.__dict__.pop(name, None)

    def __repr__(self) -> str:
        return (
            f"<MailRequest from={self.mail_from!r} to={self.rcpt_to!r} "
            f"rcpts={len(self.rcpt_tos)} bytes={len(self.raw)}>"
        )


def header_end(raw: bytes) -> int:
    """Where the header section of ``raw`` ends: after its empty line (or at the end).

    Example:
        >>> header_end(b"A: 1\\r\\n\\r\\nbody"), header_end(b"\\nbody"), header_end(b"A: 1")
        (8, 1, 4)
    """
    if raw[:1] == b"\n" or raw[:2] == b"\r\n":
        return 1 if raw[:1] == b"\n" else 2
    crlf = raw.find(b"\n\r\n")
    end = len(raw) if crlf < 0 else crlf + 3
    lf = raw.find(b"\n\n", 0, end)  # only before it: a CRLF message is not scanned twice
    return end if lf < 0 else lf + 2


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

    Lamson's ``MailResponse``: nothing is encoded until :meth:`to_message` (or
    :meth:`as_bytes`), so fields and headers can change until then. Non-ASCII header
    text is RFC 2047-encoded and non-ASCII domains IDNA-encoded, both by the stdlib; an
    address with a non-ASCII local part makes the message need SMTPUTF8 (RFC 6531, see
    :attr:`smtputf8`). ``Bcc`` recipients are in :attr:`rcpt_tos` but never in
    :meth:`as_bytes` (what is queued or sent).

    Args:
        To: recipient address(es), a string (comma-separated) or a list.
        From: sender address.
        Subject: subject line.
        Body: plain text body.
        Html: optional HTML alternative (then the message is ``multipart/alternative``).
        headers: extra headers.
        Cc: carbon-copy recipient(s).
        Bcc: blind-copy recipient(s): in the envelope, never in the stored headers.

    Example:
        >>> r = MailResponse(To="a@x.org", From="blog@y.org", Subject="Hi", Body="Thanks")
        >>> r["Reply-To"] = "help@y.org"
        >>> r.to_message()["To"], r["Reply-To"]
        ('a@x.org', 'help@y.org')
    """

    def __init__(
        self,
        To: str | list[str] = "",
        From: str = "",
        Subject: str = "",
        Body: str = "",
        Html: str | None = None,
        headers: dict[str, str] | None = None,
        *,
        Cc: str | list[str] = "",
        Bcc: str | list[str] = "",
    ) -> None:
        self.to = _listed(To)
        self.cc = _listed(Cc)
        self.bcc = _listed(Bcc)
        self.from_ = From
        self.subject = Subject
        self.body = Body
        self.html = Html
        self.headers = dict(headers or {})
        self.attachments: list[tuple[bytes, str, str]] = []

    # -- headers, dict-style (Lamson: msg["Reply-To"] = ...) ------------------------------

    def __getitem__(self, name: str) -> str | None:
        """A header's value as given (not encoded); ``None`` when not set.

        Example:
            >>> MailResponse(To=["a@x", "b@x"], Subject="s")["to"]
            'a@x, b@x'
        """
        field = _FIELDS.get(name.lower())
        if field is not None:
            value = getattr(self, field)
            return (", ".join(value) or None) if isinstance(value, list) else (value or None)
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)

    def __setitem__(self, name: str, value: str) -> None:
        """Set a header (``To``, ``Cc``, ``Bcc`` take comma-separated addresses).

        Example:
            >>> r = MailResponse(From="b@x", To="a@x"); r["Cc"] = "c@x, d@x"; r.rcpt_tos
            ['a@x', 'c@x', 'd@x']
        """
        field = _FIELDS.get(name.lower())
        if field is not None:
            setattr(self, field, _listed(value) if field in _LISTS else value)
            return
        for key in [k for k in self.headers if k.lower() == name.lower()]:
            del self.headers[key]
        self.headers[name] = value

    def __contains__(self, name: object) -> bool:
        """Whether a header is set.

        Example:
            >>> "In-Reply-To" in MailResponse(headers={"in-reply-to": "<1@x>"})
            True
        """
        return isinstance(name, str) and self[name] is not None

    # -- the envelope -------------------------------------------------------------------

    @property
    def mail_from(self) -> str:
        """The envelope sender: the ``From`` address, its domain IDNA-encoded.

        Example:
            >>> MailResponse(From="Blog <noreply@bücher.example>").mail_from
            'noreply@xn--bcher-kva.example'
        """
        found = _addresses([self.from_])
        return found[0].addr_spec if found else ""

    @property
    def rcpt_tos(self) -> list[str]:
        """Every envelope recipient: ``To``, ``Cc`` and ``Bcc``, each address once.

        Example:
            >>> MailResponse(To="A <a@x>, b@x", Cc="b@x", Bcc="c@x").rcpt_tos
            ['a@x', 'b@x', 'c@x']
        """
        seen = dict.fromkeys(a.addr_spec for a in _addresses([*self.to, *self.cc, *self.bcc]))
        return list(seen)

    @property
    def smtputf8(self) -> bool:
        """Whether an address has a non-ASCII local part (it can only go by SMTPUTF8).

        Example:
            >>> MailResponse(To="josé@x.org").smtputf8, MailResponse(To="a@bücher.de").smtputf8
            (True, False)
        """
        everyone = _addresses([self.from_, *self.to, *self.cc, *self.bcc])
        return any(not a.username.isascii() for a in everyone)

    # -- building -----------------------------------------------------------------------

    def attach(
        self,
        data: bytes | str | os.PathLike[str],
        filename: str | None = None,
        content_type: str | None = None,
    ) -> None:
        """Add an attachment: bytes, or a file read now (its name the attachment's).

        The content type is guessed from the file name (:mod:`mimetypes`) when not given,
        ``application/octet-stream`` when it cannot be. The file is read at once, with a
        plain ``open``: attachments are built off the hot path, and a missing file fails
        here rather than when the message is sent.

        Example:
            >>> r = MailResponse(To="a@x", From="b@x", Body="see file")
            >>> r.attach(b"1,2", "t.csv")
            >>> r.attachments[0][1:], r.to_message().get_content_type()
            (('t.csv', 'text/csv'), 'multipart/mixed')
        """
        if isinstance(data, bytes):
            payload = data
        else:
            path = Path(data)
            payload = path.read_bytes()
            filename = path.name if filename is None else filename
        if content_type is None:
            guessed, _ = mimetypes.guess_type(filename or "")
            content_type = guessed or "application/octet-stream"
        self.attachments.append((payload, filename or "", content_type))

    def to_message(self) -> EmailMessage:
        """The response as a stdlib message, with Date and Message-ID (``Bcc`` kept).

        Date and Message-ID are stamped on the first call and kept, so a message queued
        and later retried keeps one identity. A relay strips ``Bcc`` when sending.

        Example:
            >>> r = MailResponse(To="a@x", From="b@x", Subject="s", Html="<p>s</p>")
            >>> m = r.to_message()
            >>> m["Subject"], m.get_content_type(), m["Message-ID"] == r.to_message()["Message-ID"]
            ('s', 'multipart/alternative', True)
        """
        lowered = {k.lower() for k in self.headers}
        if "date" not in lowered:
            self.headers["Date"] = email.utils.formatdate(localtime=True)
        if "message-id" not in lowered:
            domain = self.mail_from.rpartition("@")[2]
            self.headers["Message-ID"] = email.utils.make_msgid(domain=domain or None)
        msg = EmailMessage()
        msg["From"] = _address_value(self.from_)
        for name, values in (("To", self.to), ("Cc", self.cc), ("Bcc", self.bcc)):
            if values:
                msg[name] = _address_value(", ".join(values))
        msg["Subject"] = self.subject
        for name, value in self.headers.items():
            msg[name] = _address_value(value) if name.lower() in _ADDRESS_HEADERS else value
        msg.set_content(self.body)
        if self.html is not None:
            msg.add_alternative(self.html, subtype="html")
        for data, filename, content_type in self.attachments:
            maintype, _, subtype = content_type.partition("/")
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename or None)
        return msg

    def as_bytes(self) -> bytes:
        """The response serialized with CRLF line ends, ready for SMTP, without ``Bcc``.

        8-bit headers (RFC 6532) only when :attr:`smtputf8`; otherwise 7-bit headers.

        Example:
            >>> r = MailResponse(To="a@x", From="b@x", Bcc="hidden@x", Subject="Café")
            >>> data = r.as_bytes()
            >>> data.startswith(b"From: b@x\\r\\n"), b"hidden" in data, b"=?utf-8?" in data
            (True, False, True)
        """
        msg = self.to_message()
        del msg["Bcc"]
        return msg.as_bytes(policy=email.policy.SMTPUTF8 if self.smtputf8 else email.policy.SMTP)

    def __repr__(self) -> str:
        return f"<MailResponse from={self.from_!r} to={self.to!r} subject={self.subject!r}>"


# MailResponse's own fields, by lower-case header name; the list-valued ones.
_FIELDS = {"to": "to", "cc": "cc", "bcc": "bcc", "from": "from_", "subject": "subject"}
_LISTS = frozenset({"to", "cc", "bcc"})
# Headers whose value is addresses: their domains are IDNA-encoded like From/To's.
_ADDRESS_HEADERS = frozenset({"reply-to", "sender", "resent-to", "resent-from"})


def _listed(value: str | list[str]) -> list[str]:
    """Addresses given as one string or a list, as a list (``""`` is none)."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    return [v for v in value if v.strip()]


def _addresses(values: list[str]) -> list[Address]:
    """The addresses in header values, each domain IDNA-encoded (RFC 5891).

    The stdlib's header folding writes a non-ASCII domain as an RFC 2047 encoded word,
    which no mail server resolves; IDNA (the stdlib ``idna`` codec) is what DNS takes.
    """
    found: list[Address] = []
    for name, addr in email.utils.getaddresses([v for v in values if v]):
        local, at, domain = addr.rpartition("@")
        if not at or not local:
            continue
        if not domain.isascii():
            # Not a valid IDN: left as given, and the relay will refuse it.
            with contextlib.suppress(UnicodeError):
                domain = domain.encode("idna").decode("ascii")
        found.append(Address(display_name=name, username=local, domain=domain))
    return found


def _address_value(value: str) -> str | tuple[Address, ...]:
    """What an address header is set to: the parsed addresses, or the text if none parse."""
    found = _addresses([value])
    return tuple(found) if found else value
