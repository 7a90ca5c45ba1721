"""A DNS server for the auth tests: dnslib on a free port of 127.0.0.1, UDP and TCP.

``Zone`` holds the records a test publishes (SPF and DMARC TXT records, DKIM keys, A
records) and answers from them: NXDOMAIN with an SOA for a name it does not hold, an
empty NOERROR for a name that has other types. Every query is recorded (``zone.queries``)
so a test can count what was looked up. ``silent_dns()`` is a port that never answers.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from dnslib import QTYPE, RCODE, RR, SOA, TXT, A, DNSLabel, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer


@dataclass
class Zone(BaseResolver):  # type: ignore[misc]
    """Records by (name, type); answers queries for them."""

    records: dict[tuple[str, str], list[RR]] = field(default_factory=dict)
    queries: list[tuple[str, str]] = field(default_factory=list)
    ttl: int = 300
    lock: threading.Lock = field(default_factory=threading.Lock)

    def txt(self, name: str, text: str, ttl: int | None = None) -> None:
        # TXT strings are at most 255 octets: a DKIM key is split into several.
        chunks = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
        self._add(name, "TXT", TXT(chunks), ttl)

    def a(self, name: str, address: str, ttl: int | None = None) -> None:
        self._add(name, "A", A(address), ttl)

    def _add(self, name: str, rtype: str, rdata: object, ttl: int | None) -> None:
        key = (name.lower().rstrip("."), rtype)
        rr = RR(name, getattr(QTYPE, rtype), rdata=rdata, ttl=self.ttl if ttl is None else ttl)
        self.records.setdefault(key, []).append(rr)

    def count(self, name: str, rtype: str = "TXT") -> int:
        with self.lock:
            return self.queries.count((name.lower().rstrip("."), rtype))

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).lower().rstrip(".")
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((qname, qtype))
        found = self.records.get((qname, qtype))
        if found:
            for rr in found:
                reply.add_answer(rr)
            return reply
        if not any(name == qname for name, _ in self.records):
            reply.header.rcode = RCODE.NXDOMAIN
        soa = SOA("ns.test", "hostmaster.test", (1, 3600, 600, 86400, 60))
        reply.add_auth(RR(DNSLabel("test"), QTYPE.SOA, rdata=soa, ttl=60))
        return reply


class _QuietLogger(DNSLogger):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)


@dataclass
class RunningDns:
    zone: Zone
    port: int

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def dns_server(zone: Zone | None = None) -> Iterator[RunningDns]:
    """Serve ``zone`` on UDP and TCP (same port) of 127.0.0.1 until the block ends."""
    zone = zone if zone is not None else Zone()
    for _ in range(20):
        udp = DNSServer(zone, address="127.0.0.1", port=0, logger=_QuietLogger())
        port = udp.server.server_address[1]
        try:
            tcp = DNSServer(zone, address="127.0.0.1", port=port, tcp=True, logger=_QuietLogger())
        except OSError:
            udp.server.server_close()
            continue
        break
    else:
        raise RuntimeError("no free port for UDP and TCP together")
    servers: list[socketserver.BaseServer] = [udp.server, tcp.server]
    # A short poll interval: shutdown() waits for the next poll.
    threads = [
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        for s in servers
    ]
    for thread in threads:
        thread.start()
    try:
        yield RunningDns(zone, port)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(5)


@contextlib.contextmanager
def silent_dns() -> Iterator[str]:
    """A nameserver address whose UDP port receives queries and never answers them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()
