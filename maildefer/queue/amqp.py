"""The RabbitMQ queue backend: the same ``Queue`` API and worker on a quorum queue.

``Queue("amqp://guest:guest@127.0.0.1:5672/?queue=posts")`` (``amqps://`` for TLS; the
path is the vhost, ``/`` or empty for the default one). Other query parameters
(``heartbeat=30``...) go to the client library. The message body is the same
self-checking envelope + original bytes as a maildir file (:mod:`.envelope`), so a
message moves between backends unchanged and a corrupt one is detected and buried.

Topology, declared on first use (all durable quorum queues: Raft-replicated, fsync'd
before the publisher confirm; RabbitMQ >= 3.10 for message TTL and at-least-once
dead-lettering on quorum queues)::

    posts                 the queue. x-delivery-limit = max_recoveries - 1, so the
                          broker dead-letters a message whose consumer died (channel
                          or connection lost before the ack) max_recoveries times
    posts.undeliverable   dead letters: poison from the delivery limit (x-death says
                          reason delivery_limit) and messages buried by the worker
                          (x-maildefer-reason, -error, -attempts headers)
    posts.delay.<ms>      retry backoff, one queue per base delay (retry_delay doubled
                          per attempt, capped at retry_max_delay). A retried message is
                          published here with a per-message TTL (the base delay times
                          a jitter in [0.8, 1.2]) and dead-lettered back to ``posts``
                          when it expires.

TTLs expire only at the head of a queue; one queue per base delay keeps every message
within its own jitter band (a later message never waits for one due much later).
Dead-lettering from ``posts`` and the delay queues is ``at-least-once`` (hence
``x-overflow: reject-publish``), so an expiring retry or a poison message is never lost
between two queues.

Counting: the state lives in headers of the message (``x-maildefer-attempts``,
``x-maildefer-recoveries``, ``x-maildefer-queued-at-ms``) plus the broker's
``x-delivery-count`` (returns since this copy was published). A retry or release
publishes a copy (confirmed) and then acks the original; a crash between the two
handles the message twice, never zero times (at-least-once).

A worker sets ``prefetch`` (:meth:`AmqpQueue.set_prefetch`) to its concurrency before
``consume()``: the broker then never hands this process more messages than it can run,
and the rest go to other consumers. ``release`` (shutdown) and closing the ``consume()``
iterator hand unhandled messages back as confirmed copies rather than
``nack(requeue=True)``, because a quorum queue counts every requeue toward the delivery
limit and graceful restarts must not turn messages into poison. One race remains on
RabbitMQ 3.10: a message the queue dispatches while the consumer's cancel is in flight
is returned by the broker with its delivery count raised by one.

Limits, by design:

- ``keys``, ``get`` and ``remove`` raise :class:`QueueError`: a broker queue cannot be
  browsed without taking messages off it, and handing them back counts toward the
  delivery limit (browsing would poison messages).
- ``count`` is the messages ready in the queue and its delay queues; messages held
  unacked by consumers are not counted (the broker does not report them per queue).
- ``recover`` has nothing to do: redelivery after a consumer dies is the broker's job.
- The queue's arguments are fixed when it is declared: changing ``max_recoveries`` of an
  existing queue fails with a :class:`QueueError` until the queue is deleted (or the
  limit is set with a RabbitMQ policy instead).

Example:
    >>> q = AmqpQueue("amqp://guest:guest@127.0.0.1:5672/?queue=posts")
    >>> q.name, q.dead_name, q.delay_name(1500)
    ('posts', 'posts.undeliverable', 'posts.delay.1500')
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq.abc
import structlog
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    ConsumerTag,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, ChannelNotFoundEntity

from maildefer.errors import ConfigError, CorruptMessageError, QueueError
from maildefer.mail import MailRequest
from maildefer.queue.backend import BuryReason, Claim, Pushable, QueueOptions, RecoveryReport
from maildefer.queue.envelope import message_parts, request_from_file, wrap
from maildefer.queue.maildir.names import NameGenerator

H_ATTEMPTS = "x-maildefer-attempts"
H_RECOVERIES = "x-maildefer-recoveries"
# Integer milliseconds: AMQP field tables carry a Python float as a 32-bit float, which
# rounds a Unix time to 128 s (found by test_consume_and_ack).
H_QUEUED_AT = "x-maildefer-queued-at-ms"
H_ERROR = "x-maildefer-error"
H_REASON = "x-maildefer-reason"
H_QUEUE = "x-maildefer-queue"
H_BURIED_AT = "x-maildefer-buried-at"

DEFAULT_PREFETCH = 8
"""Unacked messages a consumer may hold when the worker did not say (its concurrency)."""

MAX_ERROR_CHARS = 16_000
"""A header must fit one AMQP frame (128 KiB): a long traceback is cut to this."""

QUIESCE_STEP = 0.05
QUIESCE_MAX = 2.0
"""Closing a consumer waits for a quiet ``QUIESCE_STEP`` (at most ``QUIESCE_MAX`` s)."""

# What the client library raises when the broker or the link fails.
_BROKER_ERRORS = (AMQPError, ChannelInvalidStateError, OSError, TimeoutError)


def _log() -> Any:
    return structlog.get_logger("maildefer.queue.amqp")


@dataclass(eq=False)
class _Consumer:
    """One ``consume()``: its channel, its buffer, and the claims it has handed out."""

    channel: AbstractRobustChannel
    buffer: asyncio.Queue[AbstractIncomingMessage] = field(default_factory=asyncio.Queue)
    outstanding: int = 0
    delivered: int = 0
    finished: bool = False


@dataclass(eq=False)
class _Delivery:
    """A claim's handle: the broker's message and the consumer it came through."""

    message: AbstractIncomingMessage
    consumer: _Consumer | None
    stored_attempts: int
    stored_recoveries: int
    deaths: int
    queued_at: float | None

    @property
    def attempts(self) -> int:
        # A death counts as an attempt, as maildir's recover does.
        return self.stored_attempts + self.deaths

    @property
    def recoveries(self) -> int:
        return self.stored_recoveries + self.deaths


def _int_header(headers: dict[str, Any], name: str) -> int:
    try:
        return max(0, int(headers.get(name) or 0))
    except (TypeError, ValueError):
        return 0


class AmqpQueue:
    """A queue on a RabbitMQ quorum queue (see the module docstring for the topology).

    Args:
        url: ``amqp://user:pass@host:port/vhost?queue=NAME``.
        options: retry and recovery policy (as in ``[queues.NAME]``).
        undeliverable: an ``amqp://...?queue=DEAD`` URL naming the dead-letter queue on the
            same broker and vhost; a maildir path (the global default) is ignored and the
            dead letters go to ``NAME.undeliverable`` on the broker.
        prefetch: unacked messages one ``consume()`` may hold; the worker sets it to its
            concurrency (or calls :meth:`set_prefetch`).
        connect_timeout: seconds to wait for the broker when connecting.
        publish_timeout: seconds to wait for a publisher confirm (a broker under a memory
            or disk alarm blocks publishers); then the push fails with a
            :class:`QueueError` (the message may still arrive: at-least-once).

    Raises:
        ConfigError: the URL is not ``amqp``/``amqps`` or names no queue.

    Example:
        >>> AmqpQueue("amqp://h/vh?queue=q&heartbeat=30").connection_url
        'amqp://h/vh?heartbeat=30'
    """

    def __init__(
        self,
        url: str,
        *,
        options: QueueOptions | None = None,
        undeliverable: str | os.PathLike[str] | None = None,
        prefetch: int | None = None,
        connect_timeout: float = 10.0,
        publish_timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.name, self.connection_url = _parse_url(url)
        dead = os.fspath(undeliverable) if undeliverable is not None else ""
        self.dead_name = (
            _parse_url(dead)[0] if dead.startswith(("amqp://", "amqps://")) else ""
        ) or f"{self.name}.undeliverable"
        self.options = options or QueueOptions()
        self.prefetch = prefetch or DEFAULT_PREFETCH
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self._names = NameGenerator(host=socket.gethostname())
        self._random = random.Random()
        self._lock = asyncio.Lock()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._delays: set[str] = set()
        self._consumers: set[_Consumer] = set()

    def __repr__(self) -> str:
        return f"AmqpQueue({self.name!r})"

    # -- topology ------------------------------------------------------------------------

    def delay_name(self, base_ms: int) -> str:
        """The delay queue for one base backoff, in milliseconds.

        Example:
            >>> AmqpQueue("amqp://h/?queue=q").delay_name(30000)
            'q.delay.30000'
        """
        return f"{self.name}.delay.{base_ms}"

    def base_delay_ms(self, attempts: int) -> int:
        """The un-jittered backoff after the ``attempts``-th failure (0-based), in ms.

        Example:
            >>> o = QueueOptions(retry_delay=1, retry_max_delay=5)
            >>> [AmqpQueue("amqp://h/?queue=q", options=o).base_delay_ms(n) for n in range(4)]
            [1000, 2000, 4000, 5000]
        """
        return round(self.options.backoff(attempts, jitter=1.0) * 1000)

    def set_prefetch(self, prefetch: int) -> None:
        """Unacked messages a later ``consume()`` may hold (the worker's concurrency).

        Example:
            >>> q = AmqpQueue("amqp://h/?queue=q"); q.set_prefetch(3); q.prefetch
            3
        """
        if prefetch <= 0:
            raise ValueError("prefetch must be positive")
        self.prefetch = prefetch

    async def _ready(self) -> AbstractRobustChannel:
        """The publishing channel (confirms on), connecting and declaring on first use."""
        if self._channel is not None:
            return self._channel
        async with self._lock:
            if self._channel is not None:
                return self._channel
            try:
                connection = await aio_pika.connect_robust(
                    self.connection_url, timeout=self.connect_timeout
                )
            except _BROKER_ERRORS as exc:
                raise QueueError(f"{self.name}: cannot connect to the broker: {exc!r}") from exc
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                await self._declare(connection, channel)
            except BaseException:
                await connection.close()
                raise
            self._connection, self._channel = connection, channel
            return channel

    async def _declare(
        self, connection: AbstractRobustConnection, channel: AbstractRobustChannel
    ) -> None:
        """Declare the queue and its dead-letter queue unless they exist already.

        An existing queue is used as it is, whatever its arguments (a changed
        ``max_recoveries`` or a RabbitMQ policy does not make it unusable); so the
        undeliverable queue can be opened as a queue of its own for ``pop``/``count``.
        """
        candidates = [self.delay_name(b) for b in self._delay_bases()]
        existing = await self._counts([self.dead_name, self.name, *candidates], connection)
        self._delays = {name for name in candidates if name in existing}
        specs: list[tuple[str, dict[str, Any]]] = [
            (self.dead_name, {"x-queue-type": "quorum"}),
            (
                self.name,
                {
                    "x-queue-type": "quorum",
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                    "x-delivery-limit": max(0, self.options.max_recoveries - 1),
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self.dead_name,
                },
            ),
        ]
        for name, arguments in specs:
            if name in existing:
                continue
            try:
                await channel.declare_queue(name, durable=True, arguments=arguments)
            except _BROKER_ERRORS as exc:
                raise QueueError(f"{self.name}: cannot declare queue {name!r}: {exc!r}") from exc

    def _delay_bases(self) -> list[int]:
        """The base delays (ms) of every retry the options allow, without duplicates."""
        bases = {self.base_delay_ms(n) for n in range(max(0, self.options.max_attempts - 1))}
        return sorted(b for b in bases if b > 0)

    async def _delay_queue(self, base_ms: int) -> str:
        """The delay queue for ``base_ms``, declared the first time it is needed."""
        name = self.delay_name(base_ms)
        if name not in self._delays:
            channel = await self._ready()
            arguments = {
                "x-queue-type": "quorum",
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.name,
            }
            try:
                await channel.declare_queue(name, durable=True, arguments=arguments)
            except _BROKER_ERRORS as exc:
                raise QueueError(f"{self.name}: cannot declare {name!r}: {exc!r}") from exc
            self._delays.add(name)
        return name

    async def _counts(
        self, names: list[str], connection: AbstractRobustConnection | None = None
    ) -> dict[str, int]:
        """Ready messages per queue (passive declare); queues that do not exist are left out.

        A passive declare of a missing queue closes its channel, so this works on plain
        channels of its own, never on the robust ones (which would reopen themselves).
        """
        connection = connection or self._connection
        if connection is None or connection.transport is None:
            raise QueueError(f"{self.name}: not connected to the broker")
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
        except _BROKER_ERRORS as exc:
            raise QueueError(f"{self.name}: cannot inspect queues: {exc!r}") from exc
        finally:
            if probe is not None and not probe.is_closed:
                with contextlib.suppress(*_BROKER_ERRORS):
                    await probe.close()
        return found

    async def _publish(
        self,
        body: bytes,
        routing_key: str,
        *,
        key: str,
        headers: dict[str, Any],
        expiration: float | None = None,
    ) -> None:
        """Publish persistently and wait for the broker's confirm."""
        channel = await self._ready()
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
        except _BROKER_ERRORS as exc:
            raise QueueError(f"{self.name}: publish to {routing_key!r} failed: {exc!r}") from exc

    # -- push and the user-facing API ---------------------------------------------------

    async def push(self, message: Pushable) -> str:
        """Publish a message; return its key once the broker has confirmed it.

        Raises:
            QueueError: the broker is unreachable, refused (nack) or could not route it.

        Example:
            >>> import asyncio
            >>> q = AmqpQueue("amqp://nobody:x@127.0.0.1:1/?queue=q", connect_timeout=1)
            >>> try:
            ...     asyncio.run(q.push(b"\\n"))
            ... except QueueError as exc:
            ...     print(str(exc).split(":")[1].strip())
            cannot connect to the broker
        """
        raw, envelope = message_parts(message)
        key = self._names.next_key()
        headers = {H_ATTEMPTS: 0, H_RECOVERIES: 0, H_QUEUED_AT: int(time.time() * 1000)}
        await self._publish(wrap(raw, envelope), self.name, key=key, headers=headers)
        return key

    async def count(self) -> int:
        """Messages ready in the queue and its delay queues (not those held by consumers).

        Example:
            >>> AmqpQueue("amqp://h/?queue=q").count.__name__
            'count'
        """
        await self._ready()
        return sum((await self._counts([self.name, *sorted(self._delays)])).values())

    async def keys(self) -> list[str]:
        """Not supported: a broker queue cannot be listed without consuming it.

        Raises:
            QueueError: always.

        Example:
            >>> import asyncio; asyncio.run(AmqpQueue("amqp://h/?queue=q").keys())
            Traceback (most recent call last):
            ...
            maildefer.errors.QueueError: q: keys is not supported on amqp queues ...
        """
        raise self._unsupported("keys")

    async def get(self, key: str) -> MailRequest | None:
        """Not supported: see :meth:`keys`.

        Raises:
            QueueError: always.

        Example:
            >>> import asyncio; asyncio.run(AmqpQueue("amqp://h/?queue=q").get("k"))
            Traceback (most recent call last):
            ...
            maildefer.errors.QueueError: q: get is not supported on amqp queues ...
        """
        raise self._unsupported("get")

    async def remove(self, key: str) -> bool:
        """Not supported: see :meth:`keys`.

        Raises:
            QueueError: always.

        Example:
            >>> import asyncio; asyncio.run(AmqpQueue("amqp://h/?queue=q").remove("k"))
            Traceback (most recent call last):
            ...
            maildefer.errors.QueueError: q: remove is not supported on amqp queues ...
        """
        raise self._unsupported("remove")

    def _unsupported(self, operation: str) -> QueueError:
        return QueueError(
            f"{self.name}: {operation} is not supported on amqp queues (a broker queue "
            "cannot be browsed without redelivering messages, which counts toward their "
            "delivery limit); use pop, count or clear"
        )

    async def pop(self) -> tuple[str, MailRequest] | None:
        """Take one ready message off the queue (basic.get, then ack), or ``None``.

        A corrupt message met on the way is buried (reason ``corrupt``) and skipped.

        Example:
            >>> AmqpQueue("amqp://h/?queue=q").pop.__name__
            'pop'
        """
        channel = await self._ready()
        queue = await channel.get_queue(self.name, ensure=False)
        while True:
            try:
                message = await queue.get(no_ack=False, fail=False)
            except _BROKER_ERRORS as exc:
                raise QueueError(f"{self.name}: pop failed: {exc!r}") from exc
            if message is None:
                return None
            claim = await self._claim(message, None)
            if claim is None:
                continue
            await self.ack(claim)
            return claim.key, claim.message

    async def clear(self) -> int:
        """Purge the ready messages of the queue and its delay queues; return how many.

        Example:
            >>> AmqpQueue("amqp://h/?queue=q").clear.__name__
            'clear'
        """
        await self._ready()
        assert self._connection is not None and self._connection.transport is not None
        total = 0
        names = [self.name, *sorted(self._delays)]
        for name in await self._counts(names):
            try:
                channel = await self._connection.transport.connection.channel()
                try:
                    result = await channel.queue_purge(name)
                finally:
                    await channel.close()
            except ChannelNotFoundEntity:
                continue  # deleted meanwhile
            except _BROKER_ERRORS as exc:
                raise QueueError(f"{self.name}: clear failed: {exc!r}") from exc
            total += result.message_count or 0
        return total

    # -- the worker's half -------------------------------------------------------------

    def consume(self) -> AsyncIterator[Claim]:
        """Claims as the broker delivers them, at most ``prefetch`` unacked at a time.

        Closing the iterator cancels the consumer and hands messages it had received but
        not yet yielded back to the queue; claims already yielded stay ackable until
        they are acked, retried, buried or released.

        Example:
            >>> hasattr(AmqpQueue("amqp://h/?queue=q").consume(), "__anext__")
            True
        """
        return self._claims()

    def claims(self, *, prefetch: int, burst: bool, ready: asyncio.Event) -> AsyncIterator[Claim]:
        """A worker's claims: a consumer with ``prefetch`` unacked messages at most.

        A broker hands a consumer at most ``prefetch`` unacked messages: as many as the
        worker runs at once, so the rest go to other workers.

        Raises:
            ConfigError: ``burst``: a broker queue has no "drained" to stop at.

        Example:
            >>> import asyncio
            >>> q = AmqpQueue("amqp://h/?queue=q")
            >>> q.claims(prefetch=1, burst=True, ready=asyncio.Event())
            Traceback (most recent call last):
            ...
            maildefer.errors.ConfigError: queue amqp://h/?queue=q: --burst needs a maildir queue
        """
        if burst:
            raise ConfigError(f"queue {self.url}: --burst needs a maildir queue")
        self.set_prefetch(prefetch)
        # The consumer registers on the first pull, which follows at once.
        ready.set()
        return self.consume()

    async def _claims(self) -> AsyncIterator[Claim]:
        await self._ready()
        assert self._connection is not None
        try:
            channel = await self._connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self.prefetch)
            queue = await channel.get_queue(self.name, ensure=False)
        except _BROKER_ERRORS as exc:
            raise QueueError(f"{self.name}: cannot start consuming: {exc!r}") from exc
        consumer = _Consumer(channel)
        self._consumers.add(consumer)

        async def deliver(message: AbstractIncomingMessage) -> None:
            consumer.delivered += 1
            if consumer.finished:
                # Sent before the broker saw our cancel: hand it back uncounted.
                consumer.outstanding += 1
                await self._give_back(self._delivery(message, consumer))
                return
            await consumer.buffer.put(message)

        tag: ConsumerTag | None = None
        try:
            try:
                tag = await queue.consume(deliver, no_ack=False)
            except _BROKER_ERRORS as exc:
                raise QueueError(f"{self.name}: cannot start consuming: {exc!r}") from exc
            while True:
                message = await consumer.buffer.get()
                if _stale(message):
                    continue  # its channel died: the broker has requeued it already
                claim = await self._claim(message, consumer)
                if claim is not None:
                    yield claim
        finally:
            await self._stop(consumer, queue, tag)

    async def _stop(
        self, consumer: _Consumer, queue: AbstractQueue, tag: ConsumerTag | None
    ) -> None:
        """Cancel a consumer, hand back what it buffered, close it once nothing is out."""
        consumer.finished = True
        if consumer not in self._consumers or consumer.channel.is_closed:
            return  # the queue was closed: the broker requeued whatever it held
        if tag is not None:
            with contextlib.suppress(*_BROKER_ERRORS):
                await asyncio.wait_for(queue.cancel(tag), self.connect_timeout)
        await self._quiesce(consumer)
        while not consumer.buffer.empty():
            message = consumer.buffer.get_nowait()
            if not _stale(message):
                delivery = self._delivery(message, None)
                await self._give_back(delivery)
        await self._maybe_close(consumer)

    @staticmethod
    async def _quiesce(consumer: _Consumer) -> None:
        """Wait until deliveries sent before the cancel took effect have been dispatched.

        A quorum queue may still deliver a message while the cancel is on its way, and
        the client library hands each delivery over through a few tasks. Those late
        messages hand themselves back (``finished`` is set); closing the channel before
        they do would return them to the broker counted as a consumer death.
        """
        deadline = time.monotonic() + QUIESCE_MAX
        while time.monotonic() < deadline:
            seen = consumer.delivered
            await asyncio.sleep(QUIESCE_STEP)
            if consumer.delivered == seen:
                return

    async def _maybe_close(self, consumer: _Consumer) -> None:
        if consumer.finished and consumer.outstanding <= 0 and consumer in self._consumers:
            self._consumers.discard(consumer)
            with contextlib.suppress(*_BROKER_ERRORS):
                await consumer.channel.close()

    def _delivery(self, message: AbstractIncomingMessage, consumer: _Consumer | None) -> _Delivery:
        headers = dict(message.headers or {})
        queued_at = headers.get(H_QUEUED_AT)
        # Returns of this copy to the queue (quorum queues count them): each one is a
        # consumer that died holding it. A classic queue only says "redelivered".
        deaths = _int_header(headers, "x-delivery-count")
        if "x-delivery-count" not in headers and message.redelivered:
            deaths = 1
        return _Delivery(
            message=message,
            consumer=consumer,
            stored_attempts=_int_header(headers, H_ATTEMPTS),
            stored_recoveries=_int_header(headers, H_RECOVERIES),
            deaths=deaths,
            queued_at=queued_at / 1000 if isinstance(queued_at, int) else None,
        )

    async def _claim(
        self, message: AbstractIncomingMessage, consumer: _Consumer | None
    ) -> Claim | None:
        """A claim for a delivered message, or ``None`` if it was buried on the way."""
        delivery = self._delivery(message, consumer)
        key = message.message_id or hashlib.sha256(message.body).hexdigest()[:32]
        if consumer is not None:
            consumer.outstanding += 1
        try:
            request = request_from_file(message.body)
        except CorruptMessageError as exc:
            claim = self._make_claim(key, MailRequest(b"\n"), delivery)
            await self.bury(claim, f"corrupt: {exc}", "corrupt")
            return None
        claim = self._make_claim(key, request, delivery)
        if claim.recoveries >= self.options.max_recoveries:
            # The broker's limit counts per copy; a retried copy carries earlier deaths.
            error = f"worker died {claim.recoveries} times while handling it; quarantined"
            await self.bury(claim, error, "poison")
            return None
        return claim

    @staticmethod
    def _make_claim(key: str, request: MailRequest, delivery: _Delivery) -> Claim:
        return Claim(
            key=key,
            message=request,
            attempts=delivery.attempts,
            recoveries=delivery.recoveries,
            queued_at=delivery.queued_at,
            handle=delivery,
        )

    @staticmethod
    def _handle(claim: Claim) -> _Delivery:
        if not isinstance(claim.handle, _Delivery):
            raise TypeError("claim was not made by an AmqpQueue")
        return claim.handle

    async def _settle(self, delivery: _Delivery, *, requeue: bool | None = None) -> None:
        """Ack (or nack) a delivery; a dead channel means the broker requeued it already."""
        try:
            if requeue is None:
                await delivery.message.ack()
            else:
                await delivery.message.nack(requeue=requeue)
        except _BROKER_ERRORS as exc:
            _log().warning("amqp_settle_failed", queue=self.name, error=repr(exc))
        finally:
            consumer, delivery.consumer = delivery.consumer, None
            if consumer is not None:
                consumer.outstanding -= 1
                await self._maybe_close(consumer)

    @staticmethod
    def _copy_headers(delivery: _Delivery, attempts: int) -> dict[str, Any]:
        """The headers of a new copy of a delivered message: its counts so far."""
        return {
            H_ATTEMPTS: attempts,
            H_RECOVERIES: delivery.recoveries,
            H_QUEUED_AT: int(
                (delivery.queued_at if delivery.queued_at is not None else time.time()) * 1000
            ),
        }

    @property
    def lease_renewal(self) -> float | None:
        """Never: the broker holds a delivery for as long as the channel lives.

        Example:
            >>> AmqpQueue("amqp://h/?queue=q").lease_renewal is None
            True
        """
        return None

    async def renew(self, claims: Sequence[Claim]) -> None:
        """Nothing to renew (see :attr:`lease_renewal`).

        Example:
            >>> import asyncio; asyncio.run(AmqpQueue("amqp://h/?queue=q").renew([]))
        """

    async def ack(self, claim: Claim) -> None:
        """The handler succeeded: basic.ack.

        Example:
            >>> AmqpQueue("amqp://h/?queue=q").ack.__name__
            'ack'
        """
        await self._settle(self._handle(claim))

    async def retry(self, claim: Claim, error: str) -> bool:
        """Count a failed attempt: publish a copy to its delay queue, or bury it.

        Returns:
            ``True`` if the message will be retried, ``False`` if it was buried.

        Example:
            >>> AmqpQueue("amqp://h/?queue=q").retry.__name__
            'retry'
        """
        delivery = self._handle(claim)
        attempts = claim.attempts + 1
        if attempts >= self.options.max_attempts:
            claim.attempts = attempts
            await self.bury(claim, error, "failed")
            return False
        headers = self._copy_headers(delivery, attempts)
        headers[H_ERROR] = error[:MAX_ERROR_CHARS]
        base = self.base_delay_ms(attempts - 1)
        delay = self.options.backoff(attempts - 1, jitter=self._random.uniform(0.8, 1.2))
        if base <= 0 or delay <= 0:
            target, expiration = self.name, None
        else:
            target, expiration = await self._delay_queue(base), delay
        body = delivery.message.body
        await self._publish(body, target, key=claim.key, headers=headers, expiration=expiration)
        await self._settle(delivery)
        return True

    async def bury(self, claim: Claim, error: str, reason: BuryReason) -> None:
        """Publish the message to the undeliverable queue with its error, then ack it.

        Example:
            >>> AmqpQueue("amqp://h/?queue=q").bury.__name__
            'bury'
        """
        delivery = self._handle(claim)
        headers = self._copy_headers(delivery, claim.attempts)
        headers.update(
            {
                H_ERROR: error[:MAX_ERROR_CHARS],
                H_REASON: reason,
                H_QUEUE: self.name,
                H_BURIED_AT: time.time(),
            }
        )
        body = delivery.message.body
        await self._publish(body, self.dead_name, key=claim.key, headers=headers)
        await self._settle(delivery)

    async def release(self, claim: Claim) -> None:
        """Give the message back unhandled; no attempt and no death is counted.

        A quorum queue counts a nack with requeue toward the delivery limit, so the
        message is published again (confirmed) and the original acked; if the broker is
        unreachable it is nacked instead, or left for the broker to requeue.

        Example:
            >>> AmqpQueue("amqp://h/?queue=q").release.__name__
            'release'
        """
        await self._give_back(self._handle(claim))

    async def _give_back(self, delivery: _Delivery) -> None:
        if _stale(delivery.message):
            # Its channel is gone, so the broker has requeued it: a copy would duplicate it.
            await self._settle(delivery)
            return
        headers = self._copy_headers(delivery, delivery.attempts)
        key = delivery.message.message_id or ""
        try:
            await self._publish(delivery.message.body, self.name, key=key, headers=headers)
        except QueueError as exc:
            _log().warning("amqp_release_failed", queue=self.name, error=str(exc))
            await self._settle(delivery, requeue=True)
            return
        await self._settle(delivery)

    async def recover(self) -> RecoveryReport:
        """Nothing to do: the broker redelivers the messages of dead consumers itself.

        Example:
            >>> import asyncio; asyncio.run(AmqpQueue("amqp://h/?queue=q").recover()).returned
            0
        """
        return RecoveryReport()

    async def close(self) -> None:
        """Close the connection (unacked messages go back to the queue on the broker).

        Example:
            >>> import asyncio; asyncio.run(AmqpQueue("amqp://h/?queue=q").close())
        """
        connection, self._connection, self._channel = self._connection, None, None
        self._delays = set()
        self._consumers.clear()
        if connection is not None:
            with contextlib.suppress(*_BROKER_ERRORS):
                await connection.close()


def _stale(message: AbstractIncomingMessage) -> bool:
    """Whether a message's channel has closed (after a reconnect it cannot be acked)."""
    try:
        message.channel  # noqa: B018 - the property raises when the channel is closed
    except ChannelInvalidStateError:
        return True
    return False


def _parse_url(url: str) -> tuple[str, str]:
    """The queue name of an ``amqp`` URL and the URL for the client library without it.

    Raises:
        ConfigError: not ``amqp``/``amqps``, or no ``queue`` parameter.

    Example:
        >>> _parse_url("amqps://u:p@h:5671/v?queue=posts")
        ('posts', 'amqps://u:p@h:5671/v')
    """
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigError(f"queue {url!r}: expected an amqp:// or amqps:// URL")
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = [value for name, value in query if name == "queue"]
    if not names or not names[-1].strip():
        raise ConfigError(
            f"queue {parts.scheme}://{parts.hostname or ''}{parts.path}: the URL names no queue "
            "(add ?queue=NAME)"
        )
    rest = urlencode([(name, value) for name, value in query if name != "queue"])
    return names[-1].strip(), urlunsplit(parts._replace(query=rest))
