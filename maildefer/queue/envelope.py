"""The envelope record kept at the top of each queued file.

The SMTP envelope (sender, every recipient, peer, time received) has to travel with the
message: Lamson and Salmon route queued mail on its ``To:`` header, so Bcc recipients
vanish. maildefer prepends two header fields to the original bytes, which stay byte-exact
after them, so the file is still a valid RFC 5322 message any maildir reader opens::

    X-Maildefer-Envelope: v=1; len=<bytes of the original>; sha256=<hex of the original>;
     d=<base64 of a JSON object {"from", "to", "peer", "at", "for"}, folded at 76 columns>
    Return-Path: <sender>
    <the original message, byte for byte>

``len`` and ``sha256`` make the file self-checking (Postfix's END record): a truncated or
altered file is detected before a handler sees it. The prefix uses the line ending of the
original's first line, so a CRLF message stays all-CRLF and an LF file all-LF.

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
    first_lf = raw.find(b"\n")
    eol = b"\r\n" if first_lf > 0 and raw[first_lf - 1 : first_lf] == b"\r" else b"\n"
    payload = json.dumps(
        {
            "from": envelope.mail_from,
            "to": envelope.rcpt_tos,
            "peer": envelope.peer,
            "at": envelope.received_at,
            "for": envelope.rcpt_to,
        },
        separators=(",", ":"),
    ).encode("ascii")
    encoded = base64.b64encode(payload)
    digest = hashlib.sha256(raw).hexdigest().encode("ascii")
    lines = [HEADER + b" v=1; len=%d; sha256=%s;" % (len(raw), digest)]
    chunk = b" d=" + encoded[: _FOLD - 3]
    lines.append(chunk)
    for start in range(_FOLD - 3, len(encoded), _FOLD - 1):
        lines.append(b" " + encoded[start : start + _FOLD - 1])
    # Return-Path is informational (mutt shows it); the JSON is authoritative. CR/LF
    # cannot occur in an SMTP address but a push() from code could pass anything.
    sender = envelope.mail_from.replace("\r", "").replace("\n", "")
    lines.append(b"Return-Path: <" + sender.encode("utf-8", "surrogateescape") + b">")
    return eol.join(lines) + eol + raw


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
        return None, data
    try:
        header_end, fields = _parse_record(data)
        length = int(fields["len"])
        raw = data[len(data) - length :] if length else b""
        if length > len(data) - header_end or len(raw) != length:
            raise CorruptMessageError(f"envelope says {length} bytes, file holds fewer")
        if hashlib.sha256(raw).hexdigest() != fields["sha256"]:
            raise CorruptMessageError("message bytes do not match the envelope's sha256")
        obj = json.loads(base64.b64decode(fields["d"], validate=True))
        envelope = Envelope(
            mail_from=str(obj["from"]),
            rcpt_tos=[str(r) for r in obj["to"]],
            peer=str(obj.get("peer", "")),
            received_at=float(obj.get("at", 0.0)),
            rcpt_to=str(obj.get("for", "")),
        )
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
