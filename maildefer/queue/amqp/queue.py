"""``AmqpQueue``: the queue backend on RabbitMQ (see :mod:`maildefer.queue.amqp`).

The user-facing half (push, count, pop, clear) and the worker's half (claims, ack,
retry, bury, release) of :class:`~maildefer.queue.backend.QueueBackend`, built on the
broker link (:mod:`.connection`), the queue topology (:mod:`.topology`) and the
deliveries of a consumer (:mod:`.deliveries`).

Example:
    >>> q = AmqpQueue("amqp://guest:guest@127.0.0.1:5672/?queue=posts")
    >>> q.name, q.dead_name, q.delay_name(1500)
    ('posts', 'posts.undeliverable', 'posts.delay.1500')
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from maildefer.errors import ConfigError, CorruptMessageError, QueueError
from maildefer.mail import MailRequest
from maildefer.queue.amqp.connection import BROKER_ERRORS, BrokerLink, log
from maildefer.queue.amqp.deliveries import (
    Consumer,
    Consumers,
    Delivery,
    delivery_of,
    is_stale,
    make_claim,
    message_key,
)
from maildefer.queue.amqp.subscription import Subscription
from maildefer.queue.amqp.sync import SyncLink
from maildefer.queue.amqp.topology import (
    H_ATTEMPTS,
    H_BURIED_AT,
    H_ERROR,
    H_NOT_BEFORE,
    H_QUEUE,
    H_QUEUED_AT,
    H_REASON,
    H_RECOVERIES,
    MAX_ERROR_CHARS,
    Topology,
    dead_letter_name,
    parse_url,
)
from maildefer.queue.backend import BuryReason, Claim, Pushable, QueueOptions, RecoveryReport
from maildefer.queue.envelope import message_parts, request_from_file, wrap
from maildefer.queue.keys import NameGenerator

DEFAULT_PREFETCH = 8
"""Unacked messages a consumer may hold when the worker did not say (its concurrency)."""


class AmqpQueue:
    """A queue on a RabbitMQ quorum queue (see :mod:`maildefer.queue.amqp` for the topology).

    Args:
        url: ``amqp://user:pass@host:port/vhost?queue=NAME``.
        options: retry and recovery policy (as in ``[queues.NAME]``).
        undeliverable: an ``amqp://...?queue=DEAD`` URL naming the dead-letter queue on the
            same broker and vhost; a maildir path (the global default) is ignored and the
            dead letters go to ``NAME.undeliverable`` on the broker.
        prefetch: unacked messages one ``consume()`` may hold; the worker sets it to its
            concurrency (or calls :meth:`set_prefetch`).
        connect_timeout: seconds one connection attempt to one node may take (by
            default ``options.connect_timeout``); a push while no node is reachable
            fails within about that times the number of nodes.
        publish_timeout: seconds to wait for a publisher confirm (a broker under a memory
            or disk alarm blocks publishers; by default ``options.publish_timeout``);
            then the push fails with a :class:`QueueError` (the message may still
            arrive: at-least-once).

    Raises:
        ConfigError: the URL is not ``amqp``/``amqps``, has a malformed host list, or
            names no queue.

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
        connect_timeout: float | None = None,
        publish_timeout: float | None = None,
    ) -> None:
        self.url = url
        self.name, self.connection_url = parse_url(url)
        self.dead_name = dead_letter_name(self.name, undeliverable)
        self.options = options or QueueOptions()
        self.prefetch = prefetch or DEFAULT_PREFETCH
        self._topology = Topology(self.name, self.dead_name, self.options)
        self._link = BrokerLink(
            self.connection_url,
            label=self.name,
            declare=self._topology.declare,
            connect_timeout=self.options.connect_timeout
            if connect_timeout is None
            else connect_timeout,
            publish_timeout=self.options.publish_timeout
            if publish_timeout is None
            else publish_timeout,
        )
        self._sync = SyncLink(self._sync_link)  # push_sync's: a private loop in a thread
        self._names = NameGenerator(host=socket.gethostname())
        self._random = random.Random()
        self._consumers = Consumers()

    def __repr__(self) -> str:
        return f"AmqpQueue({self.name!r})"

    def _sync_link(self) -> BrokerLink:
        """push_sync's link, on a loop of its own: the same broker, its own topology object."""
        return self._link.twin(
            Topology(self.name, self.dead_name, self.options).declare, role="sync"
        )

    @property
    def connect_timeout(self) -> float:
        """Seconds to wait for the broker when connecting (and for a consumer's cancel)."""
        return self._link.connect_timeout

    @property
    def publish_timeout(self) -> float:
        """Seconds to wait for a publisher confirm before a push fails."""
        return self._link.publish_timeout

    # -- topology ------------------------------------------------------------------------

    def delay_name(self, base_ms: int) -> str:
        """The delay queue for one base backoff, in milliseconds.

        Example:
            >>> AmqpQueue("amqp://h/?queue=q").delay_name(30000)
            'q.delay.30000'
        """
        return self._topology.delay_name(base_ms)

    def base_delay_ms(self, attempts: int) -> int:
        """The un-jittered backoff after the ``attempts``-th failure (0-based), in ms.

        Example:
            >>> o = QueueOptions(retry_delay=1, retry_max_delay=5)
            >>> [AmqpQueue("amqp://h/?queue=q", options=o).base_delay_ms(n) for n in range(4)]
            [1000, 2000, 4000, 5000]
        """
        return self._topology.base_delay_ms(attempts)

    def delay_bases(self) -> list[int]:
        """The base delays (ms) of every retry the options allow: one delay queue each.

        Example:
            >>> o = QueueOptions(retry_delay=1, retry_max_delay=3, max_attempts=5)
            >>> AmqpQueue("amqp://h/?queue=q", options=o).delay_bases()
            [1000, 2000, 3000]
        """
        return self._topology.delay_bases()

    def set_prefetch(self, prefetch: int) -> None:
        """Unacked messages a later ``consume()`` may hold (the worker's concurrency).

        Raises:
            ValueError: ``prefetch`` is not positive.

        Example:
            >>> q = AmqpQueue("amqp://h/?queue=q"); q.set_prefetch(3); q.prefetch
            3
        """
        if prefetch <= 0:
            raise ValueError("prefetch must be positive")
        self.prefetch = prefetch

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
        body, key, headers = self._publication(message)
        await self._link.publish(body, self.name, key=key, headers=headers)
        return key

    def push_sync(self, message: Pushable) -> str:
        """:meth:`push` from synchronous code or any thread; its key once confirmed.

        Published through a connection of its own, on a private event loop in a thread
        (:class:`~.connection.SyncLink`), which ends after a second without a push or at
        :meth:`close`/:meth:`close_sync`. The caller waits at most the connect and
        publish timeouts.

        Raises:
            QueueError: the broker is unreachable, refused (nack) or could not route it.
            RuntimeError: called from a running event loop's thread (``await push``).

        Example:
            >>> q = AmqpQueue("amqp://nobody:x@127.0.0.1:1/?queue=q", connect_timeout=1)
            >>> try:
            ...     q.push_sync(b"\\n")
            ... except QueueError as exc:
            ...     print(str(exc).split(":")[1].strip())
            cannot connect to the broker
            >>> q.close_sync()
        """
        body, key, headers = self._publication(message)
        self._sync.publish(body, self.name, key=key, headers=headers)
        return key

    def _publication(self, message: Pushable) -> tuple[bytes, str, dict[str, Any]]:
        """A new message's body, key and headers."""
        raw, envelope = message_parts(message)
        headers = {H_ATTEMPTS: 0, H_RECOVERIES: 0, H_QUEUED_AT: int(time.time() * 1000)}
        return wrap(raw, envelope), self._names.next_key(), headers

    async def count(self) -> int:
        """Messages ready in the queue and its delay queues (not those held by consumers).

        Raises:
            QueueError: the broker is unreachable.
        """
        await self._link.channel()
        return sum((await self._link.counts(self._topology.ready_queues())).values())

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

        Raises:
            QueueError: the broker is unreachable or failed.
        """
        channel = await self._link.channel()
        queue = await channel.get_queue(self.name, ensure=False)
        while True:
            try:
                message = await queue.get(no_ack=False, fail=False)
            except BROKER_ERRORS as exc:
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

        Raises:
            QueueError: the broker is unreachable or failed.
        """
        # Connect first: declaring the topology finds the delay queues that exist.
        await self._link.channel()
        return await self._link.purge(self._topology.ready_queues())

    # -- the worker's half -------------------------------------------------------------

    def consume(self) -> AsyncIterator[Claim]:
        """Claims as the broker delivers them, at most ``prefetch`` unacked at a time.

        Closing the iterator cancels the consumer and hands messages it had received but
        not yet yielded back to the queue; claims already yielded stay ackable until
        they are acked, retried, buried or released.
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
        # Set once the consumer is registered (on the first pull, which follows at once),
        # cleared while a broker outage pauses it (.subscription).
        return self._claims(ready)

    async def _claims(self, ready: asyncio.Event | None = None) -> AsyncIterator[Claim]:
        subscription = Subscription(
            self._link,
            self.name,
            self.prefetch,
            self._consumers,
            give_back=self._give_back,
            ready=ready,
        )
        messages = subscription.messages()
        try:
            async for message, consumer in messages:
                claim = await self._claim(message, consumer)
                if claim is not None:
                    yield claim
        finally:
            await messages.aclose()

    async def _claim(
        self, message: AbstractIncomingMessage, consumer: Consumer | None
    ) -> Claim | None:
        """A claim for a delivered message, or ``None`` if it was buried on the way."""
        delivery = Delivery.of(message, consumer)
        key = message_key(message)
        if consumer is not None:
            consumer.outstanding += 1
        try:
            request = request_from_file(message.body)
        except CorruptMessageError as exc:
            claim = make_claim(key, MailRequest(b"\n"), delivery)
            await self.bury(claim, f"corrupt: {exc}", "corrupt")
            return None
        claim = make_claim(key, request, delivery)
        if claim.recoveries >= self.options.max_recoveries:
            # The broker's limit counts per copy; a retried copy carries earlier deaths.
            error = f"worker died {claim.recoveries} times while handling it; quarantined"
            await self.bury(claim, error, "poison")
            return None
        due = (message.headers or {}).get(H_NOT_BEFORE)
        if isinstance(due, int) and due > time.time() * 1000:
            await self._lap(claim, delivery, due)  # a Retry past the ladder's top
            return None
        return claim

    async def _settle(self, delivery: Delivery, *, requeue: bool | None = None) -> None:
        await self._consumers.settle(delivery, label=self.name, requeue=requeue)

    @property
    def lease_renewal(self) -> float | None:
        """Never: the broker holds a delivery for as long as the channel lives.

        Example:
            >>> AmqpQueue("amqp://h/?queue=q").lease_renewal is None
            True
        """
        return None

    async def renew(self, claims: Sequence[Claim]) -> None:
        """Nothing to renew (see :attr:`lease_renewal`)."""

    async def ack(self, claim: Claim) -> None:
        """The handler succeeded: basic.ack.

        Raises:
            TypeError: another backend made the claim.

        Example:
            >>> import asyncio
            >>> foreign = Claim("k", MailRequest(b"\\n"), 0, 0, None, handle="new/k")
            >>> asyncio.run(AmqpQueue("amqp://h/?queue=q").ack(foreign))
            Traceback (most recent call last):
            ...
            TypeError: claim was not made by an AmqpQueue
        """
        await self._settle(delivery_of(claim))

    async def retry(self, claim: Claim, error: str, delay: float | None = None) -> bool:
        """Count a failed attempt: publish a copy to its delay queue, or bury it.

        The copy carries the attempt count and the error. Its TTL is the base delay times
        a jitter in [0.8, 1.2]; or, for a ``delay`` (a handler's ``Retry``), ``delay``
        rounded UP to the retry ladder's next power of two seconds, whose queue it goes to
        (:meth:`~.topology.Topology.retry_rung_ms`: 1.5 s waits 2 s; past 18.2 h it takes
        laps of the top rung). When the TTL is over the broker moves it back to the queue.

        Returns:
            ``True`` if the message will be retried, ``False`` if it was buried.

        Raises:
            QueueError: the copy could not be published; the original is not acked.
        """
        delivery = delivery_of(claim)
        if await self._orphaned(delivery):
            return True  # the broker redelivers it: a copy now would make two
        attempts = claim.attempts + 1
        if attempts >= self.options.max_attempts:
            claim.attempts = attempts
            await self.bury(claim, error, "failed")
            return False
        headers = delivery.copy_headers(attempts)
        headers[H_ERROR] = error[:MAX_ERROR_CHARS]
        if delay is None:
            base = self.base_delay_ms(attempts - 1)
            wait = self.options.backoff(attempts - 1, jitter=self._random.uniform(0.8, 1.2))
        else:
            # The rung's own TTL, no jitter: one TTL per rung queue, so none waits behind
            # a message due later (TTLs expire at the head only).
            base = self._topology.retry_rung_ms(delay) if delay > 0 else 0
            wait = base / 1000
            if delay > wait:
                headers[H_NOT_BEFORE] = math.ceil((time.time() + delay) * 1000)
        await self._delay(delivery.message.body, claim.key, headers, base, wait)
        await self._settle(delivery)
        return True

    async def _delay(
        self, body: bytes, key: str, headers: dict[str, Any], base_ms: int, wait: float
    ) -> None:
        """Publish a copy to the delay queue ``base_ms`` with TTL ``wait`` (or back at once)."""
        if base_ms <= 0 or wait <= 0:
            target, expiration = self.name, None
        else:
            target, expiration = await self._topology.delay_queue(self._link, base_ms), wait
        await self._link.publish(body, target, key=key, headers=headers, expiration=expiration)

    async def _lap(self, claim: Claim, delivery: Delivery, due_ms: int) -> None:
        """Another lap of the retry ladder for a ``Retry`` not due yet: no attempt counted."""
        if await self._orphaned(delivery):
            return
        stored = delivery.message.headers or {}
        headers = delivery.copy_headers(claim.attempts)
        headers.update({H_NOT_BEFORE: due_ms, H_ERROR: stored.get(H_ERROR, "")})
        rung = self._topology.retry_rung_ms(due_ms / 1000 - time.time())
        await self._delay(delivery.message.body, claim.key, headers, rung, rung / 1000)
        await self._settle(delivery)

    async def bury(self, claim: Claim, error: str, reason: BuryReason) -> None:
        """Publish the message to the undeliverable queue with its error, then ack it.

        The dead letter's headers say why (``x-maildefer-reason``), what failed
        (``-error``), after how many attempts (``-attempts``) and from which queue.

        Raises:
            QueueError: the dead letter could not be published; the original is not acked.
        """
        delivery = delivery_of(claim)
        if await self._orphaned(delivery):
            return  # the broker redelivers it; the next attempt buries it again
        headers = delivery.copy_headers(claim.attempts)
        headers.update(
            {
                H_ERROR: error[:MAX_ERROR_CHARS],
                H_REASON: reason,
                H_QUEUE: self.name,
                H_BURIED_AT: time.time(),
            }
        )
        body = delivery.message.body
        await self._link.publish(body, self.dead_name, key=claim.key, headers=headers)
        await self._settle(delivery)

    async def release(self, claim: Claim) -> None:
        """Give the message back unhandled; no attempt and no death is counted.

        A quorum queue counts a nack with requeue toward the delivery limit, so the
        message is published again (confirmed) and the original acked; if the broker is
        unreachable it is nacked instead, or left for the broker to requeue.
        """
        await self._give_back(delivery_of(claim))

    async def _orphaned(self, delivery: Delivery) -> bool:
        """Settle (skip) a delivery whose channel died; whether it had.

        The broker has requeued it already (a closed channel's unacked messages go
        back): publishing a copy as well would make two, and its ack must never go to
        the channel of a later connection.
        """
        if not is_stale(delivery.message):
            return False
        await self._settle(delivery)
        return True

    async def _give_back(self, delivery: Delivery) -> None:
        if await self._orphaned(delivery):
            return
        headers = delivery.copy_headers(delivery.attempts)
        key = delivery.message.message_id or ""
        try:
            await self._link.publish(delivery.message.body, self.name, key=key, headers=headers)
        except QueueError as exc:
            log().warning("amqp_release_failed", queue=self.name, error=str(exc))
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
        """Close the connections (unacked messages go back to the queue on the broker)."""
        self._topology.forget()
        self._consumers.forget()
        await self._link.close()
        if self._sync.running:
            await asyncio.to_thread(self._sync.close)

    def close_sync(self) -> None:
        """:meth:`close` for synchronous code: closes :meth:`push_sync`'s connection.

        Example:
            >>> q = AmqpQueue("amqp://h/?queue=q"); q.close_sync()
        """
        self._sync.close()
        self._topology.forget()
        self._consumers.forget()
