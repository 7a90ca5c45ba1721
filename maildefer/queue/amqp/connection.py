"""The broker link of one AMQP queue: its connection, its channels, publish and inspect.

Every call that touches the connection goes through :class:`BrokerLink`, so how the
queue connects (and, later, reconnects or fails over) is decided in one place. The
rest of the package asks it for a channel, publishes through it, and reads queue
depths with it. :class:`SyncLink` runs a link of its own on a private event loop for
synchronous callers (``push_sync``).

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
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aio_pika
import aiormq.abc
import structlog
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, ChannelNotFoundEntity

from maildefer.errors import QueueError
from maildefer.queue.backend import refuse_running_loop

BROKER_ERRORS = (AMQPError, ChannelInvalidStateError, OSError, TimeoutError)
"""What the client library raises when the broker or the link fails."""

Declare = Callable[[AbstractRobustConnection, AbstractRobustChannel], Awaitable[None]]
"""Declares a queue's topology on a fresh connection, before anything is published."""

SYNC_IDLE_SECONDS = 1.0
"""How long :class:`SyncLink` keeps its thread and connection without a publish.

A script or a view pushing again soon reuses the connection (a new one costs several
round trips); a ``Queue`` made per request and dropped holds it for a second at most.
"""


def log() -> Any:
    """The logger of the AMQP backend: one name, ``maildefer.queue.amqp``, for the package."""
    return structlog.get_logger("maildefer.queue.amqp")


async def _no_topology(
    connection: AbstractRobustConnection, channel: AbstractRobustChannel
) -> None:
    """A :data:`Declare` that declares nothing (a link used only to look at queues)."""


class BrokerLink:
    """The connection of one queue to the broker and its publishing channel.

    Connects on first use (:meth:`channel`), runs ``declare`` once on the new
    connection, and closes it again if that fails, so a half-declared topology is never
    used.

    Args:
        url: the client library's URL (``amqp://user:pass@host:port/vhost?heartbeat=30``),
            without the ``queue`` parameter.
        label: what errors and log lines name (the queue's name).
        declare: run on each new connection before it is used.
        connect_timeout: seconds to wait for the broker when connecting.
        publish_timeout: seconds to wait for a publisher confirm; then the publish fails
            with a :class:`QueueError` (the message may still arrive: at-least-once).

    Example:
        >>> link = BrokerLink("amqp://h/", label="q")
        >>> link.connected
        False
    """

    def __init__(
        self,
        url: str,
        *,
        label: str,
        declare: Declare = _no_topology,
        connect_timeout: float = 10.0,
        publish_timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.label = label
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self._declare = declare
        self._lock = asyncio.Lock()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None

    def twin(self, declare: Declare) -> BrokerLink:
        """A new link to the same broker with the same timeouts: a connection of its own.

        Example:
            >>> link = BrokerLink("amqp://h/", label="q", connect_timeout=3)
            >>> other = link.twin(_no_topology)
            >>> other is not link, other.url, other.connect_timeout
            (True, 'amqp://h/', 3)
        """
        return BrokerLink(
            self.url,
            label=self.label,
            declare=declare,
            connect_timeout=self.connect_timeout,
            publish_timeout=self.publish_timeout,
        )

    @property
    def connected(self) -> bool:
        """Whether :meth:`channel` has connected (and :meth:`close` has not run since)."""
        return self._channel is not None

    async def channel(self) -> AbstractRobustChannel:
        """The publishing channel (confirms on), connecting and declaring on first use.

        Raises:
            QueueError: the broker cannot be reached.
        """
        if self._channel is not None:
            return self._channel
        async with self._lock:
            if self._channel is not None:
                return self._channel
            try:
                connection = await aio_pika.connect_robust(self.url, timeout=self.connect_timeout)
            except BROKER_ERRORS as exc:
                raise QueueError(f"{self.label}: cannot connect to the broker: {exc!r}") from exc
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                await self._declare(connection, channel)
            except BaseException:
                await connection.close()
                raise
            self._connection, self._channel = connection, channel
            return channel

    def _connected(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise QueueError(f"{self.label}: not connected to the broker")
        return self._connection

    async def consumer_channel(self, prefetch: int) -> AbstractRobustChannel:
        """A new channel of its own for one consumer, holding at most ``prefetch`` unacked.

        Raises:
            QueueError: the broker cannot be reached.
        """
        await self.channel()
        connection = self._connected()
        try:
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
            QueueError: unreachable, refused (nack), unroutable (``mandatory``) or no
                confirm within ``publish_timeout``.
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
            raise QueueError(f"{self.label}: publish to {routing_key!r} failed: {exc!r}") from exc

    async def close(self) -> None:
        """Close the connection (the broker requeues what its consumers held unacked).

        Example:
            >>> import asyncio; link = BrokerLink("amqp://h/", label="q")
            >>> asyncio.run(link.close()); link.connected
            False
        """
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(*BROKER_ERRORS):
                await connection.close()


class SyncLink:
    """A :class:`BrokerLink` for synchronous callers, on an event loop of its own.

    aio-pika is async only: the link lives on a private event loop that a thread of its
    own runs, started by the first :meth:`publish`. The calling thread (any thread, any
    number of them at once) waits for the broker's confirm, bounded by the link's
    connect and publish timeouts. The thread and its connection end after ``idle``
    seconds without a publish, or at :meth:`close`; a later publish starts them again.

    Args:
        make_link: makes the link for each start of the thread (a new connection).
        idle: seconds without a publish before the thread and connection end.

    Example:
        >>> link = SyncLink(lambda: BrokerLink("amqp://nobody:x@127.0.0.1:1/", label="q",
        ...                                    connect_timeout=1))
        >>> try:
        ...     link.publish(b"x", "q", key="k1", headers={})
        ... except QueueError as exc:
        ...     print(str(exc).split(":")[1].strip())
        cannot connect to the broker
        >>> link.close(); link.running
        False
    """

    def __init__(
        self, make_link: Callable[[], BrokerLink], *, idle: float = SYNC_IDLE_SECONDS
    ) -> None:
        self._make_link = make_link
        self._idle = idle
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._link: BrokerLink | None = None
        self._busy = 0
        self._last = 0.0

    @property
    def running(self) -> bool:
        """Whether the thread (and maybe a connection) is there now."""
        return self._loop is not None

    def publish(self, body: bytes, routing_key: str, *, key: str, headers: dict[str, Any]) -> None:
        """:meth:`BrokerLink.publish`, blocking until the broker's confirm.

        Raises:
            QueueError: as :meth:`BrokerLink.publish`, or no answer within the link's
                connect and publish timeouts.
            RuntimeError: called from a running event loop's thread.
        """
        refuse_running_loop("push_sync")
        with self._lock:
            if self._loop is None:
                self._start()
            loop, link = self._loop, self._link
            assert loop is not None and link is not None
            self._busy += 1  # under the lock: the idle check never stops a busy loop
        try:
            future = asyncio.run_coroutine_threadsafe(
                link.publish(body, routing_key, key=key, headers=headers), loop
            )
            bound = link.connect_timeout + link.publish_timeout + 5
            try:
                future.result(timeout=bound)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise QueueError(
                    f"{link.label}: publish to {routing_key!r} failed: no answer in {bound:g} s"
                ) from None
            except concurrent.futures.CancelledError:  # closed meanwhile
                raise QueueError(
                    f"{link.label}: publish to {routing_key!r} failed: closed"
                ) from None
        finally:
            with self._lock:
                self._busy -= 1
                self._last = time.monotonic()

    def _start(self) -> None:
        """With the lock held: a new loop, link and thread."""
        loop = asyncio.new_event_loop()
        link = self._make_link()
        thread = threading.Thread(
            target=self._run, args=(loop, link), name=f"maildefer-amqp-sync:{link.label}"
        )
        thread.daemon = True  # a script that forgot close() still exits
        self._loop, self._link, self._thread = loop, link, thread
        self._last = time.monotonic()
        thread.start()

    def _run(self, loop: asyncio.AbstractEventLoop, link: BrokerLink) -> None:
        asyncio.set_event_loop(loop)
        loop.call_later(self._idle, self._check_idle, loop)
        try:
            loop.run_forever()  # until idle or close()
        finally:
            loop.run_until_complete(link.close())
            # What asyncio.run does at the end: the client's leftover tasks go too.
            leftover = asyncio.all_tasks(loop)
            for task in leftover:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def _check_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the private loop: stop it after ``idle`` seconds without a publish."""
        with self._lock:
            if self._loop is not loop:
                return  # close() took it
            quiet = time.monotonic() - self._last
            if self._busy or quiet < self._idle:
                loop.call_later(max(self._idle - quiet, 0.05), self._check_idle, loop)
                return
            self._loop = self._link = self._thread = None
        loop.stop()

    def close(self) -> None:
        """Close the connection and end the thread, now; blocking (a moment).

        Example:
            >>> link = SyncLink(lambda: BrokerLink("amqp://h/", label="q"))
            >>> link.close(); link.running
            False
        """
        with self._lock:
            loop, thread, link = self._loop, self._thread, self._link
            self._loop = self._link = self._thread = None
        if loop is None or thread is None or link is None:
            return
        with contextlib.suppress(RuntimeError):  # it has just stopped by itself
            loop.call_soon_threadsafe(loop.stop)
        thread.join(link.connect_timeout + 1)  # closing a connection: one round trip


async def ready_counts(
    connection: AbstractRobustConnection, names: Iterable[str], *, label: str
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
