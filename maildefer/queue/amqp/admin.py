"""Broker-side inspection and management of one amqp queue, for ``queue`` and ``status``.

:class:`AmqpAdmin` looks at a queue's broker queues without declaring anything (a
passive declare of each, so ``status`` and ``count`` on a misspelt name create no queue),
and moves buried messages back: :meth:`AmqpAdmin.requeue`.

Counts (``count`` means what maildir's means, messages waiting in the queue):

- ``ready``: in the queue itself, waiting for a consumer;
- ``delayed``: in its delay queues, waiting out a retry backoff (maildir's ``later/``);
- ``undeliverable``: in its undeliverable queue (the whole of that queue when several
  queues share one through ``[undeliverable] path = "amqp://...?queue=DEAD"``).

Messages a consumer holds unacked are in none of them: the broker does not report them
per queue over AMQP.

Requeue takes each dead letter with ``basic.get``, publishes a copy to the queue it came
from (the ``x-maildefer-queue`` header of a buried message, or the broker's ``x-death``
for one dead-lettered at the delivery limit) with its attempts and recoveries reset to
zero, waits for the publisher confirm, and only then acks the dead letter: a crash midway
leaves it in the undeliverable queue (handled twice at worst, never lost).

Example:
    >>> a = AmqpAdmin("amqp://guest:guest@127.0.0.1:5672/?queue=posts")
    >>> a.name, a.dead_name, a.is_dead_letter_queue
    ('posts', 'posts.undeliverable', False)
    >>> AmqpAdmin("amqp://h/?queue=posts.undeliverable").is_dead_letter_queue
    True
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from maildefer.errors import QueueError
from maildefer.queue.amqp.connection import BROKER_ERRORS, BrokerLink
from maildefer.queue.amqp.deliveries import message_key
from maildefer.queue.amqp.topology import (
    H_ATTEMPTS,
    H_QUEUE,
    H_QUEUED_AT,
    H_RECOVERIES,
    Topology,
    dead_letter_name,
    parse_url,
)
from maildefer.queue.backend import QueueOptions

DEAD_SUFFIX = ".undeliverable"
"""The name ending of a queue's own undeliverable queue (``NAME.undeliverable``)."""

_DELAY_NAME = re.compile(r"^(?P<queue>.+)\.delay\.\d+$")
_PASSWORD = re.compile(r"(//[^:/@]*):[^@/]*@")


def redact(url: str) -> str:
    """The URL with its password hidden, for output a monitoring system may keep.

    Example:
        >>> redact("amqp://guest:secret@h1:5672,h2:5672/?queue=q")
        'amqp://guest:***@h1:5672,h2:5672/?queue=q'
        >>> redact("run/posts")
        'run/posts'
    """
    return _PASSWORD.sub(r"\1:***@", url)


@dataclass(frozen=True)
class AmqpCounts:
    """Messages of one amqp queue, by where they wait (see the module docstring).

    Example:
        >>> c = AmqpCounts(ready=3, delayed=1, undeliverable=2); c.waiting
        4
    """

    ready: int
    delayed: int
    undeliverable: int

    @property
    def waiting(self) -> int:
        """Ready plus delayed: what ``queue URL count`` prints (maildir's ``count``)."""
        return self.ready + self.delayed


def _text(value: object) -> str | None:
    """A header value as text (the client library hands field-table strings as bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def origin_of(headers: Mapping[str, Any]) -> str | None:
    """The queue a dead letter came from, or ``None`` when its headers do not say.

    A message the worker buried names it in ``x-maildefer-queue``; one the broker
    dead-lettered (the delivery limit) in the newest ``x-death`` entry. A delay queue's
    name stands for its queue (it dead-letters only back to it).

    Example:
        >>> origin_of({"x-maildefer-queue": "posts"})
        'posts'
        >>> origin_of({"x-death": [{"queue": b"posts", "reason": b"delivery_limit"}]})
        'posts'
        >>> origin_of({"x-death": [{"queue": "posts.delay.2000"}]}), origin_of({})
        ('posts', None)
    """
    origin = _text(headers.get(H_QUEUE))
    deaths = headers.get("x-death")
    if origin is None and isinstance(deaths, list | tuple) and deaths:
        newest = deaths[0]
        origin = _text(newest.get("queue")) if isinstance(newest, Mapping) else None
    if origin is None:
        return None
    delay = _DELAY_NAME.match(origin)
    return delay.group("queue") if delay else origin


def fresh_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers of a requeued copy: no attempt, no death, the first queue time kept.

    The error, reason and ``x-death`` go (they are the dead letter's), and so does the
    broker's ``x-delivery-count`` (a new copy starts at zero by itself).

    Example:
        >>> fresh_headers({"x-maildefer-attempts": 5, "x-maildefer-queued-at-ms": 7,
        ...                "x-maildefer-error": "boom", "x-delivery-count": 2})
        {'x-maildefer-attempts': 0, 'x-maildefer-recoveries': 0, 'x-maildefer-queued-at-ms': 7}
    """
    fresh: dict[str, Any] = {H_ATTEMPTS: 0, H_RECOVERIES: 0}
    queued_at = headers.get(H_QUEUED_AT)
    if isinstance(queued_at, int):
        fresh[H_QUEUED_AT] = queued_at
    return fresh


class AmqpAdmin:
    """Counts and requeue for one amqp queue, through a broker link of its own.

    Args:
        url: the queue's ``amqp://...?queue=NAME`` URL.
        undeliverable: the settings' undeliverable path or ``amqp://`` URL (which names
            the dead-letter queue, as for :class:`~maildefer.queue.amqp.AmqpQueue`).
        options: the queue's retry policy (which delay queues it may have).
        connect_timeout: seconds to wait for the broker.

    Raises:
        ConfigError: the URL is not ``amqp``/``amqps`` or names no queue.

    Example:
        >>> AmqpAdmin("amqp://h/?queue=q", undeliverable="amqp://h/?queue=dead").dead_name
        'dead'
    """

    def __init__(
        self,
        url: str,
        *,
        undeliverable: str | os.PathLike[str] | None = None,
        options: QueueOptions | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.name, connection_url = parse_url(url)
        self.dead_name = dead_letter_name(self.name, undeliverable)
        shared = os.fspath(undeliverable) if undeliverable is not None else ""
        # The settings' shared dead-letter queue, or any NAME.undeliverable, opened itself.
        self.is_dead_letter_queue = self.name.endswith(DEAD_SUFFIX) or (
            shared.startswith(("amqp://", "amqps://")) and parse_url(shared)[0] == self.name
        )
        self._topology = Topology(self.name, self.dead_name, options or QueueOptions())
        # Declares nothing: a link that only looks at queues and publishes to existing ones.
        self._link = BrokerLink(connection_url, label=self.name, connect_timeout=connect_timeout)

    async def __aenter__(self) -> AmqpAdmin:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def counts(self) -> AmqpCounts:
        """Ready, delayed and undeliverable messages; a queue that does not exist is 0.

        Raises:
            QueueError: the broker cannot be reached or failed.
        """
        await self._link.channel()
        delays = self._topology.delay_candidates()
        found = await self._link.counts([self.name, self.dead_name, *delays])
        dead = 0 if self.is_dead_letter_queue else found.get(self.dead_name, 0)
        return AmqpCounts(
            ready=found.get(self.name, 0),
            delayed=sum(found.get(name, 0) for name in delays),
            undeliverable=dead,
        )

    async def requeue(self) -> int:
        """Move dead letters back to their queue, attempts reset; return how many moved.

        On a queue, its own dead letters go back to it (those of other queues sharing
        the undeliverable queue stay). On an undeliverable queue itself, every message
        goes back to the queue it came from; one whose origin is unknown stays.

        Each copy is publisher-confirmed before its dead letter is acked. The pass takes
        at most the messages the queue held when it began, so messages that stay (held
        unacked until the end, then returned by closing the channel) are not met twice.

        Raises:
            QueueError: the broker failed, or a copy was not confirmed (for instance its
                queue no longer exists): what was not moved stays where it was.
        """
        source = self.name if self.is_dead_letter_queue else self.dead_name
        wanted = None if self.is_dead_letter_queue else self.name
        await self._link.channel()
        depth = (await self._link.counts([source])).get(source, 0)
        if depth == 0:
            return 0
        channel = await self._link.consumer_channel(prefetch=1)
        moved = 0
        try:
            queue = await channel.get_queue(source, ensure=False)
            for _ in range(depth):
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                if await self._move(message, wanted):
                    moved += 1
        except BROKER_ERRORS as exc:
            raise QueueError(f"{source}: requeue failed after {moved}: {exc!r}") from exc
        finally:
            # The messages left unacked (other queues', unknown origin) go back now.
            await self._close_quietly(channel)
        return moved

    async def _move(self, message: AbstractIncomingMessage, wanted: str | None) -> bool:
        """Publish a fresh copy to the message's queue (confirmed), then ack the original."""
        headers = dict(message.headers or {})
        origin = origin_of(headers)
        if origin is None or (wanted is not None and origin != wanted):
            return False  # left unacked: returned when the channel closes
        key = message_key(message)
        await self._link.publish(message.body, origin, key=key, headers=fresh_headers(headers))
        await message.ack()
        return True

    @staticmethod
    async def _close_quietly(channel: AbstractChannel) -> None:
        # If the connection went, the broker returns what the channel held anyway.
        with contextlib.suppress(*BROKER_ERRORS):
            await channel.close()

    async def close(self) -> None:
        """Close the connection.

        Example:
            >>> import asyncio; asyncio.run(AmqpAdmin("amqp://h/?queue=q").close())
        """
        await self._link.close()
