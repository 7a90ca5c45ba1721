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

Example:
    >>> data = wrap(b"Subject: x\\r\\n\\r\\nhi\\r\\n", Envelope("a@x", ["b@y"], "1.2.3.4:5", 1.5))
    >>> env, raw = unwrap(data)
    >>> env.rcpt_tos, raw
    (['b@y'], b'Subject: x\\r\\n\\r\\nhi\\r\\n')
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass

from maildefer.errors import CorruptMessageError

HEADER = b"X-Maildefer-Envelope:"
_FOLD = 76


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope of a queued message.

    Example:
        >>> Envelope("a@x", ["b@y"]).peer
        ''
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
        >>> wrap(b"\\n", Envelope("", [])).startswith(HEADER)
        True
    """
    digest = hashlib.sha256(raw).hexdigest().encode("ascii")
    return _prefix(len(raw), digest, _encode(envelope), envelope.mail_from, _eol(raw)) + raw


def _eol(raw: bytes) -> bytes:
    """The line ending of the original's first line: the prefix uses the same one."""
    first_lf = raw.find(b"\n")
    return b"\r\n" if first_lf > 0 and raw[first_lf - 1 : first_lf] == b"\r" else b"\n"


def _encode(envelope: Envelope) -> bytes:
    """The base64 JSON of an envelope, in one canonical form (unwrap re-derives it)."""
    payload = json.dumps(
        {
            "from": envelope.mail_from,
            "to": list(envelope.rcpt_tos),
            "peer": envelope.peer,
            "at": float(envelope.received_at),
            "for": envelope.rcpt_to,
        },
        separators=(",", ":"),
        # Not ASCII escapes: json.loads would join an escaped surrogate pair into one
        # character. surrogatepass keeps every code point as it was, lone or paired.
        ensure_ascii=False,
    ).encode("utf-8", "surrogatepass")
    return base64.b64encode(payload)


def _prefix(length: int, digest: bytes, encoded: bytes, sender: str, eol: bytes) -> bytes:
    # env= checks the envelope itself (sha256 only covers the original bytes): without it
    # a flipped bit in the base64 could yield a valid, different sender or recipient.
    check = hashlib.sha256(encoded).hexdigest()[:16].encode("ascii")
    lines = [HEADER + b" v=1; len=%d; sha256=%s; env=%s;" % (length, digest, check)]
    chunk = b" d=" + encoded[: _FOLD - 3]
    lines.append(chunk)
    for start in range(_FOLD - 3, len(encoded), _FOLD - 1):
        lines.append(b" " + encoded[start : start + _FOLD - 1])
    # Return-Path is informational (mutt shows it); the JSON is authoritative. CR/LF
    # cannot occur in an SMTP address but a push() from code could pass anything,
    # including lone surrogates that no codec but backslashreplace can write.
    sender = sender.replace("\r", "").replace("\n", "")
    try:
        address = sender.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        address = sender.encode("utf-8", "backslashreplace")
    lines.append(b"Return-Path: <" + address + b">")
    return eol.join(lines) + eol


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
