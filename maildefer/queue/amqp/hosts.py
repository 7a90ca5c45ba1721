"""The brokers an amqp URL names: one host, or several nodes of one cluster (libpq-style).

``amqp://user:pass@10.0.0.1:5672,10.0.0.2:5672,[fd00::3]/vhost?heartbeat=30``: the
user, the vhost and the query are shared; each host has its own port (5672 by default,
5671 for ``amqps``), an IPv6 address in brackets. :class:`BrokerHosts` keeps them in
order and gives the client library a single-host URL for each, which is all it
understands (:mod:`.connection` tries them in turn).

Example:
    >>> hosts = BrokerHosts.parse("amqp://u:p@a:5672,b:5673,[::1]/v?heartbeat=5")
    >>> [str(a) for a in hosts.addresses]
    ['a:5672', 'b:5673', '[::1]:5672']
    >>> hosts.url_for(1)
    'amqp://u:p@b:5673/v?heartbeat=5'
"""

from __future__ import annotations

from dataclasses import dataclass

from maildefer.errors import ConfigError

DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
"""The port of a host that names none, by scheme."""


@dataclass(frozen=True)
class BrokerAddress:
    """One broker node of a URL: its host and port.

    Example:
        >>> str(BrokerAddress("::1", 5672)), str(BrokerAddress("h", 1))
        ('[::1]:5672', 'h:1')
    """

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class BrokerHosts:
    """The nodes of an amqp URL and what they share (user, vhost, query).

    Attributes:
        scheme: ``amqp`` or ``amqps``.
        userinfo: ``user:pass`` as written (percent-encoded), or ``""``.
        addresses: the nodes, in the URL's order (at least one).
        rest: the path (vhost) and query, as written.

    Example:
        >>> BrokerHosts.parse("amqp://h/").addresses
        (BrokerAddress(host='h', port=5672),)
    """

    scheme: str
    userinfo: str
    addresses: tuple[BrokerAddress, ...]
    rest: str

    @classmethod
    def parse(cls, url: str) -> BrokerHosts:
        """Split a (multi-host) amqp URL; the ``queue`` parameter, if any, stays in it.

        Raises:
            ConfigError: not ``amqp``/``amqps``, an empty host in a list, a bad port or
                an unclosed IPv6 bracket; the message names the URL without its password.

        Example:
            >>> BrokerHosts.parse("amqp://u:secret@a:1,,b/?queue=q")
            Traceback (most recent call last):
            ...
            maildefer.errors.ConfigError: queue 'amqp://u:***@a:1,,b/?queue=q': empty host ...
        """
        scheme, sep, remainder = url.partition("://")
        if not sep or scheme not in DEFAULT_PORTS:
            raise ConfigError(f"queue {url!r}: expected an amqp:// or amqps:// URL")
        cut = min((i for i in (remainder.find("/"), remainder.find("?")) if i >= 0), default=-1)
        netloc, rest = (remainder, "") if cut < 0 else (remainder[:cut], remainder[cut:])
        userinfo, at, hostlist = netloc.rpartition("@")
        shown = f"{scheme}://{mask(userinfo) + at}{hostlist}{rest}"
        items = hostlist.split(",")
        if len(items) == 1 and not items[0]:
            items = ["localhost"]  # amqp:///vhost: the client library's default host
        addresses = tuple(parse_address(item, DEFAULT_PORTS[scheme], shown) for item in items)
        return cls(scheme, userinfo, addresses, rest)

    def url_for(self, index: int) -> str:
        """The single-host URL of node ``index`` for the client library.

        Example:
            >>> BrokerHosts.parse("amqps://a,b:1/").url_for(0)
            'amqps://a:5671/'
        """
        at = "@" if self.userinfo else ""
        return f"{self.scheme}://{self.userinfo}{at}{self.addresses[index]}{self.rest or '/'}"

    def __len__(self) -> int:
        return len(self.addresses)


def mask(userinfo: str) -> str:
    """``user:pass`` with the password hidden, for messages and logs.

    Example:
        >>> mask("guest:guest"), mask("guest"), mask("")
        ('guest:***', 'guest', '')
    """
    user, colon, _ = userinfo.partition(":")
    return f"{user}:***" if colon else user


def parse_address(item: str, default_port: int, shown: str) -> BrokerAddress:
    """One ``host[:port]`` (``[v6][:port]``) of a host list.

    Raises:
        ConfigError: an empty host, an unclosed bracket or a port not in 1..65535.

    Example:
        >>> parse_address("[fd00::1]:5673", 5672, "u"), parse_address("h", 5672, "u")
        (BrokerAddress(host='fd00::1', port=5673), BrokerAddress(host='h', port=5672))
        >>> parse_address("h:x", 5672, "amqp://h:x/")
        Traceback (most recent call last):
        ...
        maildefer.errors.ConfigError: queue 'amqp://h:x/': bad port 'x' for host 'h' ...
    """
    item = item.strip()
    if not item:
        raise ConfigError(f"queue {shown!r}: empty host in the host list")
    if item.startswith("["):
        host, bracket, tail = item[1:].partition("]")
        if not bracket or not host or (tail and not tail.startswith(":")):
            raise ConfigError(f"queue {shown!r}: bad IPv6 host {item!r} (expected [addr]:port)")
        port_text = tail[1:] if tail else ""
    else:
        host, _, port_text = item.partition(":")
        if not host:
            raise ConfigError(f"queue {shown!r}: empty host in the host list")
    if not port_text:
        return BrokerAddress(host, default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(
            f"queue {shown!r}: bad port {port_text!r} for host {host!r} (expected 1-65535)"
        )
    return BrokerAddress(host, int(port_text))
