"""DNS for sender authentication: dnspython, our nameservers, a deadline, a TTL cache.

The checks of :mod:`maildefer.smtp.authcheck` run in a thread (the libraries they use are
synchronous) and look everything up through one :class:`DnsClient`: the ``[auth]
nameservers`` (with their ports) or the system's, every lookup of a message bounded by
that message's deadline, answers kept for their TTL in a :class:`TtlCache` the client
owns (no global cache: two servers in one process never share one). A lookup that times
out or that every server refuses raises :class:`DnsFailure`, which the checks turn into
``temperror``; a name that does not exist, or has no record of the type, is an empty
answer (and cached as such, for the zone's negative TTL).

Example:
    >>> import time
    >>> client = DnsClient([("127.0.0.1", 9)], timeout=0.2)
    >>> client.txt("anything.invalid", deadline=time.monotonic() - 1)
    Traceback (most recent call last):
    ...
    maildefer.smtp.authdns.DnsFailure: anything.invalid TXT: out of time
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Final

import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

MAX_TTL: Final = 86_400.0
"""Seconds an answer is kept at most, whatever its TTL says."""
NEGATIVE_TTL: Final = 60.0
"""Seconds a "no such record" is kept when the answer carries no SOA to say."""
ATTEMPT_TIMEOUT: Final = 2.0
"""Seconds one query to one server may take before dnspython tries again or the next one."""

Records = tuple[object, ...]


class DnsFailure(Exception):
    """A lookup got no usable answer in time (timeout, SERVFAIL, refused): ``temperror``."""


class TtlCache:
    """Answers by (name, type), each until its TTL runs out; thread-safe, bounded.

    Args:
        max_entries: past this, the oldest entries are dropped.
        clock: the monotonic clock (tests pass their own).

    Example:
        >>> now = [0.0]
        >>> cache = TtlCache(clock=lambda: now[0])
        >>> cache.put(("a.test", "TXT"), (b"v=spf1 -all",), ttl=300)
        >>> cache.get(("a.test", "TXT"))
        (b'v=spf1 -all',)
        >>> now[0] = 301; cache.get(("a.test", "TXT")) is None
        True
    """

    def __init__(
        self, max_entries: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._entries: OrderedDict[tuple[str, str], tuple[float, Records]] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries
        self._clock = clock

    def _now(self) -> float:
        return self._clock()

    def get(self, key: tuple[str, str]) -> Records | None:
        """The cached answer, or ``None`` when absent or expired."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            if found[0] <= self._now():
                del self._entries[key]
                return None
            return found[1]

    def put(self, key: tuple[str, str], records: Records, *, ttl: float) -> None:
        """Keep ``records`` for ``ttl`` seconds (capped at :data:`MAX_TTL`; 0: not kept)."""
        if ttl <= 0:
            return
        with self._lock:
            self._entries[key] = (self._now() + min(ttl, MAX_TTL), records)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308 section 5: the SOA's TTL, at most its MINIMUM field."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                minimum = getattr(next(iter(rrset)), "minimum", rrset.ttl)
                return float(min(rrset.ttl, minimum))
    return NEGATIVE_TTL


class DnsClient:
    """Lookups for the checks: our nameservers, a per-message deadline, the TTL cache.

    Args:
        nameservers: (address, port) pairs; empty means the system's (``/etc/resolv.conf``).
        timeout: not used for the deadline (the caller passes one per message), but as the
            longest a single lookup may take.
        cache: the cache to use (default: a new one, owned by this client).

    Raises:
        dns.resolver.NoResolverConfiguration: no nameservers given and none configured.

    Example:
        >>> DnsClient([("127.0.0.1", 5353)]).nameservers
        ['127.0.0.1:5353']
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] = (),
        *,
        timeout: float = 5.0,
        cache: TtlCache | None = None,
    ) -> None:
        if nameservers:
            self._servers: list[str | dns.nameserver.Nameserver] = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers
            ]
        else:
            self._servers = list(dns.resolver.Resolver(configure=True).nameservers)
        self.timeout = timeout
        self.cache = cache if cache is not None else TtlCache()

    @property
    def nameservers(self) -> list[str]:
        """The servers asked, as ``host:port`` (the class example shows one)."""
        out = []
        for server in self._servers:
            if isinstance(server, dns.nameserver.Do53Nameserver):
                out.append(f"{server.address}:{server.port}")
            else:
                out.append(str(server))
        return out

    def _resolver(self) -> dns.resolver.Resolver:
        # One per lookup: a Resolver is cheap, and none is then shared between threads.
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = list(self._servers)
        resolver.timeout = ATTEMPT_TIMEOUT
        resolver.retry_servfail = False
        resolver.cache = None
        return resolver

    def lookup(self, name: str, rdtype: str, *, deadline: float) -> Records:
        """The records of ``name`` (TXT: bytes, A/AAAA: text, MX: (preference, name), PTR: name).

        Raises:
            DnsFailure: no answer before ``deadline`` (monotonic), or the servers failed.
        """
        name = name.rstrip(".").lower()
        key = (name, rdtype)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        left = min(deadline - time.monotonic(), self.timeout)
        if left <= 0:
            raise DnsFailure(f"{name} {rdtype}: out of time")
        try:
            answer = self._resolver().resolve(
                name, rdtype, raise_on_no_answer=False, lifetime=left, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.responses().values())  # type: ignore[no-untyped-call]
            self.cache.put(key, (), ttl=_negative_ttl(responses[0] if responses else None))
            return ()
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong):
            return ()  # not a name DNS could hold: it has no records
        except dns.exception.Timeout as exc:
            raise DnsFailure(f"{name} {rdtype}: timed out ({exc})") from None
        except dns.exception.DNSException as exc:
            raise DnsFailure(f"{name} {rdtype}: {type(exc).__name__}: {exc}") from None
        if answer.rrset is None:
            records: Records = ()
            ttl = _negative_ttl(answer.response)
        else:
            records = tuple(_value(rdata, rdtype) for rdata in answer.rrset)
            ttl = float(answer.rrset.ttl)
        self.cache.put(key, records, ttl=ttl)
        return records

    def txt(self, name: str, *, deadline: float) -> tuple[bytes, ...]:
        """The TXT records of ``name``, each one's strings joined (RFC 7208 3.3).

        Raises:
            DnsFailure: as :meth:`lookup`.
        """
        return tuple(r for r in self.lookup(name, "TXT", deadline=deadline) if isinstance(r, bytes))


def _value(rdata: object, rdtype: str) -> object:
    """One record in the form the checks use."""
    if rdtype == "TXT":
        return b"".join(getattr(rdata, "strings", ()))
    if rdtype == "MX":
        exchange = getattr(rdata, "exchange", None)
        return (getattr(rdata, "preference", 0), str(exchange).rstrip("."))
    if rdtype == "PTR":
        return str(getattr(rdata, "target", "")).rstrip(".")
    return str(getattr(rdata, "address", rdata))
