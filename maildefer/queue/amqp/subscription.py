"""A consumer that outlives its channel: it subscribes, and subscribes again after a loss.

One ``consume()`` of an :class:`~.queue.AmqpQueue` is one :class:`Subscription`. It
opens a consumer channel (:meth:`.connection.BrokerLink.consumer_channel`, which
connects, fails over and declares the topology as needed) and registers a consumer on
it. When the channel closes under it (the broker restarted, the node was lost, the
network dropped) the channel's close callback wakes the reader, the subscription
*pauses* (one ``amqp_paused`` log line, with the reason; the worker's ``ready`` event is
cleared, so its status says it is paused) and tries again, with a short capped backoff,
for as long as it takes: once it has consumed, it never ends on its own (before that, a
broker that refuses the credentials or the queue's declaration ends it with the error).
A consumer the broker cancels on a live channel (its queue deleted) is treated the
same way: that channel is closed and the subscription tries again until the queue is
there. Once a consumer is registered again it *resumes* (one ``amqp_resumed`` line; ``ready``
is set again).

Messages buffered from a dead channel are dropped (the broker has requeued them: it
redelivers every unacked message of a closed channel), and claims already handed out
keep their old channel: their ack is skipped (:meth:`.deliveries.Consumers.settle`),
never sent on the new channel, where the tag would name another message or close it.

Example:
    >>> [round(backoff(n), 2) for n in range(6)]
    [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, ConsumerTag

from maildefer.errors import QueueError
from maildefer.queue.amqp.connection import BROKER_ERRORS, BrokerLink, BrokerRefused, log
from maildefer.queue.amqp.deliveries import Consumer, Consumers, Delivery, is_stale

RESUBSCRIBE_FIRST = 0.25
"""Seconds before the first new subscription attempt after a loss (doubling)..."""
RESUBSCRIBE_MAX = 2.0
"""...up to this many between attempts: a broker back is found within about 2 s."""

GiveBack = Callable[[Delivery], Awaitable[None]]
"""Hands a message back to the queue uncounted (``AmqpQueue._give_back``)."""


def backoff(failures: int) -> float:
    """Seconds before the next subscription attempt after ``failures`` failed ones.

    Example:
        >>> backoff(0), backoff(10)
        (0.25, 2.0)
    """
    return float(min(RESUBSCRIBE_MAX, RESUBSCRIBE_FIRST * 2 ** min(failures, 16)))


class Subscription:
    """The consumer of one ``consume()``, re-established after every loss.

    Args:
        link: the queue's broker link.
        name: the broker queue to consume.
        prefetch: unacked messages the consumer may hold.
        consumers: the queue's open consumers (settling closes a finished one).
        give_back: returns a late or buffered message to the queue uncounted.
        ready: set while a consumer is registered, cleared while paused.

    Attributes:
        paused_since: ``time.monotonic()`` when it paused, or ``None`` while consuming.
        pauses: how many times it paused.
        subscribed: whether a consumer was ever registered. Before that, a broker that
            refuses (:class:`~.connection.BrokerRefused`: credentials, vhost, the
            queue's declaration) ends the iteration with the error; afterwards every
            failure is waited out.

    Example:
        >>> s = Subscription(BrokerLink("amqp://h/", label="q"), "q", 1, Consumers(),
        ...                  give_back=None, ready=asyncio.Event())
        >>> s.paused_since, s.pauses
        (None, 0)
    """

    def __init__(
        self,
        link: BrokerLink,
        name: str,
        prefetch: int,
        consumers: Consumers,
        *,
        give_back: GiveBack,
        ready: asyncio.Event | None = None,
    ) -> None:
        self._link = link
        self._name = name
        self._prefetch = prefetch
        self._consumers = consumers
        self._give_back = give_back
        self._ready = ready
        self._random = random.Random()
        self.paused_since: float | None = None
        self.pauses = 0
        self.subscribed = False

    async def messages(self) -> AsyncGenerator[tuple[AbstractIncomingMessage, Consumer]]:
        """Live messages and the consumer each came through, across reconnects.

        Closing the iterator cancels the consumer and hands back what it buffered (as
        :meth:`.deliveries.Consumers.stop` does).
        """
        current: tuple[Consumer, AbstractQueue, ConsumerTag] | None = None
        failures = 0
        try:
            while True:
                try:
                    current = await self._subscribe()
                except BrokerRefused:
                    if not self.subscribed:
                        raise  # a configuration error at start: visible, not a wait
                    self._pause("refused by the broker")
                    await asyncio.sleep(RESUBSCRIBE_MAX)
                    continue
                except QueueError as exc:
                    self._pause(str(exc))
                    await asyncio.sleep(backoff(failures) * self._random.uniform(0.8, 1.2))
                    failures += 1
                    continue
                failures = 0
                self.subscribed = True
                self._resume()
                consumer = current[0]
                while (message := await consumer.buffer.get()) is not None:
                    if not is_stale(message):  # its channel died: the broker requeued it
                        yield message, consumer
                current = None
                self._consumers.drop(consumer)
                self._pause(consumer.lost or "channel closed")
                if not consumer.channel.is_closed:  # cancelled by the broker: a new one
                    with contextlib.suppress(*BROKER_ERRORS):
                        await consumer.channel.close()
        finally:
            if current is not None:
                consumer, queue, tag = current
                await self._consumers.stop(
                    consumer,
                    queue,
                    tag,
                    give_back=self._give_back,
                    cancel_timeout=self._link.connect_timeout,
                )

    async def _subscribe(self) -> tuple[Consumer, AbstractQueue, ConsumerTag]:
        """A consumer channel and a consumer registered on it.

        Raises:
            QueueError: the broker cannot be reached or refused the consumer.
        """
        channel = await self._link.consumer_channel(self._prefetch)
        consumer = self._consumers.open(channel)
        # Registered before consuming: a channel that dies at once still wakes the reader.
        channel.close_callbacks.add(
            lambda _channel, exc: consumer.channel_lost(_reason(exc)), weak=False
        )
        # The broker may cancel a consumer on a channel that stays open (its queue was
        # deleted, say): without this the worker would stay alive with no consumer.
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(
            lambda _frame: consumer.channel_lost("consumer cancelled by the broker")
        )

        async def deliver(message: AbstractIncomingMessage) -> None:
            consumer.delivered += 1
            if consumer.finished:
                # Sent before the broker saw our cancel: hand it back uncounted.
                consumer.outstanding += 1
                await self._give_back(Delivery.of(message, consumer))
                return
            consumer.buffer.put_nowait(message)

        try:
            queue = await channel.get_queue(self._name, ensure=False)
            async with asyncio.timeout(self._link.connect_timeout):
                tag = await queue.consume(deliver, no_ack=False)
        except BROKER_ERRORS as exc:
            self._consumers.drop(consumer)
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.close()
            raise QueueError(f"{self._name}: cannot start consuming: {exc!r}") from exc
        return consumer, queue, tag

    def _pause(self, reason: str) -> None:
        """No consumer now: clear ``ready``; log ``amqp_paused`` once per outage."""
        if self._ready is not None:
            self._ready.clear()
        if self.paused_since is None:
            self.paused_since = time.monotonic()
            self.pauses += 1
            log().warning("amqp_paused", queue=self._name, reason=reason)

    def _resume(self) -> None:
        """A consumer again: set ``ready``; log ``amqp_resumed`` if it had paused."""
        if self.paused_since is not None:
            paused = time.monotonic() - self.paused_since
            self.paused_since = None
            log().info("amqp_resumed", queue=self._name, paused_s=round(paused, 3))
        if self._ready is not None:
            self._ready.set()


def _reason(exc: BaseException | None) -> str:
    """What a closed channel's exception says, for the ``amqp_paused`` line.

    Example:
        >>> _reason(None), _reason(ConnectionResetError("reset"))
        ('channel closed', "ConnectionResetError('reset')")
    """
    return "channel closed" if exc is None else repr(exc)
