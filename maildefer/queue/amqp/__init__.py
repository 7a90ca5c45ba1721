"""The RabbitMQ queue backend: the same ``Queue`` API and worker on a quorum queue.

``Queue("amqp://guest:guest@127.0.0.1:5672/?queue=posts")`` (``amqps://`` for TLS; the
path is the vhost, ``/`` or empty for the default one). Other query parameters
(``heartbeat=30``...) go to the client library. Several ``host:port`` separated by commas
name the nodes of one cluster: the queue connects to any and, when its connection is
lost, to the next (:mod:`.connection`); a worker's consumer pauses while no node is
reachable and re-subscribes by itself (:mod:`.subscription`). The message body is the same
self-checking envelope + original bytes as a maildir file
(:mod:`maildefer.queue.envelope`), so a
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
                          when it expires. A handler's ``Retry(delay=...)`` goes to the
                          rung of a ladder of powers of two seconds (1 s ... 2**16 s) at
                          or above its delay, with that rung as TTL: 17 queues at most

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

The package, by purpose:

- :mod:`.queue`: :class:`AmqpQueue`, the backend's API.
- :mod:`.connection`: the broker link (connect, fail over, reconnect, channels, publish,
  queue depths); every use of the connection goes through it.
- :mod:`.hosts`: the nodes of a multi-host URL.
- :mod:`.subscription`: a consumer re-subscribed after every connection loss (pause,
  resume).
- :mod:`.sync`: ``push_sync``'s link, on a private event loop.
- :mod:`.topology`: the URL, the queue names and arguments, their declaration, headers.
- :mod:`.deliveries`: consumers, deliveries and the claims made of them.
- :mod:`.admin`: :class:`AmqpAdmin`, what ``queue URL count|requeue`` and ``status`` do on
  the broker (counts by passive declare, requeue of dead letters with confirms).

Example:
    >>> q = AmqpQueue("amqp://guest:guest@127.0.0.1:5672/?queue=posts")
    >>> q.name, q.dead_name, q.delay_name(1500)
    ('posts', 'posts.undeliverable', 'posts.delay.1500')
"""

from __future__ import annotations

from maildefer.queue.amqp.admin import AmqpAdmin
from maildefer.queue.amqp.queue import AmqpQueue

__all__ = ["AmqpAdmin", "AmqpQueue"]
