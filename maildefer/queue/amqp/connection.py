"""The broker link of one AMQP queue: its connection, its channels, publish and inspect.

Every call that touches the connection goes through :class:`BrokerLink`, so how the
queue connects, reconnects and fails over is decided in one place. The rest of the
package asks it for a channel, publishes through it, and reads queue depths with it.
:class:`~.sync.SyncLink` runs a link of its own on a private event loop for synchronous
callers (``push_sync``).

Why the link owns its reconnects instead of ``aio_pika.connect_robust``: a robust
connection reconnects to the ONE URL it was given (no failover across the nodes of a
cluster), retries in the background while callers wait on it (a push during an outage
hung instead of failing), and restores only the consumers of queues it saw declared:
ours were made with ``get_queue(ensure=False)``, which a robust channel does not
record, so after a broker restart the worker was left alive with zero consumers. Here a
connection is a plain one; when it closes the link forgets it, and the next call
connects again, trying the URL's nodes in turn (starting after the one that was lost),
each attempt bounded by ``connect_timeout``, and declares the topology again on the new
connection. Consumers re-subscribe themselves (:mod:`.subscription`); the deliveries of
a dead channel stay bound to that channel, so they can never be acked on a new one.

Example:
    >>> import asyncio
    >>> link = BrokerLink("amqp://nobody:x@127.0.0.1:1/", label="q", connect_timeout=1)
    >>> try:
    ...     asyncio.run(link.channel())
    ... except QueueError as exc:
    ...     print(str(exc).split(":")[:2])
    ['q', ' cannot connect to the broker']
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aio_pika
import aiormq.abc
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.connection import make_url
from aio_pika.exceptions import (
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    DeliveryError,
    ProbableAuthenticationError,
)

from maildefer.errors import QueueError
from maildefer.queue.amqp.hosts import BrokerHosts

BROKER_ERRORS = (AMQPError, ChannelInvalidStateError, OSError, TimeoutError)
"""What the client library raises when the broker or the link fails."""

Declare = Callable[[AbstractConnection, AbstractChannel], Awaitable[None]]
"""Declares a queue's topology on a fresh connection, before anything is published."""


class BrokerRefused(QueueError):
    """A broker answered and refused: the credentials, the vhost, or the queue's declaration.

    Not an outage: a worker that meets it before it ever consumed exits with it (a
    configuration error must be visible), rather than waiting for a broker to come back.
    """


DEFAULT_CONNECT_TIMEOUT = 5.0
"""Seconds one connection attempt to one node may take (``[queues.NAME] connect_timeout``)."""
HEARTBEAT = 10
"""AMQP heartbeat (s) unless the URL sets ``heartbeat``: a node gone silent (a network cut,
no RST) is noticed within about two of them, not the client library's 60 s default."""
DEFAULT_PUBLISH_TIMEOUT = 10.0
"""Seconds a publish waits for the broker's confirm (``[queues.NAME] publish_timeout``)."""


def log() -> Any:
    """The logger of the AMQP backend: one name, ``maildefer.queue.amqp``, for the package."""
    return structlog.get_logger("maildefer.queue.amqp")


async def _no_topology(connection: AbstractConnection, channel: AbstractChannel) -> None:
    """A :data:`Declare` that declares nothing (a link used only to look at queues)."""


class BrokerLink:
    """The connection of one queue to the broker (any node of its URL) and its channels.

    Connects on first use (:meth:`channel`), runs ``declare`` on each new connection,
    and closes it again if that fails, so a half-declared topology is never used. When
    the connection is lost the link forgets it; the next call connects again (see the
    module docstring). Concurrent callers share one connection attempt, so each waits
    for one attempt at most: a push during an outage fails within
    :attr:`connect_bound` seconds instead of queueing behind the others.

    Args:
        url: the client library's URL without the ``queue`` parameter; several
            ``host:port`` separated by commas name the nodes of one cluster.
        label: what errors and log lines name (the queue's name).
        declare: run on each new connection before it is used.
        connect_timeout: seconds one connection attempt to one node may take.
        publish_timeout: seconds to wait for a publisher confirm; then the publish fails
            with a :class:`QueueError` (the message may still arrive: at-least-once).
        role: what the connection's name says it is for (``rabbitmqctl
            list_connections name``: ``maildefer:<label>:<role>:<pid>``).

    Raises:
        ConfigError: the URL's host list is malformed.

    Example:
        >>> link = BrokerLink("amqp://h1,h2:5673/", label="q")
        >>> link.connected, [str(a) for a in link.hosts.addresses], link.connection_name
        (False, ['h1:5672', 'h2:5673'], 'maildefer:q:queue:...')
    """

    def __init__(
        self,
        url: str,
        *,
        label: str,
        declare: Declare = _no_topology,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT,
        role: str = "queue",
    ) -> None:
        self.url = url
        self.hosts = BrokerHosts.parse(url)
        self.label = label
        self.role = role
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self.losses = 0
        """Connections lost (closed by the broker or the network) so far."""
        self._declare = declare
        self._next = 0  # the node the next attempt starts with
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._attempt: asyncio.Task[AbstractChannel] | None = None
        self._closing: set[asyncio.Future[None]] = set()

    def twin(self, declare: Declare, *, role: str | None = None) -> BrokerLink:
        """A new link to the same brokers with the same timeouts: a connection of its own.

        Example:
            >>> link = BrokerLink("amqp://h/", label="q", connect_timeout=3)
            >>> other = link.twin(_no_topology, role="sync")
            >>> other is not link, other.url, other.connect_timeout, other.role
            (True, 'amqp://h/', 3, 'sync')
        """
        return BrokerLink(
            self.url,
            label=self.label,
            declare=declare,
            connect_timeout=self.connect_timeout,
            publish_timeout=self.publish_timeout,
            role=role or self.role,
        )

    @property
    def connection_name(self) -> str:
        """The name the broker shows for this link's connections (per process)."""
        return f"maildefer:{self.label}:{self.role}:{os.getpid()}"

    @property
    def connect_bound(self) -> float:
        """The longest one connection attempt takes: every node once, then the topology.

        Example:
            >>> BrokerLink("amqp://a,b,c/", label="q", connect_timeout=2).connect_bound
            8.0
        """
        return float(self.connect_timeout * (len(self.hosts) + 1))

    @property
    def connected(self) -> bool:
        """Whether the link holds a live connection now."""
        return self._connection is not None and not self._connection.is_closed

    async def channel(self) -> AbstractChannel:
        """The publishing channel (confirms on), connecting and declaring when needed.

        Raises:
            QueueError: no node of the URL can be reached (one attempt: see the class).
        """
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        attempt = self._attempt
        if attempt is None or attempt.done():
            attempt = asyncio.get_running_loop().create_task(self._open())
            attempt.add_done_callback(_retrieve)
            self._attempt = attempt
        # Shielded: a caller that gives up (its own timeout) does not cancel the others'.
        return await asyncio.shield(attempt)

    async def _open(self) -> AbstractChannel:
        """One attempt: a channel on the live connection, or a new connection."""
        connection = self._connection
        if connection is not None and not connection.is_closed:
            # The connection lives and only the channel died (a channel-level error).
            try:
                async with asyncio.timeout(self.connect_timeout):
                    channel = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
            except BROKER_ERRORS as exc:
                raise QueueError(f"{self.label}: cannot open a channel: {exc!r}") from exc
            self._channel = channel
            return channel
        failures: list[str] = []
        refused = 0
        count = len(self.hosts)
        for step in range(count):
            index = (self._next + step) % count
            # Made here rather than by aio_pika.connect, so that a failed attempt is closed:
            # left to the garbage collector, its __del__ would schedule a close on
            # whatever loop it finds (none, in push_sync's caller: an un-awaited coroutine).
            connection = aio_pika.Connection(
                make_url(self._node_url(index)),
                client_properties={"connection_name": self.connection_name},
            )
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await connection.connect(timeout=self.connect_timeout)
            except BaseException as exc:
                with contextlib.suppress(*BROKER_ERRORS):
                    await connection.close()
                if not isinstance(exc, BROKER_ERRORS):
                    raise
                failures.append(f"{self.hosts.addresses[index]}: {exc!r}")
                refused += isinstance(exc, ProbableAuthenticationError)
                continue
            return await self._adopt(connection, index)
        kind = BrokerRefused if refused == count else QueueError
        raise kind(f"{self.label}: cannot connect to the broker: {'; '.join(failures)}")

    def _node_url(self, index: int) -> str:
        """The client library's URL of one node, with our heartbeat unless the URL has one.

        Example:
            >>> link = BrokerLink("amqp://a,b/v?heartbeat=5", label="q")
            >>> link._node_url(1), BrokerLink("amqp://a/", label="q")._node_url(0)
            ('amqp://b:5672/v?heartbeat=5', 'amqp://a:5672/?heartbeat=10')
        """
        url = self.hosts.url_for(index)
        if "heartbeat" in parse_qs(urlsplit(url).query):
            return url
        return f"{url}{'&' if '?' in url else '?'}heartbeat={HEARTBEAT}"

    async def _adopt(self, connection: AbstractConnection, index: int) -> AbstractChannel:
        """Open the publishing channel on a new connection and declare the topology."""
        try:
            async with asyncio.timeout(self.connect_timeout * 2):
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                await self._declare(connection, channel)
        except BaseException as exc:
            with contextlib.suppress(*BROKER_ERRORS):
                await connection.close()
            if isinstance(exc, BROKER_ERRORS):
                raise QueueError(f"{self.label}: cannot set up the queue: {exc!r}") from exc
            if isinstance(exc, QueueError):  # the declaration was refused
                raise BrokerRefused(str(exc)) from exc
            raise
        connection.close_callbacks.add(lambda _sender, exc: self._lost(connection, index, exc))
        self._connection, self._channel, self._next = connection, channel, index
        return channel

    def _lost(self, connection: AbstractConnection, index: int, exc: object) -> None:
        """The connection closed: forget it; the next attempt starts at the next node."""
        if connection is not self._connection:
            return  # closed by close(), or an older one
        self._connection = self._channel = None
        self._next = (index + 1) % len(self.hosts)
        self.losses += 1
        # Marked closed now, on this loop: the library leaves a connection the broker
        # dropped "open", and its __del__ would schedule the close on whatever loop (or no
        # loop) the garbage collector runs in.
        closing = asyncio.get_running_loop().create_task(connection.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        closing.add_done_callback(_retrieve)

    def _retire(self, channel: AbstractChannel) -> None:
        """Close a publishing channel in the background (publishes in flight still end)."""
        closing = asyncio.ensure_future(channel.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        closing.add_done_callback(_retrieve)

    def _connected(self) -> AbstractConnection:
        connection = self._connection
        if connection is None or connection.is_closed:
            raise QueueError(f"{self.label}: not connected to the broker")
        return connection

    async def consumer_channel(self, prefetch: int) -> AbstractChannel:
        """A new channel of its own for one consumer, holding at most ``prefetch`` unacked.

        Raises:
            QueueError: the broker cannot be reached.
        """
        await self.channel()
        connection = self._connected()
        try:
            async with asyncio.timeout(self.connect_timeout):
                channel = await connection.channel(publisher_confirms=False)
                await channel.set_qos(prefetch_count=prefetch)
        except BROKER_ERRORS as exc:
            raise QueueError(f"{self.label}: cannot start consuming: {exc!r}") from exc
        return channel

    async def counts(self, names: Iterable[str]) -> dict[str, int]:
        """Ready messages per queue; queues that do not exist are left out.

        Raises:
            QueueError: not connected, or the broker failed.
        """
        return await ready_counts(self._connected(), names, label=self.label)

    async def purge(self, names: Iterable[str]) -> int:
        """Purge the ready messages of the queues that exist; return how many went.

        Raises:
            QueueError: the broker failed.
        """
        await self.channel()
        connection = self._connected()
        assert connection.transport is not None
        total = 0
        for name in await self.counts(names):
            try:
                channel = await connection.transport.connection.channel()
                try:
                    result = await channel.queue_purge(name)
                finally:
                    await channel.close()
            except ChannelNotFoundEntity:
                continue  # deleted meanwhile
            except BROKER_ERRORS as exc:
                raise QueueError(f"{self.label}: clear failed: {exc!r}") from exc
            total += result.message_count or 0
        return total

    async def publish(
        self,
        body: bytes,
        routing_key: str,
        *,
        key: str,
        headers: dict[str, Any],
        expiration: float | None = None,
    ) -> None:
        """Publish persistently to a queue and wait for the broker's confirm.

        Args:
            body: the message body.
            routing_key: the queue (through the default exchange).
            key: the message id.
            headers: the message's headers.
            expiration: a per-message TTL in seconds, or ``None``.

        Raises:
            QueueError: unreachable (within :attr:`connect_bound`), refused (nack),
                unroutable (``mandatory``) or no confirm within ``publish_timeout``.
        """
        channel = await self.channel()
        message = aio_pika.Message(
            body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=key,
            content_type="message/rfc822",
            headers=headers,
            expiration=expiration,
        )
        try:
            await channel.default_exchange.publish(
                message, routing_key=routing_key, mandatory=True, timeout=self.publish_timeout
            )
        except BROKER_ERRORS as exc:
            if isinstance(exc, DeliveryError) and self._channel is channel:
                # A nack. On RabbitMQ 3.10 a channel whose quorum queue lost its leader
                # keeps nacking every publish (its queue client state is stale): the
                # next publish gets a new channel, which finds the new leader.
                self._channel = None
                self._retire(channel)
            raise QueueError(f"{self.label}: publish to {routing_key!r} failed: {exc!r}") from exc

    async def close(self) -> None:
        """Close the connection (the broker requeues what its consumers held unacked).

        Example:
            >>> import asyncio; link = BrokerLink("amqp://h/", label="q")
            >>> asyncio.run(link.close()); link.connected
            False
        """
        attempt, self._attempt = self._attempt, None
        if attempt is not None and not attempt.done():
            attempt.cancel()
            with contextlib.suppress(BaseException):
                await attempt
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(*BROKER_ERRORS):
                await connection.close()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a shared attempt's failure as seen: every caller may have given up on it."""
    if not task.cancelled():
        task.exception()


async def ready_counts(
    connection: AbstractConnection, names: Iterable[str], *, label: str
) -> dict[str, int]:
    """Ready messages per queue (passive declare); queues that do not exist are left out.

    A passive declare of a missing queue closes its channel, so this works on plain
    channels of its own, never on the robust ones (which would reopen themselves).

    Args:
        connection: the connection to look through.
        names: the queues to look at.
        label: what an error names (the queue's name).

    Raises:
        QueueError: the connection is down, or the broker failed.
    """
    if connection.transport is None:
        raise QueueError(f"{label}: not connected to the broker")
    raw = connection.transport.connection
    found: dict[str, int] = {}
    probe: aiormq.abc.AbstractChannel | None = None
    try:
        for name in names:
            if probe is None or probe.is_closed:
                probe = await raw.channel()
            try:
                result = await probe.queue_declare(name, passive=True)
            except ChannelNotFoundEntity:
                continue
            found[name] = result.message_count or 0
    except BROKER_ERRORS as exc:
        raise QueueError(f"{label}: cannot inspect queues: {exc!r}") from exc
    finally:
        if probe is not None and not probe.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):
                await probe.close()
    return found
