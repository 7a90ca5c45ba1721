"""What every queue backend provides: the types and the Protocol the worker relies on.

A backend is chosen by :class:`maildefer.queue.Queue` from its path or URL. The user-facing
half (push, count, keys, get, remove, pop, clear) is the contract's; the worker half
(claim, ack, retry, bury, release, recover) is how a worker handles a message at least
once without two workers handling it at the same time.

Example:
    >>> opts = QueueOptions(max_attempts=3)
    >>> opts.backoff(0, jitter=1.0), opts.backoff(2, jitter=1.0)
    (30.0, 120.0)
"""

from __future__ import annotations

import asyncio
import email.message
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from maildefer.mail import MailRequest

Pushable = MailRequest | email.message.Message | bytes
"""What ``Queue.push`` accepts."""

BuryReason = Literal["failed", "poison", "corrupt"]
"""Why a message left its queue for the undeliverable queue."""


@dataclass(frozen=True)
class QueueOptions:
    """The retry and recovery policy of a queue (from ``[queues.NAME]``).

    Example:
        >>> QueueOptions().max_recoveries
        3
    """

    max_attempts: int = 5
    retry_delay: float = 30.0
    retry_max_delay: float = 3600.0
    lease: float = 600.0
    max_recoveries: int = 3
    shared_fs: bool = False
    poll_interval: float = 1.0
    rescan_interval: float = 10.0
    sync: Literal["auto", "fsync", "syncfs"] = "auto"

    def backoff(self, attempts: int, *, jitter: float) -> float:
        """Seconds to wait after the ``attempts``-th failure (0-based), jittered and capped.

        Args:
            attempts: failed attempts before this one.
            jitter: a factor drawn by the caller, normally uniform in [0.8, 1.2].

        Example:
            >>> QueueOptions(retry_delay=10, retry_max_delay=25).backoff(5, jitter=1.0)
            25.0
        """
        base = self.retry_delay * (2.0 ** min(attempts, 62))
        return float(min(self.retry_max_delay, base * jitter))


@dataclass(eq=False)
class Claim:
    """A message claimed by this worker: handle it, then ack, retry or bury it.

    Attributes:
        key: the message's stable key.
        message: the message with its envelope.
        attempts: failed attempts before this one.
        recoveries: times a worker died while holding it.
        queued_at: Unix time it entered the queue (``None`` if unknown).
        handle: backend-private token (a file name, a delivery tag).

    Example:
        >>> m = MailRequest(b"\\n")
        >>> c = Claim("k", m, attempts=0, recoveries=0, queued_at=None, handle="f")
        >>> c.key
        'k'
    """

    key: str
    message: MailRequest
    attempts: int
    recoveries: int
    queued_at: float | None
    handle: object = field(repr=False)


@dataclass
class RecoveryReport:
    """What :meth:`QueueBackend.recover` did.

    Example:
        >>> RecoveryReport().returned
        0
    """

    returned: int = 0
    quarantined: int = 0
    tmp_removed: int = 0
    due: int = 0


@runtime_checkable
class QueueBackend(Protocol):
    """The operations a queue backend provides (maildir, AMQP).

    Example:
        >>> from maildefer.queue.maildir import MaildirQueue
        >>> isinstance(MaildirQueue("/tmp/q-doc"), QueueBackend)
        True
    """

    url: str

    async def push(self, message: Pushable) -> str:
        """Store a message durably; return its key."""
        ...

    async def count(self) -> int:
        """Messages in the queue (waiting, delayed or claimed)."""
        ...

    async def keys(self) -> list[str]:
        """The keys of the messages in the queue."""
        ...

    async def get(self, key: str) -> MailRequest | None:
        """One message by key, or ``None``."""
        ...

    async def remove(self, key: str) -> bool:
        """Delete one message by key; ``True`` if it was there."""
        ...

    async def pop(self) -> tuple[str, MailRequest] | None:
        """Take one waiting message off the queue, or ``None`` when it is empty."""
        ...

    async def clear(self) -> int:
        """Delete every message; return how many."""
        ...

    def consume(self) -> AsyncIterator[Claim]:
        """Claims, one each time the caller asks for one, waiting when there are none."""
        ...

    def claims(self, *, prefetch: int, burst: bool, ready: asyncio.Event) -> AsyncIterator[Claim]:
        """The claims a worker runs: this backend's own way of feeding them.

        Args:
            prefetch: how many claims the worker holds at once (its concurrency): a
                backend that pushes messages to consumers hands it no more unacked ones.
            burst: drain what is there and end, instead of waiting for more. A backend
                that cannot tell "drained" raises :class:`~maildefer.errors.ConfigError`.
            ready: set once the feed is live: a message that arrives afterwards is
                claimed without waiting for a rescan (the worker's ``READY=1``).
        """
        ...

    @property
    def lease_renewal(self) -> float | None:
        """Seconds between renewals of in-flight claims (:meth:`renew`); ``None``: never.

        A backend whose claims expire unless renewed (a maildir on a shared filesystem,
        where a peer recovers claims older than the lease) asks the worker to renew them.
        """
        ...

    async def renew(self, claims: Sequence[Claim]) -> None:
        """Renew the leases of claims still being handled (see :attr:`lease_renewal`)."""
        ...

    async def ack(self, claim: Claim) -> None:
        """The handler succeeded: the message leaves the queue."""
        ...

    async def retry(self, claim: Claim, error: str) -> bool:
        """The handler failed: retry later, or bury after ``max_attempts``.

        Returns ``True`` if it will be retried, ``False`` if it was buried.
        """
        ...

    async def bury(self, claim: Claim, error: str, reason: BuryReason) -> None:
        """Move the message to the undeliverable queue with the error recorded."""
        ...

    async def release(self, claim: Claim) -> None:
        """Give the message back unhandled (shutdown); no attempt is counted."""
        ...

    async def recover(self) -> RecoveryReport:
        """Return claims of dead workers, quarantine poison, clean debris."""
        ...

    async def close(self) -> None:
        """Release resources (files, connections)."""
        ...
