"""Messages the broker has handed over: consumers, deliveries, and the claims made of them.

A :class:`Consumer` is one ``consume()``: a channel of its own and a buffer of messages
the broker delivered. Each message becomes a :class:`Delivery` (its counts read from its
headers) and then a :class:`~maildefer.queue.backend.Claim` whose handle is that delivery.
:class:`Consumers` settles deliveries and closes a finished consumer's channel once no
claim it handed out is still unsettled (closing it earlier would return those messages
to the broker counted as a consumer death).

Example:
    >>> from types import SimpleNamespace
    >>> message = SimpleNamespace(headers={"x-delivery-count": 1}, redelivered=True)
    >>> d = Delivery.of(message, None)
    >>> d.attempts, d.recoveries
    (1, 1)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, ConsumerTag
from aio_pika.exceptions import ChannelInvalidStateError

from maildefer.mail import MailRequest
from maildefer.queue.amqp.connection import BROKER_ERRORS, log
from maildefer.queue.amqp.topology import H_ATTEMPTS, H_DELIVERY_COUNT, H_QUEUED_AT, H_RECOVERIES
from maildefer.queue.backend import Claim

QUIESCE_STEP = 0.05
QUIESCE_MAX = 2.0
"""Closing a consumer waits for a quiet ``QUIESCE_STEP`` (at most ``QUIESCE_MAX`` s)."""


def int_header(headers: dict[str, Any], name: str) -> int:
    """A non-negative integer header; 0 when it is missing or not a number.

    Example:
        >>> h = {"a": "3", "b": -2, "c": "x"}
        >>> [int_header(h, n) for n in ("a", "b", "c", "missing")]
        [3, 0, 0, 0]
    """
    try:
        return max(0, int(headers.get(name) or 0))
    except (TypeError, ValueError):
        return 0


def is_stale(message: AbstractIncomingMessage) -> bool:
    """Whether a message's channel has closed (after a reconnect it cannot be acked)."""
    try:
        message.channel  # noqa: B018 - the property raises when the channel is closed
    except ChannelInvalidStateError:
        return True
    return False


def message_key(message: AbstractIncomingMessage) -> str:
    """The claim key of a delivered message: its message id, or a digest of its body.

    Example:
        >>> from types import SimpleNamespace
        >>> message_key(SimpleNamespace(message_id="k1", body=b"x"))
        'k1'
        >>> len(message_key(SimpleNamespace(message_id=None, body=b"x")))
        32
    """
    return message.message_id or hashlib.sha256(message.body).hexdigest()[:32]


@dataclass(eq=False)
class Consumer:
    """One ``consume()``: its channel, its buffer, and the claims it has handed out.

    Attributes:
        channel: the consumer's own channel (its prefetch is this consumer's).
        buffer: messages delivered and not yet claimed; ``None`` once the channel is
            lost (what :mod:`.subscription` waits for to subscribe again).
        outstanding: claims handed out and not yet settled.
        delivered: messages the broker has delivered (to see when deliveries stop).
        finished: the consumer is cancelled: late deliveries are handed back.
        lost: why its channel closed under it, once it did.
    """

    channel: AbstractChannel
    buffer: asyncio.Queue[AbstractIncomingMessage | None] = field(default_factory=asyncio.Queue)
    outstanding: int = 0
    delivered: int = 0
    finished: bool = False
    lost: str | None = None

    def channel_lost(self, reason: str) -> None:
        """Its channel closed (the connection or the broker closed it): wake the reader.

        Example:
            >>> consumer = Consumer(channel=None); consumer.channel_lost("gone")
            >>> consumer.lost, consumer.buffer.get_nowait()
            ('gone', None)
        """
        if self.lost is None:
            self.lost = reason
            self.buffer.put_nowait(None)

    async def quiesce(self) -> None:
        """Wait until deliveries sent before the cancel took effect have been dispatched.

        A quorum queue may still deliver a message while the cancel is on its way, and
        the client library hands each delivery over through a few tasks. Those late
        messages hand themselves back (``finished`` is set); closing the channel before
        they do would return them to the broker counted as a consumer death.
        """
        deadline = time.monotonic() + QUIESCE_MAX
        while time.monotonic() < deadline:
            seen = self.delivered
            await asyncio.sleep(QUIESCE_STEP)
            if self.delivered == seen:
                return


@dataclass(eq=False)
class Delivery:
    """A claim's handle: the broker's message and the consumer it came through.

    Attributes:
        message: the delivered message (ack it, nack it, or publish a copy of it).
        consumer: the consumer it came through; ``None`` for ``pop`` or once settled.
        stored_attempts: failed attempts its headers record.
        stored_recoveries: worker deaths its headers record.
        deaths: returns of this copy to the queue since it was published.
        queued_at: Unix time it first entered the queue, if its headers say.
    """

    message: AbstractIncomingMessage
    consumer: Consumer | None
    stored_attempts: int
    stored_recoveries: int
    deaths: int
    queued_at: float | None

    @classmethod
    def of(cls, message: AbstractIncomingMessage, consumer: Consumer | None) -> Delivery:
        """The delivery of a message, its counts read from its headers.

        Example:
            >>> from types import SimpleNamespace
            >>> headers = {"x-maildefer-attempts": 2, "x-maildefer-queued-at-ms": 1500}
            >>> d = Delivery.of(SimpleNamespace(headers=headers, redelivered=False), None)
            >>> d.attempts, d.recoveries, d.queued_at
            (2, 0, 1.5)
        """
        headers = dict(message.headers or {})
        queued_at = headers.get(H_QUEUED_AT)
        # Returns of this copy to the queue (quorum queues count them): each one is a
        # consumer that died holding it. A classic queue only says "redelivered".
        deaths = int_header(headers, H_DELIVERY_COUNT)
        if H_DELIVERY_COUNT not in headers and message.redelivered:
            deaths = 1
        return cls(
            message=message,
            consumer=consumer,
            stored_attempts=int_header(headers, H_ATTEMPTS),
            stored_recoveries=int_header(headers, H_RECOVERIES),
            deaths=deaths,
            queued_at=queued_at / 1000 if isinstance(queued_at, int) else None,
        )

    @property
    def attempts(self) -> int:
        """Failed attempts so far, a death counting as one (as maildir's recover does)."""
        return self.stored_attempts + self.deaths

    @property
    def recoveries(self) -> int:
        """Times a worker died holding the message, in this copy or an earlier one."""
        return self.stored_recoveries + self.deaths

    def copy_headers(self, attempts: int) -> dict[str, Any]:
        """The headers of a new copy of this message: its counts so far.

        Example:
            >>> from types import SimpleNamespace
            >>> m = SimpleNamespace(headers={"x-maildefer-queued-at-ms": 7000}, redelivered=True)
            >>> h = Delivery.of(m, None).copy_headers(attempts=4)
            >>> [h[f"x-maildefer-{n}"] for n in ("attempts", "recoveries", "queued-at-ms")]
            [4, 1, 7000]
        """
        return {
            H_ATTEMPTS: attempts,
            H_RECOVERIES: self.recoveries,
            H_QUEUED_AT: int(
                (self.queued_at if self.queued_at is not None else time.time()) * 1000
            ),
        }


def make_claim(key: str, request: MailRequest, delivery: Delivery) -> Claim:
    """The claim for a delivery, carrying its counts.

    Example:
        >>> from types import SimpleNamespace
        >>> m = SimpleNamespace(headers={"x-maildefer-recoveries": 2}, redelivered=False)
        >>> claim = make_claim("k", MailRequest(b"\\n"), Delivery.of(m, None))
        >>> claim.key, claim.attempts, claim.recoveries, delivery_of(claim).message is m
        ('k', 0, 2, True)
    """
    return Claim(
        key=key,
        message=request,
        attempts=delivery.attempts,
        recoveries=delivery.recoveries,
        queued_at=delivery.queued_at,
        handle=delivery,
    )


def delivery_of(claim: Claim) -> Delivery:
    """The delivery behind a claim an AMQP queue made.

    Raises:
        TypeError: another backend made the claim.

    Example:
        >>> delivery_of(Claim("k", MailRequest(b"\\n"), 0, 0, None, handle="new/f"))
        Traceback (most recent call last):
        ...
        TypeError: claim was not made by an AmqpQueue
    """
    if not isinstance(claim.handle, Delivery):
        raise TypeError("claim was not made by an AmqpQueue")
    return claim.handle


class Consumers:
    """The consumers of one queue whose channel is still open.

    Example:
        >>> consumers = Consumers()
        >>> consumer = consumers.open(channel=None)
        >>> consumer in consumers, len(consumers)
        (True, 1)
    """

    def __init__(self) -> None:
        self._open: set[Consumer] = set()

    def open(self, channel: AbstractChannel) -> Consumer:
        """A new consumer on ``channel``, counted as open until it is closed."""
        consumer = Consumer(channel)
        self._open.add(consumer)
        return consumer

    def __contains__(self, consumer: object) -> bool:
        return consumer in self._open

    def __len__(self) -> int:
        return len(self._open)

    def drop(self, consumer: Consumer) -> None:
        """Forget a consumer whose channel is gone: the broker requeued what it held.

        Example:
            >>> consumers = Consumers(); consumer = consumers.open(channel=None)
            >>> consumers.drop(consumer); consumer in consumers, consumer.finished
            (False, True)
        """
        consumer.finished = True
        self._open.discard(consumer)

    def forget(self) -> None:
        """Forget every consumer: the connection closed and took their channels along."""
        self._open.clear()

    async def close_if_done(self, consumer: Consumer) -> None:
        """Close a finished consumer's channel once none of its claims is unsettled."""
        if consumer.finished and consumer.outstanding <= 0 and consumer in self._open:
            self._open.discard(consumer)
            with contextlib.suppress(*BROKER_ERRORS):
                await consumer.channel.close()

    async def stop(
        self,
        consumer: Consumer,
        queue: AbstractQueue,
        tag: ConsumerTag | None,
        *,
        give_back: Callable[[Delivery], Awaitable[None]],
        cancel_timeout: float,
    ) -> None:
        """Cancel a consumer, hand back what it buffered, close it once nothing is out.

        Args:
            consumer: the consumer that ends (its ``consume()`` iterator was closed).
            queue: the queue it consumes.
            tag: its consumer tag, or ``None`` if it never registered.
            give_back: returns a buffered message to the queue uncounted.
            cancel_timeout: seconds to wait for the broker to confirm the cancel.
        """
        consumer.finished = True
        if consumer not in self._open or consumer.channel.is_closed:
            return  # the queue was closed: the broker requeued whatever it held
        if tag is not None:
            with contextlib.suppress(*BROKER_ERRORS):
                await asyncio.wait_for(queue.cancel(tag), cancel_timeout)
        await consumer.quiesce()
        while not consumer.buffer.empty():
            message = consumer.buffer.get_nowait()
            if message is not None and not is_stale(message):
                await give_back(Delivery.of(message, None))
        await self.close_if_done(consumer)

    async def settle(self, delivery: Delivery, *, label: str, requeue: bool | None = None) -> None:
        """Ack (or nack) a delivery; a dead channel means the broker requeued it already.

        A delivery keeps the channel it came on: after a reconnect its tag means
        nothing on the new channel, so it is never acked there (it is skipped; the
        broker redelivers the message).

        Args:
            delivery: what to settle; it leaves its consumer's count of unsettled claims.
            label: what a log line names (the queue).
            requeue: ``None`` to ack; ``True``/``False`` to nack with or without requeue.
        """
        try:
            if is_stale(delivery.message):
                pass  # the broker has requeued it with its channel: nothing to send
            elif requeue is None:
                await delivery.message.ack()
            else:
                await delivery.message.nack(requeue=requeue)
        except BROKER_ERRORS as exc:
            log().warning("amqp_settle_failed", queue=label, error=repr(exc))
        finally:
            consumer, delivery.consumer = delivery.consumer, None
            if consumer is not None:
                consumer.outstanding -= 1
                await self.close_if_done(consumer)
