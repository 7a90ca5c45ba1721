"""What a worker reports about itself: its counts and its ``STATUS=`` line.

:class:`~maildefer.worker.Worker` keeps a :class:`WorkerStats` for its run and hands
:func:`status_text` to its :class:`~maildefer.ops.lifecycle.Lifecycle` (``STATUS=`` every
few seconds when it changed) and to the ``worker_stopped`` summary line.

Example:
    >>> status_text("posts", WorkerStats(handled=3), in_flight=1, paused=True)
    'posts: paused (no broker reachable), 3 handled, 1 in flight, 0 retried, 0 buried'
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerStats:
    """What a worker did with the messages it claimed.

    Attributes:
        handled: handlers returned; acked.
        failed: handlers raised or timed out (each then retried or buried).
        retried: failures put back for a later attempt.
        buried: messages moved to the undeliverable queue.
        released: claims given back unhandled at shutdown.

    Example:
        >>> WorkerStats(handled=2).handled
        2
    """

    handled: int = 0
    failed: int = 0
    retried: int = 0
    buried: int = 0
    released: int = 0


def status_text(name: str, stats: WorkerStats, *, in_flight: int, paused: bool = False) -> str:
    """A worker's ``STATUS=`` line: its counts, and whether its queue's feed is paused.

    ``paused``: the queue's feed stopped after being live (a broker outage: the backend
    cleared the worker's ``ready`` event); it resumes by itself.

    Example:
        >>> status_text("posts", WorkerStats(handled=3), in_flight=0)
        'posts: 3 handled, 0 in flight, 0 retried, 0 buried'
    """
    state = "paused (no broker reachable), " if paused else ""
    return (
        f"{name}: {state}{stats.handled} handled, {in_flight} in flight, "
        f"{stats.retried} retried, {stats.buried} buried"
    )
