"""The RabbitMQ side of one queue: its URL, its queues and their arguments, its headers.

One maildefer queue is three kinds of quorum queue on the broker (see
:mod:`maildefer.queue.amqp`): the queue, its undeliverable queue, and one delay queue per
base retry delay (and per rung of the ladder a handler's ``Retry`` rounds up to).
:class:`Topology` names them and declares them; the ``H_*`` constants are the headers a
message carries its counts in.

Example:
    >>> t = Topology("posts", "posts.undeliverable", QueueOptions(max_recoveries=3))
    >>> t.main_arguments()["x-delivery-limit"], t.delay_name(1500)
    (2, 'posts.delay.1500')
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aio_pika.abc import AbstractChannel, AbstractConnection

from maildefer.errors import ConfigError, QueueError
from maildefer.queue.amqp.connection import BROKER_ERRORS, BrokerLink, ready_counts
from maildefer.queue.amqp.hosts import BrokerHosts
from maildefer.queue.backend import QueueOptions

H_ATTEMPTS = "x-maildefer-attempts"
H_RECOVERIES = "x-maildefer-recoveries"
# Integer milliseconds: AMQP field tables carry a Python float as a 32-bit float, which
# rounds a Unix time to 128 s (found by test_consume_and_ack).
H_QUEUED_AT = "x-maildefer-queued-at-ms"
H_ERROR = "x-maildefer-error"
H_REASON = "x-maildefer-reason"
H_QUEUE = "x-maildefer-queue"
H_BURIED_AT = "x-maildefer-buried-at"
H_NOT_BEFORE = "x-maildefer-not-before-ms"
"""Integer ms: a handler's ``Retry`` longer than the ladder's top comes back no sooner."""
H_DELIVERY_COUNT = "x-delivery-count"
"""The broker's count of returns of this copy to a quorum queue (consumer deaths)."""

MAX_ERROR_CHARS = 16_000
"""A header must fit one AMQP frame (128 KiB): a long traceback is cut to this."""

RETRY_LADDER_MS: tuple[int, ...] = tuple(1000 << n for n in range(17))
"""The delay queues a handler's ``Retry(delay=...)`` may use: 1 s, 2 s, 4 s ... 2**16 s
(18.2 h), 17 queues at most whatever delays handlers ask for (see
:meth:`Topology.retry_rung_ms`)."""


def parse_url(url: str) -> tuple[str, str]:
    """The queue name of an ``amqp`` URL and the URL for the client library without it.

    Several ``host:port`` separated by commas name the nodes of one cluster
    (:mod:`.hosts`); they stay in the returned URL.

    Raises:
        ConfigError: not ``amqp``/``amqps``, a malformed host list, or no ``queue``
            parameter.

    Example:
        >>> parse_url("amqps://u:p@h:5671/v?queue=posts")
        ('posts', 'amqps://u:p@h:5671/v')
        >>> parse_url("amqp://h/?heartbeat=5&queue=a&queue=b")
        ('b', 'amqp://h/?heartbeat=5')
        >>> parse_url("amqp://u:p@h1:5672,h2:5672/?queue=posts")
        ('posts', 'amqp://u:p@h1:5672,h2:5672/')
    """
    hosts = BrokerHosts.parse(url)  # the scheme and every host:port, checked
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = [value for name, value in query if name == "queue"]
    if not names or not names[-1].strip():
        nodes = ",".join(str(a) for a in hosts.addresses)
        raise ConfigError(
            f"queue {hosts.scheme}://{nodes}{parts.path}: the URL names no queue (add ?queue=NAME)"
        )
    rest = urlencode([(name, value) for name, value in query if name != "queue"])
    return names[-1].strip(), urlunsplit(parts._replace(query=rest))


def dead_letter_name(name: str, undeliverable: str | os.PathLike[str] | None) -> str:
    """The undeliverable queue of queue ``name``.

    Args:
        name: the queue.
        undeliverable: an ``amqp://...?queue=DEAD`` URL on the same broker and vhost; a
            maildir path (the global default) or ``None`` means ``NAME.undeliverable``.

    Example:
        >>> dead_letter_name("a", "run/undeliverable"), dead_letter_name("a", "amqp://h/?queue=d")
        ('a.undeliverable', 'd')
    """
    dead = os.fspath(undeliverable) if undeliverable is not None else ""
    named = parse_url(dead)[0] if dead.startswith(("amqp://", "amqps://")) else ""
    return named or f"{name}.undeliverable"


class Topology:
    """The broker queues of one maildefer queue: their names, arguments and declaration.

    Args:
        name: the queue.
        dead_name: its undeliverable queue.
        options: the retry policy, which fixes the delay queues and the delivery limit.

    Example:
        >>> o = QueueOptions(retry_delay=1, retry_max_delay=3, max_attempts=4)
        >>> Topology("q", "q.dead", o).delay_bases()
        [1000, 2000, 3000]
    """

    def __init__(self, name: str, dead_name: str, options: QueueOptions) -> None:
        self.name = name
        self.dead_name = dead_name
        self.options = options
        # The delay queues known to exist: found by declare() or declared since.
        self._delays: set[str] = set()

    def delay_name(self, base_ms: int) -> str:
        """The delay queue for one base backoff, in milliseconds.

        Example:
            >>> Topology("q", "d", QueueOptions()).delay_name(30000)
            'q.delay.30000'
        """
        return f"{self.name}.delay.{base_ms}"

    def base_delay_ms(self, attempts: int) -> int:
        """The un-jittered backoff after the ``attempts``-th failure (0-based), in ms.

        Example:
            >>> t = Topology("q", "d", QueueOptions(retry_delay=1, retry_max_delay=5))
            >>> [t.base_delay_ms(n) for n in range(4)]
            [1000, 2000, 4000, 5000]
        """
        return round(self.options.backoff(attempts, jitter=1.0) * 1000)

    def delay_bases(self) -> list[int]:
        """The base delays (ms) of every retry the options allow, without duplicates.

        Example:
            >>> Topology("q", "d", QueueOptions(retry_delay=0, max_attempts=3)).delay_bases()
            []
        """
        bases = {self.base_delay_ms(n) for n in range(max(0, self.options.max_attempts - 1))}
        return sorted(b for b in bases if b > 0)

    def retry_rung_ms(self, delay: float) -> int:
        """The delay queue (ms) for a handler's ``Retry(delay)``: the ladder rung above it.

        Rounded UP to the smallest power of two seconds at least ``delay``
        (:data:`RETRY_LADDER_MS`: 1.5 s waits 2 s, 3 s waits 4 s, 0.2 s waits 1 s), so
        the message comes back after at least the delay and under twice it (1 s at
        least). Each rung queue holds messages of one TTL, so none waits behind a later
        one. A delay past the top (18.2 h) returns the top: the retry then takes laps of
        it until its ``x-maildefer-not-before-ms`` (:class:`~.queue.AmqpQueue`).

        Example:
            >>> t = Topology("q", "d", QueueOptions())
            >>> [t.retry_rung_ms(d) for d in (0.2, 1.5, 2, 3, 86400)]
            [1000, 2000, 2000, 4000, 65536000]
        """
        wanted = delay * 1000
        return next((rung for rung in RETRY_LADDER_MS if rung >= wanted), RETRY_LADDER_MS[-1])

    def delay_candidates(self) -> list[str]:
        """Every delay queue the queue may have: its backoffs' and the retry ladder's.

        A ``Retry``'s queue of an earlier run (or another process) may hold messages, so
        looking for the delay queues means looking for all of these.

        Example:
            >>> t = Topology("q", "d", QueueOptions(retry_delay=30, retry_max_delay=60))
            >>> t.delay_candidates()[:2], len(t.delay_candidates())
            (['q.delay.1000', 'q.delay.2000'], 19)
        """
        bases = {*self.delay_bases(), *RETRY_LADDER_MS}
        return [self.delay_name(base) for base in sorted(bases)]

    def ready_queues(self) -> list[str]:
        """The queue and the delay queues known to exist: where its messages wait.

        Example:
            >>> Topology("q", "d", QueueOptions()).ready_queues()
            ['q']
        """
        return [self.name, *sorted(self._delays)]

    def main_arguments(self) -> dict[str, Any]:
        """The arguments of the queue itself.

        ``x-delivery-limit`` is ``max_recoveries - 1``: the broker dead-letters a message
        whose consumer died holding it ``max_recoveries`` times. Dead-lettering is
        at-least-once (hence ``reject-publish``), so a poison message is never lost
        between the two queues.

        Example:
            >>> args = Topology("q", "q.dead", QueueOptions(max_recoveries=5)).main_arguments()
            >>> args["x-delivery-limit"], args["x-dead-letter-routing-key"]
            (4, 'q.dead')
        """
        return {
            "x-queue-type": "quorum",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": max(0, self.options.max_recoveries - 1),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.dead_name,
        }

    def delay_arguments(self) -> dict[str, Any]:
        """The arguments of a delay queue: an expired message goes back to the queue.

        Example:
            >>> Topology("q", "d", QueueOptions()).delay_arguments()["x-dead-letter-routing-key"]
            'q'
        """
        return {
            "x-queue-type": "quorum",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.name,
        }

    async def declare(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        """Declare the queue and its dead-letter queue unless they exist already.

        An existing queue is used as it is, whatever its arguments (a changed
        ``max_recoveries`` or a RabbitMQ policy does not make it unusable); so the
        undeliverable queue can be opened as a queue of its own for ``pop``/``count``.
        The delay queues that exist are remembered; the others are declared when a retry
        first needs them (:meth:`delay_queue`).

        Raises:
            QueueError: the broker refused a declaration or failed.
        """
        # The retry ladder too: a Retry's queue of an earlier run holds messages that
        # count() and clear() must see.
        candidates = self.delay_candidates()
        existing = await ready_counts(
            connection, [self.dead_name, self.name, *candidates], label=self.name
        )
        self._delays = {name for name in candidates if name in existing}
        specs: list[tuple[str, dict[str, Any]]] = [
            (self.dead_name, {"x-queue-type": "quorum"}),
            (self.name, self.main_arguments()),
        ]
        for name, arguments in specs:
            if name in existing:
                continue
            try:
                await channel.declare_queue(name, durable=True, arguments=arguments)
            except BROKER_ERRORS as exc:
                raise QueueError(f"{self.name}: cannot declare queue {name!r}: {exc!r}") from exc

    async def delay_queue(self, link: BrokerLink, base_ms: int) -> str:
        """The delay queue for ``base_ms``, declared the first time it is needed.

        Raises:
            QueueError: the broker refused the declaration or failed.
        """
        name = self.delay_name(base_ms)
        if name not in self._delays:
            channel = await link.channel()
            try:
                await channel.declare_queue(name, durable=True, arguments=self.delay_arguments())
            except BROKER_ERRORS as exc:
                raise QueueError(f"{self.name}: cannot declare {name!r}: {exc!r}") from exc
            self._delays.add(name)
        return name

    def forget(self) -> None:
        """Forget which delay queues exist (the connection closed; the next one looks again)."""
        self._delays = set()
