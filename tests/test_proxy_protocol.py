"""PROXY protocol v1/v2 (issue 15): the real client's address from a trusted proxy.

A real ``Server`` on port 0, real sockets from 127.0.0.1 playing the proxy: the header is
sent first, then SMTP. The handler records ``message.peer``; the JSON log shows the peer
bound to the session. The parser's own cases are at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import json
import socket
import ssl
import struct
import sys
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from helpers.smarthost import Cert
from helpers.smtp_server import RawClient, make_settings, queued, running, write_handlers

from maildefer.errors import ConfigError
from maildefer.settings import ServerSettings, load_settings
from maildefer.smtp.proxy import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parse,
    parse_v1,
    parse_v2,
    read_header,
    trusted,
)

HANDLERS = """
from maildefer import Queue, route, stateless

PEERS = []

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    PEERS.append(message.peer)
    await Queue("run/posts").push(message)
"""

MSG = b"From: a@sender.org\r\nSubject: hi\r\n\r\nbody\r\n.\r\n"


def v1(src: str, sport: int, dst: str = "192.0.2.1", dport: int = 25) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    if family == "TCP6" and ":" not in dst:
        dst = "2001:db8::1"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(
    src: str = "203.0.113.7",
    sport: int = 4242,
    dst: str = "",
    dport: int = 25,
    *,
    command: int = 1,
    family: int | None = None,
    transport: int = 1,
    tlvs: bytes = b"",
    version: int = 2,
) -> bytes:
    source = ipaddress.ip_address(src)
    if family is None:
        family = 1 if source.version == 4 else 2
    dest = ipaddress.ip_address(dst or ("192.0.2.1" if source.version == 4 else "2001:db8::1"))
    addresses = source.packed + dest.packed + struct.pack("!HH", sport, dport)
    if family not in (1, 2):
        addresses = b""
    body = addresses + tlvs
    return (
        V2_SIGNATURE
        + bytes([version << 4 | command, family << 4 | transport])
        + struct.pack("!H", len(body))
        + body
    )


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.fixture
def handlers(project: Path) -> str:
    return write_handlers(project, HANDLERS)


def peers(module: str) -> list[str]:
    return list(sys.modules[module].PEERS)


def settings_for(project: Path, handlers: str, **server: Any) -> Any:
    server.setdefault("proxy_protocol", True)
    return make_settings(project, handlers, **server)


def events(log_out: io.StringIO, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log_out.getvalue().splitlines() if line.strip()]
    return [line for line in lines if line.get("event") == name]


async def proxied(port: int, header: bytes, *, greet: bool = True) -> RawClient:
    """A connection from 127.0.0.1 (the 'proxy') that sends ``header`` first."""
    client = await RawClient.connect(port, greet=False)
    await client.send(header)
    if greet:
        code, text = await client.reply()
        assert code == 220, text
    return client


async def refused_silently(client: RawClient) -> bytes:
    """Everything the server said until it closed (an RST counts as closed)."""
    said = b""
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(10):
            while chunk := await client.reader.read(65536):
                said += chunk
    await client.close()
    return said


async def send_one(client: RawClient, rcpt: str = "news@example.com") -> int:
    code, text = await client.cmd("EHLO proxy.test")
    assert code == 250, text
    code, text = await client.transaction("a@sender.org", [rcpt], MSG)
    await client.cmd("QUIT")
    await client.close()
    return code


# -- end to end: a trusted proxy ------------------------------------------------------------


async def test_v1_and_v2_headers_make_the_client_the_peer(
    project: Path, handlers: str, log_out: io.StringIO
) -> None:
    headers = [
        v1("203.0.113.7", 4242),
        v1("2001:db8::7", 4243),
        v2("203.0.113.8", 4244),
        # IPv6 with TLVs (ALPN, AUTHORITY, a NOOP): skipped, the address still read.
        v2("2001:db8::8", 4245, tlvs=tlv(0x01, b"smtp") + tlv(0x02, b"mx.test") + tlv(4, b"")),
    ]
    expected = ["203.0.113.7:4242", "2001:db8::7:4243", "203.0.113.8:4244", "2001:db8::8:4245"]
    async with running(settings_for(project, handlers)) as server:
        assert server.port
        for header in headers:
            assert await send_one(await proxied(server.port, header)) == 250
    assert peers(handlers) == expected
    assert [m.peer for m in queued(project / "run" / "posts")] == expected
    # The session's log lines carry the client, and the proxy beside it.
    lines = events(log_out, "message")
    assert [line["peer"] for line in lines] == expected
    assert all(line["proxy"].startswith("127.0.0.1:") for line in lines)


async def test_local_and_unknown_keep_the_proxy_address(project: Path, handlers: str) -> None:
    # v2 LOCAL is the proxy's own health check; v1 UNKNOWN and v2 UNSPEC name no client.
    headers = [v2(command=0), b"PROXY UNKNOWN\r\n", v2(family=0)]
    async with running(settings_for(project, handlers)) as server:
        assert server.port
        for header in headers:
            assert await send_one(await proxied(server.port, header)) == 250
    seen = peers(handlers)
    assert len(seen) == 3 and all(p.startswith("127.0.0.1:") for p in seen), seen


async def test_a_header_split_across_tcp_segments(project: Path, handlers: str) -> None:
    async with running(settings_for(project, handlers)) as server:
        assert server.port
        for header in (v1("203.0.113.7", 4242), v2("2001:db8::9", 4246, tlvs=tlv(4, b"x"))):
            client = await RawClient.connect(server.port, greet=False)
            sock = client.writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(0, len(header), 5):  # 5 bytes a segment, the server reading each
                await client.send(header[i : i + 5])
                await asyncio.sleep(0.01)
            code, text = await client.reply()
            assert code == 220, text
            assert await send_one(client) == 250
    assert peers(handlers) == ["203.0.113.7:4242", "2001:db8::9:4246"]


async def test_per_ip_limit_counts_the_claimed_client(project: Path, handlers: str) -> None:
    settings = settings_for(project, handlers, max_connections_per_ip=1)
    async with running(settings) as server:
        assert server.port
        # All three come from 127.0.0.1: only the claimed clients are counted.
        first = await proxied(server.port, v1("203.0.113.7", 1001))
        other = await proxied(server.port, v2("198.51.100.9", 1002))
        again = await proxied(server.port, v1("203.0.113.7", 1003), greet=False)
        code, text = await again.reply()
        assert code == 421 and "too many connections from your address" in text
        assert await refused_silently(again) == b""
        assert server.tracker.per_ip == {"203.0.113.7": 1, "198.51.100.9": 1}
        assert await send_one(first) == 250
        assert await send_one(other) == 250
        # The first one gone, the same client is welcome again.
        for _ in range(100):
            if "203.0.113.7" not in server.tracker.per_ip:
                break
            await asyncio.sleep(0.02)
        assert await send_one(await proxied(server.port, v1("203.0.113.7", 1004))) == 250
    assert sorted(peers(handlers)) == ["198.51.100.9:1002", "203.0.113.7:1001", "203.0.113.7:1004"]


async def test_starttls_after_the_header_keeps_the_client(
    project: Path, handlers: str, cert: Cert
) -> None:
    settings = settings_for(project, handlers, tls_cert=str(cert.cert), tls_key=str(cert.key))
    async with running(settings) as server:
        assert server.port
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(v2("203.0.113.7", 4242))
        context = ssl.create_default_context(cafile=str(cert.cert))
        smtp = aiosmtplib.SMTP(sock=sock, hostname="localhost", tls_context=context)
        await smtp.connect(start_tls=False)
        await smtp.starttls()
        assert smtp.get_transport_info("ssl_object") is not None
        errors, _ = await smtp.sendmail("a@sender.org", ["news@example.com"], MSG[:-3])
        assert errors == {}
        await smtp.quit()
        # Shut down only once the session is gone: a TLS session still closing when the
        # shutdown says 421 to it raises in close_for_shutdown (not a PROXY matter).
        for _ in range(200):
            if server.tracker.count == 0:
                break
            await asyncio.sleep(0.01)
    # aiosmtpd makes a new session on STARTTLS, with the transport's (the proxy's) peer.
    assert peers(handlers) == ["203.0.113.7:4242"]


# -- end to end: refused -------------------------------------------------------------------


async def test_no_header_closes_without_a_greeting(
    project: Path, handlers: str, log_out: io.StringIO
) -> None:
    async with running(settings_for(project, handlers, proxy_timeout=0.3)) as server:
        assert server.port
        # A client that waits for the banner: nothing, then the close at the deadline.
        silent = await RawClient.connect(server.port, greet=False)
        assert await refused_silently(silent) == b""
        # A client that speaks SMTP at once, a whole transaction pipelined: not a header.
        eager = await RawClient.connect(server.port, greet=False)
        await eager.send(
            b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<news@example.com>\r\nDATA\r\n" + MSG
        )
        assert await refused_silently(eager) == b""
    assert peers(handlers) == [] and queued(project / "run" / "posts") == []
    reasons = [line["reason"] for line in events(log_out, "proxy_refused")]
    assert reasons == [
        "no PROXY header within 0.3 s",
        "no PROXY header (neither v1 nor v2 signature)",
    ]


async def test_an_untrusted_peer_is_closed(
    project: Path, handlers: str, log_out: io.StringIO
) -> None:
    settings = settings_for(project, handlers, trusted_proxies=["10.0.0.0/8", "2001:db8::/32"])
    async with running(settings) as server:
        assert server.port
        client = await RawClient.connect(server.port, greet=False)
        with contextlib.suppress(ConnectionError):
            await client.send(v1("203.0.113.7", 4242) + b"EHLO x\r\n")
        assert await refused_silently(client) == b""
        assert server.tracker.count == 0
    assert peers(handlers) == []
    [line] = events(log_out, "proxy_refused")
    assert line["peer"] == "127.0.0.1" and line["reason"] == "not a trusted proxy"


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 04242 25\r\n", id="v1-leading-zero"),
        pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 4242\r\n", id="v1-field-missing"),
        pytest.param(b"PROXY TCP4 " + b"1" * 120 + b"\r\n", id="v1-too-long"),
        pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 25\n", id="v1-bare-lf"),
        pytest.param(v2(version=1), id="v2-version-1"),
        pytest.param(v2(command=2), id="v2-command-2"),
        pytest.param(v2(transport=2), id="v2-dgram"),
        pytest.param(v2()[:20], id="v2-truncated"),
    ],
)
async def test_a_malformed_header_is_closed(
    project: Path, handlers: str, header: bytes, log_out: io.StringIO
) -> None:
    async with running(settings_for(project, handlers)) as server:
        assert server.port
        client = await proxied(server.port, header, greet=False)
        if header.startswith(V2_SIGNATURE) and len(header) == 20:
            client.writer.write_eof()  # the proxy gave up in the middle
        else:
            with contextlib.suppress(ConnectionError):
                await client.send(b"EHLO x\r\n")
        assert await refused_silently(client) == b""
    assert peers(handlers) == []
    [line] = events(log_out, "proxy_refused")
    assert "PROXY" in line["reason"] and line["session"]


# -- settings -------------------------------------------------------------------------------


def test_trusted_proxies_settings(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = project / "config"
    config.mkdir()
    path = config / "settings.toml"
    path.write_text('[server]\nproxy_protocol = true\ntrusted_proxies = ["10.0.0.0/8", "::1"]\n')
    server = load_settings(path).server
    assert server.proxy_protocol
    assert server.trusted_proxies == [
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1"),
    ]
    monkeypatch.setenv("MAILDEFER_SERVER__TRUSTED_PROXIES", '["2001:db8::/32"]')
    assert load_settings(path).server.trusted_proxies == [ipaddress.ip_network("2001:db8::/32")]
    monkeypatch.delenv("MAILDEFER_SERVER__TRUSTED_PROXIES")
    assert ServerSettings().trusted_proxies == [ipaddress.ip_network("127.0.0.1/32")]
    assert not ServerSettings().proxy_protocol
    for bad, words in [
        ('["10.0.0.1/8"]', "host bits set"),
        ('["proxy.example.com"]', "does not appear to be"),
        ("[8]", "not a string"),
    ]:
        path.write_text(f"[server]\ntrusted_proxies = {bad}\n")
        with pytest.raises(ConfigError) as caught:
            load_settings(path)
        message = str(caught.value)
        assert "server.trusted_proxies" in message and words in message and "\n" not in message
    path.write_text("[server]\nproxy_protocol = true\ntrusted_proxies = []\n")
    with pytest.raises(ConfigError, match="no connection could be accepted"):
        load_settings(path)


# -- the parser ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 25\r\n",
         (("203.0.113.7", 4242), ("192.0.2.1", 25))),
        (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
         (("0.0.0.0", 0), ("255.255.255.255", 65535))),
        (b"PROXY TCP6 2001:DB8::7 ::1 4242 25\r\n", (("2001:db8::7", 4242), ("::1", 25))),
        (b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n", (("::ffff:c000:207", 1), ("::1", 2))),
        (b"PROXY UNKNOWN\r\n", (None, None)),
        (b"PROXY UNKNOWN anything at all here\r\n", (None, None)),
    ],
)  # fmt: skip
def test_v1_accepts(line: bytes, expected: tuple[Any, Any]) -> None:
    header = parse_v1(line)
    assert (header.version, header.client, header.server) == (1, *expected)
    assert parse(line) == header


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 25", "CRLF"),
        (b"PROXY TCP4  203.0.113.7 192.0.2.1 4242 25\r\n", "expected 'PROXY proto"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 25 \r\n", "expected 'PROXY proto"),
        (b"PROXY UDP4 203.0.113.7 192.0.2.1 4242 25\r\n", "not TCP4"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 25\r\n", "bad source port"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 042 25\r\n", "bad source port"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 42 +25\r\n", "bad dest port"),
        (b"PROXY TCP4 203.0.113.07 192.0.2.1 42 25\r\n", "bad source address"),
        (b"PROXY TCP4 203.0.113.7 ::1 42 25\r\n", "bad destination address for TCP4"),
        (b"PROXY TCP6 203.0.113.7 ::1 42 25\r\n", "bad source address for TCP6"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 42 25\r\n", "bad source address for TCP6"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 \xd9\xa4 25\r\n", "ASCII"),
        (b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "longer than 107"),
    ],
)
def test_v1_refuses(line: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError, match=reason):
        parse_v1(line)


def test_v1_at_the_limit() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(line) == 107 and parse_v1(line).client is None


def test_v2_accepts() -> None:
    assert parse_v2(v2("203.0.113.7", 4242)) == ProxyHeader(
        2, ("203.0.113.7", 4242), ("192.0.2.1", 25)
    )
    many = tlv(0x01, b"h2") + tlv(0x05, b"\x00" * 32) + tlv(0x20, b"\x01" + bytes(4))
    assert parse_v2(v2("2001:db8::7", 65535, tlvs=many)).client == ("2001:db8::7", 65535)
    assert parse_v2(v2(transport=0)).client == ("203.0.113.7", 4242)  # transport UNSPEC
    # LOCAL: whatever follows (addresses of any family) is discarded.
    assert parse_v2(v2(command=0)) == ProxyHeader(2, None)
    assert parse_v2(v2(command=0, family=0, transport=0)) == ProxyHeader(2, None)
    assert parse_v2(v2(family=0)) == ProxyHeader(2, None)
    unix = V2_SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", 216) + b"/run/a".ljust(216, b"\0")
    assert parse_v2(unix) == ProxyHeader(2, None)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (v2()[:15], "no signature"),
        (b"\r\n\r\n\x00\r\nQUIX\n" + v2()[12:], "no signature"),
        (v2(version=1), "version 1"),
        (v2(version=3), "version 3"),
        (v2(command=0xF), "command 15"),
        (v2(transport=2), "transport 2"),
        (v2(transport=3), "transport 3"),
        (v2(family=4), "address family 4"),
        (v2() + b"x", "13 bytes after the header, length says 12"),
        (v2()[:-1], "11 bytes after the header, length says 12"),
        (V2_SIGNATURE + bytes([0x21, 0x11, 0, 8]) + bytes(8), "truncated IPv4"),
        (V2_SIGNATURE + bytes([0x21, 0x21, 0, 12]) + bytes(12), "truncated IPv6"),
        (V2_SIGNATURE + bytes([0x21, 0x31, 0, 12]) + bytes(12), "truncated UNIX"),
    ],
)
def test_v2_refuses(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError, match=reason):
        parse_v2(data)


def test_trusted() -> None:
    nets = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]
    assert trusted("10.1.2.3", nets) and trusted("2001:db8::5", nets)
    assert trusted("::ffff:10.1.2.3", nets)  # a dual-stack listener's view of an IPv4 peer
    assert not trusted("11.0.0.1", nets) and not trusted("2001:db9::1", nets)
    assert not trusted("", nets) and not trusted("/run/sock", nets) and not trusted("10.0.0.1", [])


async def test_read_header_takes_only_the_header() -> None:
    def reader(*chunks: bytes, eof: bool = False) -> asyncio.StreamReader:
        stream = asyncio.StreamReader(limit=1001)  # aiosmtpd's reader limit
        for chunk in chunks:
            stream.feed_data(chunk)
        if eof:
            stream.feed_eof()
        return stream

    stream = reader(v2(tlvs=tlv(4, b"abc")), b"EHLO x\r\n")
    assert (await read_header(stream, within=1)).client == ("203.0.113.7", 4242)
    assert await stream.readline() == b"EHLO x\r\n"
    with pytest.raises(ProxyHeaderError, match="closed before a whole PROXY header"):
        await read_header(reader(v2()[:10], eof=True), within=1)
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        await read_header(reader(b"PROXY " + b"1" * 2000), within=1)
    with pytest.raises(ProxyHeaderError, match=r"within 0\.05 s"):
        await read_header(reader(v2()[:-1]), within=0.05)


async def test_the_header_has_its_own_deadline(project: Path, handlers: str) -> None:
    # The idle timer (command_timeout, which says 421) waits for the greeting...
    settings = settings_for(project, handlers, proxy_timeout=0.4, command_timeout=0.1)
    async with running(settings) as server:
        assert server.port
        silent = await RawClient.connect(server.port, greet=False)
        assert await refused_silently(silent) == b""
        # ...and runs again once the header is in.
        idle = await proxied(server.port, v1("203.0.113.7", 4242))
        said = await refused_silently(idle)
        assert said.startswith(b"421 4.4.2"), said
