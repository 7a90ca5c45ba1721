"""The PROXY protocol (v1 text, v2 binary): who the client behind a load balancer is.

With ``[server] proxy_protocol = true`` every connection starts with the header HAProxy's
spec defines (``doc/proxy-protocol.txt``), sent by the proxy before any SMTP: the session
(:mod:`maildefer.smtp.session`) checks the peer against ``trusted_proxies`` with
:func:`trusted`, reads the header from its own stream with :func:`read_header` before it
greets, and takes the client address the header names as the session's peer
(``message.peer``, the log lines, the per-IP connection cap, the SPF check). A peer outside
``trusted_proxies``, a malformed header or none within the deadline closes the connection
unanswered: anyone who can reach the port could otherwise claim to be any address.

Written here rather than taken from the ``proxy-protocol`` package (0.11.3, read for this):
the parsing is about 130 lines, and the package never checks v1's 107-byte limit, takes
ports with leading zeros or a sign (``int()``), raises ``struct.error`` (not its own error)
on a truncated v2 address block, and brings ``typing-extensions`` and a
``SocketInfo``/``ProxyResult`` model of its own that we would translate from anyway.
aiosmtpd's own ``proxy_protocol`` (its ``proxy_protocol_timeout`` and ``handle_PROXY``
hook) arms aiosmtpd's idle timer for the deadline, which in maildefer says ``421`` before
closing, and reports through aiosmtpd's stdlib logger, which ``serve`` silences. Here: no
dependency, strict parsing, one exception type, one log line per refusal.

:class:`ProxyGate` is what the session uses: :meth:`ProxyGate.admits` in
``connection_made``, :meth:`ProxyGate.read` in ``_handle_client``.

What is accepted (the spec's rules for a receiver):

- v1: ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` with single spaces, addresses
  of the named family, ports ``0``-``65535`` without leading zeros, at most 107 bytes;
  ``PROXY UNKNOWN ...\\r\\n`` (anything up to the CRLF ignored) keeps the proxy's address.
- v2: the 12-byte signature, version 2, command ``LOCAL`` (the proxy's own connection, a
  health check: its address is kept, the address block ignored) or ``PROXY``; family
  ``INET``/``INET6`` over ``STREAM`` (or an unspecified transport) give the client's
  address; ``UNSPEC`` and ``UNIX`` keep the proxy's; TLVs after the addresses are skipped.
  ``DGRAM`` and unassigned values are refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from maildefer.logs import sanitize
from maildefer.settings import ServerSettings

log = structlog.get_logger("maildefer.smtp")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = tuple[str, int]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107
"""The longest v1 header, CRLF included (spec section 2.1)."""

DEFAULT_TIMEOUT = 5.0
"""Seconds for the whole header to arrive (Postfix's ``smtpd_upstream_proxy_timeout``)."""

_V1_PREFIX = b"PROXY "
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_ADDRESS_CHARS = re.compile(r"[0-9A-Fa-f.:]+")  # no IPv6 zone ("%eth0"), no spaces
_V2_FIXED = struct.Struct("!BBH")  # version/command, family/transport, length
_INET = struct.Struct("!4s4sHH")
_INET6 = struct.Struct("!16s16sHH")
_UNIX_LENGTH = 216  # two 108-byte socket paths


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY header we accept; the message says why (no client bytes).

    Example:
        >>> parse(b"EHLO client.example\\r\\n")
        Traceback (most recent call last):
        ...
        maildefer.smtp.proxy.ProxyHeaderError: no PROXY header (neither v1 nor v2 signature)
    """


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY header.

    Attributes:
        version: 1 (text) or 2 (binary).
        client: the original client's ``(ip, port)``; ``None`` when the header names no
            client (v1 ``UNKNOWN``, v2 ``LOCAL``, ``UNSPEC`` or ``UNIX``): the
            connection's own peer, the proxy, stays the peer.
        server: the address the client connected to on the proxy, when given.

    Example:
        >>> parse(b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 25\\r\\n")
        ProxyHeader(version=1, client=('203.0.113.7', 4242), server=('192.0.2.1', 25))
    """

    version: int
    client: Address | None
    server: Address | None = None


def trusted(peer: str, networks: Sequence[Network]) -> bool:
    """Whether a connection's peer address lies in one of ``networks``.

    An IPv4-mapped IPv6 peer (``::ffff:127.0.0.1``, what a dual-stack ``::`` listener
    sees) is checked as the IPv4 address it is.

    Example:
        >>> nets = [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("fd00::/8")]
        >>> trusted("127.0.0.1", nets), trusted("::ffff:127.0.0.1", nets), trusted("fd12::1", nets)
        (True, True, True)
        >>> trusted("10.0.0.1", nets), trusted("not an address", nets)
        (False, False)
    """
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:  # a UNIX socket's path, or nothing: never a trusted proxy
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def parse(data: bytes) -> ProxyHeader:
    """Parse one whole header, v1 or v2 (exactly its bytes, nothing after it).

    Raises:
        ProxyHeaderError: not a header, malformed, or a kind we refuse.

    Example:
        >>> parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 25\\r\\n").client
        ('2001:db8::7', 4242)
        >>> v2 = V2_SIGNATURE + bytes([0x21, 0x11, 0, 12]) + bytes([203, 0, 113, 7, 192, 0, 2, 1])
        >>> parse(v2 + (4242).to_bytes(2, "big") + (25).to_bytes(2, "big")).client
        ('203.0.113.7', 4242)
    """
    if data.startswith(V2_SIGNATURE):
        return parse_v2(data)
    if data.startswith(_V1_PREFIX):
        return parse_v1(data)
    raise ProxyHeaderError("no PROXY header (neither v1 nor v2 signature)")


def parse_v1(line: bytes) -> ProxyHeader:
    """Parse a v1 header line, ``PROXY ...\\r\\n``.

    Raises:
        ProxyHeaderError: malformed (the reason names the field, never its bytes).

    Example:
        >>> parse_v1(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\\r\\n")
        ProxyHeader(version=1, client=None, server=None)
        >>> parse_v1(b"PROXY TCP4 203.0.113.7 192.0.2.1 04242 25\\r\\n")
        Traceback (most recent call last):
        ...
        maildefer.smtp.proxy.ProxyHeaderError: PROXY v1: bad source port
        >>> parse_v1(b"PROXY TCP4 2001:db8::7 192.0.2.1 4242 25\\r\\n")
        Traceback (most recent call last):
        ...
        maildefer.smtp.proxy.ProxyHeaderError: PROXY v1: bad source address for TCP4
    """
    if len(line) > V1_MAX:
        raise ProxyHeaderError(f"PROXY v1: header longer than {V1_MAX} bytes")
    if not line.startswith(_V1_PREFIX) or not line.endswith(b"\r\n"):
        raise ProxyHeaderError("PROXY v1: not a 'PROXY ...' line ending in CRLF")
    try:
        text = line[len(_V1_PREFIX) : -2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1: not ASCII") from None
    fields = text.split(" ")
    if fields[0] == "UNKNOWN":  # the spec: ignore whatever follows, up to the CRLF
        return ProxyHeader(1, None)
    if fields[0] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("PROXY v1: protocol is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 5:
        raise ProxyHeaderError("PROXY v1: expected 'PROXY proto src dst sport dport'")
    family, src, dst, sport, dport = fields
    kind = ipaddress.IPv4Address if family == "TCP4" else ipaddress.IPv6Address
    return ProxyHeader(
        1,
        (_v1_address(src, kind, f"source address for {family}"), _v1_port(sport, "source")),
        (_v1_address(dst, kind, f"destination address for {family}"), _v1_port(dport, "dest")),
    )


def _v1_address(
    text: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address], what: str
) -> str:
    if _ADDRESS_CHARS.fullmatch(text) is None:
        raise ProxyHeaderError(f"PROXY v1: bad {what}")
    try:
        return str(kind(text))
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1: bad {what}") from None


def _v1_port(text: str, what: str) -> int:
    if _PORT.fullmatch(text) is None or int(text) > 65535:
        raise ProxyHeaderError(f"PROXY v1: bad {what} port")
    return int(text)


def parse_v2(data: bytes) -> ProxyHeader:
    """Parse a whole v2 header: signature, 4 fixed bytes, then exactly ``length`` bytes.

    Raises:
        ProxyHeaderError: malformed, truncated, or a command/family/transport refused.

    Example:
        >>> fixed = lambda cmd, fam, n: V2_SIGNATURE + bytes([cmd, fam]) + n.to_bytes(2, "big")
        >>> ip = lambda text: ipaddress.ip_address(text).packed
        >>> addrs = ip("2001:db8::7") + ip("2001:db8::1") + struct.pack("!HH", 4242, 25)
        >>> tlv = bytes([0x04, 0, 3]) + b"abc"  # a TLV (type 4, NOOP): skipped
        >>> parse_v2(fixed(0x21, 0x21, 36 + 6) + addrs + tlv)
        ProxyHeader(version=2, client=('2001:db8::7', 4242), server=('2001:db8::1', 25))
        >>> parse_v2(fixed(0x20, 0x00, 0))  # LOCAL: the proxy's own health check
        ProxyHeader(version=2, client=None, server=None)
        >>> parse_v2(fixed(0x21, 0x12, 12) + bytes(12))
        Traceback (most recent call last):
        ...
        maildefer.smtp.proxy.ProxyHeaderError: PROXY v2: transport 2 (only STREAM)
    """
    if not data.startswith(V2_SIGNATURE) or len(data) < 16:
        raise ProxyHeaderError("PROXY v2: no signature")
    version_command, family_transport, length = _V2_FIXED.unpack_from(data, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2: version {version_command >> 4} (only 2)")
    command = version_command & 0x0F
    if command > 1:
        raise ProxyHeaderError(f"PROXY v2: command {command} (only LOCAL or PROXY)")
    body = data[16:]
    if len(body) != length:
        raise ProxyHeaderError(
            f"PROXY v2: {len(body)} bytes after the header, length says {length}"
        )
    family, transport = family_transport >> 4, family_transport & 0x0F
    if family > 3:
        raise ProxyHeaderError(f"PROXY v2: address family {family}")
    if command == 0:  # LOCAL: "discard the protocol block including the family"
        return ProxyHeader(2, None)
    if transport > 1:
        raise ProxyHeaderError(f"PROXY v2: transport {transport} (only STREAM)")
    if family == 0:  # UNSPEC: nothing to say about the client; use the connection's
        return ProxyHeader(2, None)
    if family == 3:  # UNIX: no IP address to count or check; the proxy stays the peer
        if length < _UNIX_LENGTH:
            raise ProxyHeaderError("PROXY v2: truncated UNIX address block")
        return ProxyHeader(2, None)
    layout = _INET if family == 1 else _INET6
    if length < layout.size:  # what follows the addresses (TLVs) is skipped
        raise ProxyHeaderError(f"PROXY v2: truncated {'IPv4' if family == 1 else 'IPv6'} block")
    src, dst, sport, dport = layout.unpack_from(body)
    return ProxyHeader(
        2,
        (str(ipaddress.ip_address(src)), sport),
        (str(ipaddress.ip_address(dst)), dport),
    )


async def read_header(reader: asyncio.StreamReader, *, within: float) -> ProxyHeader:
    """Read one PROXY header from ``reader`` within ``within`` seconds; nothing after it.

    It reads only the header's bytes (the 6 first decide v1 or v2, then the rest of the
    line or the announced length), so whatever the client sends next stays in the stream
    for the SMTP session. A v1 line is read up to the reader's own limit at most, then
    refused if over 107 bytes.

    Raises:
        ProxyHeaderError: malformed, too long, the connection closed first, or the
            deadline passed.

    Example:
        >>> async def demo(*chunks: bytes) -> ProxyHeader:
        ...     reader = asyncio.StreamReader()
        ...     for chunk in chunks:  # a header split across TCP segments
        ...         reader.feed_data(chunk)
        ...     header = await read_header(reader, within=0.05)
        ...     assert await reader.read(4) == b"EHLO"  # the rest is the session's
        ...     return header
        >>> asyncio.run(demo(b"PRO", b"XY TCP4 203.0.113.7 192.0.2.1 4242 25\\r", b"\\nEHLO"))
        ProxyHeader(version=1, client=('203.0.113.7', 4242), server=('192.0.2.1', 25))
        >>> asyncio.run(demo(b"PROXY TCP4"))
        Traceback (most recent call last):
        ...
        maildefer.smtp.proxy.ProxyHeaderError: no PROXY header within 0.05 s
    """
    try:
        async with asyncio.timeout(within):
            start = await reader.readexactly(len(_V1_PREFIX))
            if start == _V1_PREFIX:
                try:
                    rest = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    raise ProxyHeaderError(f"PROXY v1: header longer than {V1_MAX} bytes") from None
                return parse_v1(start + rest)
            if start == V2_SIGNATURE[: len(start)]:
                fixed = start + await reader.readexactly(16 - len(start))
                length = int.from_bytes(fixed[14:16], "big")
                return parse_v2(fixed + await reader.readexactly(length))
            raise ProxyHeaderError("no PROXY header (neither v1 nor v2 signature)")
    except TimeoutError:
        raise ProxyHeaderError(f"no PROXY header within {within:g} s") from None
    except asyncio.IncompleteReadError:
        raise ProxyHeaderError("connection closed before a whole PROXY header") from None


@dataclass(frozen=True, slots=True)
class ProxyGate:
    """``[server] proxy_protocol``: which peers may send a header, and how long it may take.

    The session (:mod:`maildefer.smtp.session`) asks :meth:`admits` when a connection
    arrives and :meth:`read` before its greeting; both log why they refuse, one line.

    Example:
        >>> ProxyGate.of(ServerSettings()) is None  # proxy_protocol = false
        True
        >>> gate = ProxyGate.of(ServerSettings(proxy_protocol=True, trusted_proxies=["::1"]))
        >>> gate.networks, gate.deadline
        ((IPv6Network('::1/128'),), 5.0)
    """

    networks: tuple[Network, ...]
    deadline: float = DEFAULT_TIMEOUT

    @classmethod
    def of(cls, settings: ServerSettings) -> ProxyGate | None:
        """The gate of ``[server]``, or ``None`` when ``proxy_protocol`` is off."""
        if not settings.proxy_protocol:
            return None
        return cls(tuple(settings.trusted_proxies), settings.proxy_timeout)

    def admits(self, peer: str, transport: asyncio.BaseTransport) -> bool:
        """Whether ``peer`` may speak first (a trusted proxy); if not: logged, closed.

        Example:
            >>> from maildefer import logs; import io; logs.configure(stream=io.StringIO())
            >>> transport = asyncio.BaseTransport()
            >>> ProxyGate((ipaddress.ip_network("10.0.0.0/8"),)).admits("10.0.0.9", transport)
            True
        """
        if trusted(peer, self.networks):
            return True
        # Not heard at all: whoever can reach the port could claim any address.
        log.info("proxy_refused", peer=sanitize(peer), reason="not a trusted proxy")
        transport.close()
        return False

    async def read(
        self, reader: asyncio.StreamReader, transport: asyncio.BaseTransport
    ) -> ProxyHeader | None:
        """The connection's header; ``None`` when refused: logged, ``transport`` closed.

        A header naming a client binds it as the log context's ``peer`` (the proxy's
        address beside it, as ``proxy``) for the rest of the session's task.

        Example:
            >>> from maildefer import logs; import io; logs.configure(stream=io.StringIO())
            >>> async def demo(data: bytes) -> object:
            ...     reader = asyncio.StreamReader(); reader.feed_data(data); reader.feed_eof()
            ...     closed = []
            ...     transport = type("T", (), {"close": lambda self: closed.append(True)})()
            ...     header = await ProxyGate(()).read(reader, transport)
            ...     return header or closed
            >>> asyncio.run(demo(b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 25\\r\\n")).client
            ('203.0.113.7', 4242)
            >>> asyncio.run(demo(b"EHLO client.example\\r\\n"))  # closed unanswered
            [True]
        """
        try:
            header = await read_header(reader, within=self.deadline)
        except ProxyHeaderError as exc:
            log.info("proxy_refused", reason=str(exc))  # our words, none of the client's bytes
            transport.close()
            return None
        except asyncio.CancelledError:  # the session's task, cancelled by a lost connection
            log.info("proxy_refused", reason="connection closed before a whole PROXY header")
            transport.close()  # a half-closed proxy connection has nothing more to say
            raise
        if header.client is not None:
            context = structlog.contextvars.get_contextvars()
            structlog.contextvars.bind_contextvars(
                peer=sanitize(f"{header.client[0]}:{header.client[1]}"),
                proxy=context.get("peer", ""),
            )
        return header
