"""The envelope record kept at the top of each queued file.

The SMTP envelope (sender, every recipient, peer, time received) has to travel with the
message: Lamson and Salmon route queued mail on its ``To:`` header, so Bcc recipients
vanish. maildefer prepends two header fields to the original bytes, which stay byte-exact
after them, so the file is still a valid RFC 5322 message any maildir reader opens::

    X-Maildefer-Envelope: v=1; len=<bytes of the original>; sha256=<hex of the original>; env=<x>;
     d=<base64 of a JSON object {"from", "to", "peer", "at", "for"}, folded at 76 columns>
    Return-Path: <sender>
    <the original message, byte for byte>

``len`` and ``sha256`` (of the original) and ``env`` (16 hex digits of the sha256 of ``d``)
make the file self-checking (Postfix's END record), and the prefix must be exactly what
:func:`wrap` writes: a truncated or altered file is detected before a handler sees it.
The prefix uses the line ending of the original's first line, so a CRLF message stays
all-CRLF and an LF file all-LF.

A file without the record (dropped into ``new/`` by another program) or a message pushed
without an SMTP envelope (bytes, an ``EmailMessage``) takes its envelope from the header
fields that delivery agents prepend, else from ``From:`` / ``To:`` / ``Cc:``
(:func:`header_envelope`).

Example:
    >>> data = wrap(b"Subject: x\\r\\n\\r\\nhi\\r\\n", Envelope("a@x", ["b@y"], "1.2.3.4:5", 1.5))
    >>> env, raw = unwrap(data)
    >>> env.rcpt_tos, raw
    (['b@y'], b'Subject: x\\r\\n\\r\\nhi\\r\\n')
"""

from __future__ import annotations

import base64
import binascii
import email.message
import email.utils
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from maildefer.errors import CorruptMessageError
from maildefer.mail import MailRequest, MailResponse, addresses_from_headers
from maildefer.queue.spooled import SpooledContent, SpooledMailRequest

if TYPE_CHECKING:
    from maildefer.queue.backend import Pushable

HEADER = b"X-Maildefer-Envelope:"
_FOLD = 76

# The first line and the start of the second, exactly as wrap() writes them: what the fast
# path of unwrap() accepts without further parsing (anything else takes the careful path).
_WRITTEN_HEAD = re.compile(
    rb"X-Maildefer-Envelope: v=1; len=(0|[1-9][0-9]{0,17}); "
    rb"sha256=([0-9a-f]{64}); env=([0-9a-f]{16});(\r?\n) d="
)
# json's own C string encoder (the one json.dumps uses with ensure_ascii=False).
_json_str = json.encoder.encode_basestring
_JSON = json.JSONDecoder()
_sha256 = hashlib.sha256
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope of a queued message.

    Example:
        >>> env = Envelope("a@x", ["b@y", "bcc@z"], peer="1.2.3.4:25", received_at=1.5)
        >>> unwrap(wrap(b"To: b@y\\n\\n", env))[0] == env
        True
    """

    mail_from: str
    rcpt_tos: list[str]
    peer: str = ""
    received_at: float = 0.0
    rcpt_to: str = ""
    """The recipient the message was queued for (a handler's call), if not all of them."""


def wrap(raw: bytes, envelope: Envelope) -> bytes:
    """The file contents for a message: the envelope record, then ``raw`` unchanged.

    Example:
        >>> data = wrap(b"Subject: x\\n\\n", Envelope("a@x", ["b@y"]))
        >>> data.startswith(HEADER), data.endswith(b"\\nSubject: x\\n\\n")
        (True, True)
        >>> unwrap(data.replace(b"Subject: x", b"Subject: y"))
        Traceback (most recent call last):
        ...
        maildefer.errors.CorruptMessageError: ...
    """
    digest = _sha256(raw).hexdigest().encode("ascii")
    return _prefix(len(raw), digest, _encode(envelope), envelope.mail_from, _eol(raw)) + raw


def _eol(raw: bytes) -> bytes:
    """The line ending of the original's first line: the prefix uses the same one."""
    first_lf = raw.find(b"\n")
    return b"\r\n" if first_lf > 0 and raw[first_lf - 1 : first_lf] == b"\r" else b"\n"


def _encode(envelope: Envelope) -> bytes:
    """The base64 JSON of an envelope, in one canonical form (unwrap re-derives it)."""
    mail_from, peer, rcpt_to = envelope.mail_from, envelope.peer, envelope.rcpt_to
    rcpt_tos = list(envelope.rcpt_tos)
    at = float(envelope.received_at)
    if (
        type(mail_from) is str
        and type(peer) is str
        and type(rcpt_to) is str
        and all(type(r) is str for r in rcpt_tos)
        and math.isfinite(at)
    ):
        # What json.dumps below writes for these types, byte for byte, without building
        # an encoder per call (a third of wrap()'s time).
        text = (
            f'{{"from":{_json_str(mail_from)},"to":[{",".join(map(_json_str, rcpt_tos))}],'
            f'"peer":{_json_str(peer)},"at":{float.__repr__(at)},"for":{_json_str(rcpt_to)}}}'
        )
    else:
        text = json.dumps(
            {"from": mail_from, "to": rcpt_tos, "peer": peer, "at": at, "for": rcpt_to},
            separators=(",", ":"),
            # Not ASCII escapes: json.loads would join an escaped surrogate pair into one
            # character. surrogatepass keeps every code point as it was, lone or paired.
            ensure_ascii=False,
        )
    return base64.b64encode(text.encode("utf-8", "surrogatepass"))


def _prefix(
    length: int, digest: bytes, encoded: bytes, sender: str, eol: bytes, check: bytes = b""
) -> bytes:
    # env= checks the envelope itself (sha256 only covers the original bytes): without it
    # a flipped bit in the base64 could yield a valid, different sender or recipient.
    if not check:
        check = _sha256(encoded).hexdigest()[:16].encode("ascii")
    return b"%s v=1; len=%d; sha256=%s; env=%s;%s d=%s" % (
        HEADER,
        length,
        digest,
        check,
        eol,
        _tail(encoded, sender, eol),
    )


def _tail(encoded: bytes, sender: str, eol: bytes) -> bytes:
    """The record after its first `` d=``: the folded envelope and the Return-Path line."""
    # Return-Path is informational (mutt shows it); the JSON is authoritative. CR/LF
    # cannot occur in an SMTP address but a push() from code could pass anything,
    # including lone surrogates that no codec but backslashreplace can write.
    sender = sender.replace("\r", "").replace("\n", "")
    try:
        address = sender.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        address = sender.encode("utf-8", "backslashreplace")
    # Folded at _FOLD columns: " d=" and 73 characters, then " " and 75 a line.
    folded = encoded[: _FOLD - 3]
    if len(encoded) > _FOLD - 3:
        step = _FOLD - 1
        folded = (eol + b" ").join(
            [folded, *(encoded[i : i + step] for i in range(_FOLD - 3, len(encoded), step))]
        )
    return b"%s%sReturn-Path: <%s>%s" % (folded, eol, address, eol)


def _damaged_header(data: bytes) -> bool:
    """A file that starts like a record whose first bytes were truncated or altered.

    A bit flip in the field name, or a file cut inside it, must read as corrupt, not as
    a foreign message without an envelope (R6).
    """
    if not data:
        return False
    if len(data) < len(HEADER):
        return HEADER.startswith(data)
    return sum(a != b for a, b in zip(data, HEADER, strict=False)) <= 2


def unwrap(data: bytes) -> tuple[Envelope | None, bytes]:
    """Split a queued file into its envelope (``None`` if it has none) and original bytes.

    Raises:
        CorruptMessageError: the record is malformed, or the original's length or
            sha256 differs from what the record says (a truncated or altered file).

    Example:
        >>> unwrap(b"From: a@x\\n\\nno envelope here\\n")[0] is None
        True
    """
    if not data.startswith(HEADER):
        if _damaged_header(data):
            raise CorruptMessageError("envelope record header is damaged")
        return None, data
    fields = _read_written(data)
    if fields is None:
        # Not exactly as written, or failing a check: the careful path says what is wrong.
        return _unwrap_checked(data)
    mail_from, rcpt_tos, peer, received_at, rcpt_to, raw = fields
    return Envelope(mail_from, rcpt_tos, peer, received_at, rcpt_to), raw


EnvelopeFields = tuple[str, list[str], str, float, str, bytes]
"""``(mail_from, rcpt_tos, peer, received_at, rcpt_to, original bytes)``."""


def unwrap_fields(data: bytes) -> EnvelopeFields | None:
    """:func:`unwrap` without building an :class:`Envelope`: its fields and the original.

    ``None`` for a file without an envelope record (its bytes are the original). The
    claim path uses this: a worker drains thousands of messages a second.

    Raises:
        CorruptMessageError: as :func:`unwrap`.

    Example:
        >>> unwrap_fields(wrap(b"\\n", Envelope("a@x", ["b@y"])))[:2]
        ('a@x', ['b@y'])
        >>> unwrap_fields(b"\\n") is None
        True
    """
    if not data.startswith(HEADER):
        if _damaged_header(data):
            raise CorruptMessageError("envelope record header is damaged")
        return None
    fields = _read_written(data)
    if fields is None:
        envelope, raw = _unwrap_checked(data)
        fields = (
            envelope.mail_from,
            envelope.rcpt_tos,
            envelope.peer,
            envelope.received_at,
            envelope.rcpt_to,
            raw,
        )
    return fields


def _read_written(data: bytes) -> EnvelopeFields | None:
    """Read a record exactly as :func:`wrap` wrote it; ``None`` for anything else.

    Every check of the careful path is made (length, sha256 of the original, ``env=``,
    the record compared byte for byte with what wrap() writes for these values), but the
    known layout is read with one regular expression and a few ``find`` calls. The first
    line, matched in full by ``_WRITTEN_HEAD`` with the values checked below, is already
    byte for byte what wrap() writes; the rest is rebuilt and compared.
    """
    head = _WRITTEN_HEAD.match(data)
    if head is None:
        return None
    length, digest, check, eol = head.groups()
    start = head.end()
    return_path = data.find(eol + b"Return-Path: <", start)
    if return_path < 0:
        return None
    header_end = data.find(b"\n", return_path + len(eol) + 14) + 1
    if header_end <= 0 or int(length) != len(data) - header_end:
        return None
    encoded = data[start:return_path]
    if len(encoded) > _FOLD - 3:
        encoded = encoded.replace(eol + b" ", b"")
    if _sha256(encoded).hexdigest()[:16].encode("ascii") != check:
        return None
    raw = data[header_end:]
    if _sha256(raw).hexdigest().encode("ascii") != digest or _eol(raw) != eol:
        return None
    try:
        text = binascii.a2b_base64(encoded, strict_mode=True).decode("utf-8", "surrogatepass")
        obj, end = _JSON.raw_decode(text)
        if end != len(text):
            return None
        mail_from = str(obj["from"])
        fields = (
            mail_from,
            list(map(str, obj["to"])),
            str(obj.get("peer", "")),
            float(obj.get("at", 0.0)),
            str(obj.get("for", "")),
            raw,
        )
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    tail = _tail(encoded, mail_from, eol)
    if start + len(tail) != header_end or not data.startswith(tail, start):
        return None
    return fields


def _unwrap_checked(data: bytes) -> tuple[Envelope, bytes]:
    """The careful path of :func:`unwrap`: parse generally, say exactly what is wrong."""
    try:
        header_end, fields = _parse_record(data)
        if fields.get("v") != "1":
            raise CorruptMessageError(f"unknown envelope version {fields.get('v')!r}")
        length = int(fields["len"])
        if length != len(data) - header_end:
            raise CorruptMessageError(
                f"envelope says {length} bytes, file holds {len(data) - header_end}"
            )
        raw = data[header_end:]
        digest = hashlib.sha256(raw).hexdigest()
        if digest != fields["sha256"]:
            raise CorruptMessageError("message bytes do not match the envelope's sha256")
        encoded = fields["d"].encode("ascii")
        if hashlib.sha256(encoded).hexdigest()[:16] != fields["env"]:
            raise CorruptMessageError("envelope record does not match its checksum")
        obj = json.loads(base64.b64decode(encoded, validate=True).decode("utf-8", "surrogatepass"))
        envelope = Envelope(
            mail_from=str(obj["from"]),
            rcpt_tos=[str(r) for r in obj["to"]],
            peer=str(obj.get("peer", "")),
            received_at=float(obj.get("at", 0.0)),
            rcpt_to=str(obj.get("for", "")),
        )
        # The record must be exactly what wrap() writes: this catches damage to the
        # separators, line ends and Return-Path that the parser above tolerates.
        expected = _prefix(length, digest.encode("ascii"), encoded, envelope.mail_from, _eol(raw))
        if data[:header_end] != expected:
            raise CorruptMessageError("envelope record is not in its written form")
    except CorruptMessageError:
        raise
    except (KeyError, ValueError, TypeError, binascii.Error) as exc:
        raise CorruptMessageError(f"unreadable envelope record: {exc!r}") from None
    return envelope, raw


def _parse_record(data: bytes) -> tuple[int, dict[str, str]]:
    """The end offset of the envelope field (folded lines joined) and its parameters."""
    pos = 0
    parts: list[bytes] = []
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            raise ValueError("envelope record is not terminated")
        parts.append(data[pos:nl].rstrip(b"\r"))
        pos = nl + 1
        if data[pos : pos + 1] not in (b" ", b"\t"):
            break
    # The Return-Path line that follows belongs to the prefix too.
    if data.startswith(b"Return-Path:", pos):
        nl = data.find(b"\n", pos)
        if nl < 0:
            raise ValueError("Return-Path line is not terminated")
        pos = nl + 1
    text = b"".join(p.strip() for p in parts)[len(HEADER) :].decode("ascii")
    fields = {}
    for item in text.split(";"):
        name, sep, value = item.strip().partition("=")
        if sep:
            fields[name] = value
    return pos, fields


# The header fields a delivery agent prepends with the envelope (Postfix local(8) and
# virtual(8), Dovecot's LDA, maildrop): matched only at the start of a line, so a folded
# continuation never counts; group 2 is the value with its folded lines.
_DELIVERY_FIELD = re.compile(
    rb"^(return-path|delivered-to|x-original-to)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)",
    re.IGNORECASE | re.MULTILINE,
)


def header_envelope(raw: bytes, received_at: float = 0.0) -> Envelope:
    """The envelope of a message that carries none of ours, read from its header fields.

    Another mail system that delivers into a maildir records the envelope in header fields
    it prepends: Postfix ``virtual(8)`` and ``local(8)`` (their man pages, "MAILBOX
    DELIVERY") write ``Return-Path:`` (the envelope sender), ``X-Original-To:`` (the
    recipient "as given to Postfix", before alias or virtual rewriting) and
    ``Delivered-To:`` (the final envelope recipient; ``local(8)`` only with
    ``prepend_delivered_header``, whose default leaves it out of mailbox delivery).

    - sender: the first (top) ``Return-Path:``; ``<>`` (RFC 5322 §3.6.7) is the null
      sender ``""``, as is one that does not parse, and neither falls back to ``From:``:
      mail with a null reverse-path (a bounce) must never be answered (RFC 5321 §4.5.5,
      RFC 3834 §2). Without ``Return-Path:``, the first ``From:`` address.
    - recipient: the top ``Delivered-To:``. Each delivery prepends its own, so after
      forwarding the top one is this copy's final recipient (older ones below it are the
      hops before; Postfix bounces mail whose recipient is already listed: loop
      detection, ``local(8)``). Without it, the top ``X-Original-To:``; without both,
      every ``To:`` and ``Cc:`` address. A delivered file is one recipient's copy, so
      ``rcpt_tos`` is that one address: a Bcc recipient is found there, and the others
      of the original transaction are not in the file. A handler that wants the address
      before rewriting reads ``message["X-Original-To"]``.

    Only the header block is scanned (a large body is never parsed), and broken or
    non-UTF-8 fields give an empty or partial result, never an exception.

    Example:
        >>> env = header_envelope(
        ...     b"Return-Path: <ann@x.org>\\nX-Original-To: blog@y.org\\n"
        ...     b"Delivered-To: bob@y.org\\nDelivered-To: old@z.org\\nTo: list@y.org\\n\\nhi\\n"
        ... )
        >>> env.mail_from, env.rcpt_tos
        ('ann@x.org', ['bob@y.org'])
        >>> header_envelope(b"Return-Path: <>\\nFrom: MAILER-DAEMON@y.org\\n\\n").mail_from
        ''
    """
    # Only the header block: parsing (and re-serialising) a large body on the event loop
    # cost 5 ms per 100 KiB push.
    block = _header_block(raw)
    found: dict[bytes, str] = {}
    for match in _DELIVERY_FIELD.finditer(block):
        name = match.group(1).lower()
        if name not in found:
            found[name] = _field_address(match.group(2))
            if len(found) == 3:
                break
    headers = MailRequest(block)  # parsed (the header block only) if a fallback needs it
    sender = found.get(b"return-path")
    if sender is None:
        sender = next(iter(addresses_from_headers(headers, "From")), "")
    recipient = found.get(b"delivered-to") or found.get(b"x-original-to")
    rcpt_tos = [recipient] if recipient else addresses_from_headers(headers, "To", "Cc")
    return Envelope(sender, rcpt_tos, "", received_at)


def _header_block(raw: bytes) -> bytes:
    """The header fields of a message and the empty line after them (RFC 5322 §2.1)."""
    if raw.startswith((b"\n", b"\r\n")):
        return b""  # no header fields at all: the body's own blank lines do not count
    blank = _BLANK_LINE.search(raw)
    return raw[: blank.end()] if blank else raw


def _field_address(value: bytes) -> str:
    """The address in a ``Return-Path:`` / ``Delivered-To:`` value; ``""`` if none."""
    # Unfold (RFC 5322 §2.2.3); non-UTF-8 bytes are kept as surrogates, as the envelope
    # record keeps them. parseaddr never raises, and yields "" for "<>" and for garbage.
    text = value.replace(b"\r", b"").replace(b"\n", b"").decode("utf-8", "surrogateescape")
    return email.utils.parseaddr(text)[1]


def message_parts(message: Pushable) -> tuple[bytes, Envelope]:
    """The raw bytes and envelope of anything ``push`` accepts (shared by every backend).

    Bytes and stdlib messages carry no SMTP envelope: it is read from their headers, by
    the rule a file dropped into ``new/`` is read with (:func:`header_envelope`). A
    :class:`~maildefer.mail.MailResponse` has one: its ``From`` address is the sender and
    its ``To``, ``Cc`` and ``Bcc`` addresses the recipients, and the stored bytes are its
    :meth:`~maildefer.mail.MailResponse.as_bytes`, without the ``Bcc`` header.

    Example:
        >>> reply = MailResponse(From="blog@y.org", To="ann@x.org", Bcc="archive@y.org")
        >>> raw, env = message_parts(reply)
        >>> env.mail_from, env.rcpt_tos, b"archive" in raw
        ('blog@y.org', ['ann@x.org', 'archive@y.org'], False)

        >>> raw, env = message_parts(b"From: a@x.org\\nTo: b@y.org\\n\\nhi\\n")
        >>> env.mail_from, env.rcpt_tos
        ('a@x.org', ['b@y.org'])
        >>> raw, env = message_parts(b"Return-Path: <>\\nDelivered-To: bcc@y.org\\n\\n")
        >>> env.mail_from, env.rcpt_tos
        ('', ['bcc@y.org'])
    """
    if isinstance(message, MailRequest):
        return message.raw, _request_envelope(message)
    if isinstance(message, MailResponse):
        # Its own envelope, not header_envelope(): Bcc is in no header of the bytes.
        return message.as_bytes(), Envelope(message.mail_from, message.rcpt_tos, "", time.time())
    if isinstance(message, email.message.Message):
        raw = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    elif isinstance(message, bytes | bytearray | memoryview):
        raw = bytes(message)
    else:
        raise TypeError(
            f"cannot queue a {type(message).__name__}: "
            "want MailRequest, MailResponse, EmailMessage or bytes"
        )
    # No SMTP envelope: take it from the headers, as a file dropped into new/ would be read
    # (the same rule, so pushing a file's bytes and dropping the file in agree).
    return raw, header_envelope(raw, received_at=time.time())


def _request_envelope(message: MailRequest) -> Envelope:
    return Envelope(
        message.mail_from,
        list(message.rcpt_tos),
        message.peer,
        message.received_at,
        message.rcpt_to,
    )


def push_parts(message: Pushable) -> tuple[bytes | SpooledContent, Envelope]:
    """:func:`message_parts`, but a spooled message stays in its file (a maildir streams it).

    Example:
        >>> import tempfile
        >>> f = tempfile.NamedTemporaryFile(); _ = f.write(b"A: 1\\n\\nbig\\n"); f.flush()
        >>> m = SpooledMailRequest(SpooledContent(f.name, b"A: 1\\n\\n", 6, 4), rcpt_tos=["b@y"])
        >>> content, env = push_parts(m)
        >>> content.size, env.rcpt_tos, push_parts(b"\\n")[0]
        (10, ['b@y'], b'\\n')
        >>> f.close()
    """
    if isinstance(message, SpooledMailRequest) and message.content is not None:
        return message.content, _request_envelope(message)
    return message_parts(message)


class FilePayload:
    """A queued file's contents whose message is in a spool file: record, then the message.

    Built on the event loop, used in a writer thread: :meth:`prefix` may hash the file.

    Args:
        content: the spooled message.
        envelope: its envelope.

    Example:
        >>> import tempfile
        >>> f = tempfile.NamedTemporaryFile(); _ = f.write(b"A: 1\\n\\nbig\\n"); f.flush()
        >>> env = Envelope("a@x", ["b"])
        >>> payload = FilePayload(SpooledContent(f.name, b"A: 1\\n\\n", 6, 4), env)
        >>> payload.prefix() + payload.content.read() == wrap(b"A: 1\\n\\nbig\\n", env)
        True
        >>> f.close()
    """

    __slots__ = ("content", "envelope")

    def __init__(self, content: SpooledContent, envelope: Envelope) -> None:
        self.content = content
        self.envelope = envelope

    def prefix(self) -> bytes:
        """The envelope record :func:`wrap` would write before this message (blocking)."""
        content, envelope = self.content, self.envelope
        # The first line's ending: from the head, or (a header section too long to be
        # kept in memory) from the start of the file.
        start = content.head or next(content.chunks(65536), b"")
        digest = content.sha256().encode("ascii")
        return _prefix(content.size, digest, _encode(envelope), envelope.mail_from, _eol(start))


def wrap_payload(raw: bytes | SpooledContent, envelope: Envelope) -> bytes | FilePayload:
    """:func:`wrap` for what :func:`push_parts` gives: bytes, or a :class:`FilePayload`.

    Example:
        >>> wrap_payload(b"\\n", Envelope("a@x", ["b"])) == wrap(b"\\n", Envelope("a@x", ["b"]))
        True
    """
    if isinstance(raw, SpooledContent):
        return FilePayload(raw, envelope)
    return wrap(raw, envelope)


def request_from_file(data: bytes) -> MailRequest:
    """A queued file's message: its envelope record, or the envelope its headers give.

    Without the record (a file another program dropped in), see :func:`header_envelope`:
    ``Return-Path:`` and ``Delivered-To:`` / ``X-Original-To:``, else ``From:`` and
    ``To:`` / ``Cc:``.

    Raises:
        CorruptMessageError: the file fails its envelope check.

    Example:
        >>> request_from_file(b"From: a@x\\nTo: b@y\\n\\n").rcpt_tos
        ['b@y']
        >>> postfix = b"Return-Path: <a@x>\\nDelivered-To: bcc@z\\nFrom: a@x\\nTo: b@y\\n\\n"
        >>> request_from_file(postfix).rcpt_to
        'bcc@z'
        >>> request_from_file(wrap(b"To: b@y\\n\\n", Envelope("a@x", ["b@y", "bcc@z"]))).rcpt_tos
        ['b@y', 'bcc@z']
    """
    fields = unwrap_fields(data)
    if fields is None:
        envelope = header_envelope(data)
        return MailRequest(data, mail_from=envelope.mail_from, rcpt_tos=envelope.rcpt_tos)
    mail_from, rcpt_tos, peer, received_at, rcpt_to, raw = fields
    return MailRequest(
        raw,
        mail_from=mail_from,
        rcpt_tos=rcpt_tos,
        peer=peer,
        received_at=received_at,
        rcpt_to=rcpt_to,
    )
