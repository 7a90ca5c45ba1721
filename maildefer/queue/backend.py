"""What every queue backend provides: the types and the Protocol the worker relies on.

A backend is chosen by :class:`maildefer.queue.Queue` from its path or URL. The user-facing
half (push, count, keys, get, remove, pop, clear) is the contract's (``docs/contract.md``);
the worker half (claims, lease_renewal and renew, ack, retry, bury, release, recover) is
how a worker handles a message at least once without two workers handling it at the same
time (``docs/reliability.md``; where backends sit: ``docs/architecture.md``).

Example:
    >>> opts = QueueOptions(max_attempts=3)
    >>> opts.backoff(0, jitter=1.0), opts.backoff(2, jitter=1.0)
    (30.0, 120.0)
"""

from __future__ import annotations

import asyncio
import email.message
import traceback
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from maildefer.errors import NoRouteError, Retry, SMTPError
from maildefer.mail import MailRequest, MailResponse

Pushable = MailRequest | MailResponse | email.message.Message | bytes
"""What ``Queue.push`` accepts."""

BuryReason = Literal["failed", "poison", "corrupt", "rejected"]
"""Why a message left its queue for the undeliverable queue: out of attempts
(``failed``), it killed its workers (``poison``), it fails its envelope check
(``corrupt``), or a handler refused it for good with a 5xx ``SMTPError`` (``rejected``)."""


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
    # A broker queue's: seconds one connection attempt to one node may take, and a
    # publisher confirm may take; past them a push fails (serve answers 451).
    connect_timeout: float = 5.0
    publish_timeout: float = 10.0

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


@dataclass(frozen=True, slots=True)
class Settlement:
    """How a worker settles a claim once its handlers ended, and why.

    Attributes:
        outcome: ``ok`` (:meth:`QueueBackend.ack`), ``retry`` (:meth:`~QueueBackend.retry`,
            which buries at ``max_attempts``), ``buried`` (:meth:`~QueueBackend.bury`) or
            ``released`` (:meth:`~QueueBackend.release`).
        error: what to record beside the message (retry and buried).
        reason: the bury reason (``buried``, or a retry out of attempts: ``failed``).
        delay: seconds before the retry instead of the backoff (a handler's ``Retry``).

    Example:
        >>> from maildefer.errors import SMTPError
        >>> Settlement.of_failure(SMTPError(550, "5.7.1 no"))
        Settlement(outcome='buried', error='550 5.7.1 no', reason='rejected', delay=None)
        >>> ACKED.outcome, RELEASED.outcome  # the two without an error, made once
        ('ok', 'released')
    """

    outcome: Literal["ok", "retry", "buried", "released"]
    error: str | None = None
    reason: BuryReason = "failed"
    delay: float | None = None

    @classmethod
    def of_failure(cls, failure: BaseException) -> Settlement:
        """What a handler's exception makes of its message (contract §3).

        A 5xx :class:`~maildefer.errors.SMTPError` is the handler's "never": buried at
        once, reason ``rejected``, its reply the error (what ``serve`` would answer).
        :class:`~maildefer.errors.Retry` is retried after its delay, its words the error
        (both are decisions, not crashes: no traceback). No route cannot improve: buried.
        Anything else, a 4xx ``SMTPError`` included, is retried with backoff, the
        traceback recorded.

        Example:
            >>> from maildefer.errors import Retry
            >>> s = Settlement.of_failure(Retry(delay=2))
            >>> s.outcome, s.delay, s.error
            ('retry', 2.0, 'retry requested by the handler in 2 s')
            >>> Settlement.of_failure(ValueError("db down")).error.splitlines()[-1]
            'ValueError: db down'
        """
        if isinstance(failure, SMTPError) and 500 <= failure.code <= 599:
            return cls("buried", failure.reply, "rejected")
        if isinstance(failure, Retry):
            return cls("retry", str(failure), delay=failure.delay)
        text = "".join(traceback.format_exception(failure))
        return cls("buried" if isinstance(failure, NoRouteError) else "retry", text)


ACKED = Settlement("ok")
"""The settlement of every message whose handlers returned (shared: none made per message)."""
RELEASED = Settlement("released")
"""The settlement of a claim given back unhandled at shutdown."""


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


def refuse_running_loop(operation: str) -> None:
    """Raise if called from the thread of a running event loop.

    A blocking push there would stall every session and task of that loop for the
    whole write (an fsync of the file and of ``new/``, or a broker round trip).

    Raises:
        RuntimeError: there is a running event loop in this thread; the message says to
            ``await`` the async form instead.

    Example:
        >>> import asyncio
        >>> refuse_running_loop("push_sync")  # plain synchronous code: fine
        >>> async def handler():
        ...     refuse_running_loop("push_sync")
        >>> asyncio.run(handler())
        Traceback (most recent call last):
        ...
        RuntimeError: push_sync() called from a running event loop's thread: ...
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"{operation}() called from a running event loop's thread: it would block the "
        "loop for the whole write; use `await queue.push(message)` there (or call "
        f"{operation}() from another thread, e.g. asyncio.to_thread)"
    )


@runtime_checkable
class QueueBackend(Protocol):
    """The operations a queue backend provides (maildir, AMQP): how to add a third one.

    A backend stores messages for :class:`~maildefer.queue.Queue` (the user-facing half:
    push, count, keys, get, remove, pop, clear) and feeds a
    :class:`~maildefer.worker.Worker` (the worker half). The worker never imports a
    backend: it calls only these members, so a new backend is a class with them, and a
    scheme in :func:`maildefer.queue.config.open_backend`. ``tests/test_queue_protocol.py``
    checks every backend against this Protocol, signatures included.

    What the worker relies on (the reliability model is in ``docs/reliability.md``):

    - :meth:`push` returns only once the message survives a crash (R1).
    - Every claim ends in exactly one of :meth:`ack`, :meth:`retry`, :meth:`bury` or
      :meth:`release`; until then no other worker is handed the same message (R9).
    - A claim whose worker died comes back (from :meth:`recover`, a lease, or the broker)
      with ``recoveries`` raised by one; at ``max_recoveries`` it is buried as
      ``"poison"`` instead (R10, R11).
    - An operation that fails raises (an :class:`OSError` or a
      :class:`~maildefer.errors.QueueError`) and leaves the message where it was, never
      lost: the worker logs it and releases the claim later.

    A run of the worker: :meth:`recover` once, then :meth:`claims` until it stops, with
    :meth:`renew` every :attr:`lease_renewal` seconds meanwhile; at the end it releases
    what it still holds, closes the claims iterator and, through its registry,
    :meth:`close`.

    Example:
        >>> import asyncio, tempfile
        >>> from maildefer.queue.maildir import MaildirQueue
        >>> async def handle_one(backend: QueueBackend) -> str:
        ...     claims = backend.claims(prefetch=1, burst=True, ready=asyncio.Event())
        ...     claim = await anext(claims)
        ...     await backend.ack(claim)
        ...     await claims.aclose()
        ...     return claim.message["Subject"]
        >>> async def demo():
        ...     q = MaildirQueue(tempfile.mkdtemp())
        ...     await q.push(b"Subject: once\\n\\n")
        ...     return await handle_one(q), await q.count()
        >>> asyncio.run(demo())
        ('once', 0)
    """

    url: str
    """The path or URL the backend was opened with (the queue's name in logs)."""

    async def push(self, message: Pushable) -> str:
        """Store a message durably; return its key once it would survive a crash."""
        ...

    def push_sync(self, message: Pushable) -> str:
        """:meth:`push` for synchronous code and any thread, no event loop needed.

        Same guarantee (durable when it returns). Called from a running event loop's
        thread it raises :class:`RuntimeError` (see :func:`refuse_running_loop`).
        """
        ...

    async def count(self) -> int:
        """Messages in the queue (waiting, delayed or claimed, as far as it can tell)."""
        ...

    async def keys(self) -> list[str]:
        """The keys of the messages in the queue (or raise QueueError if it cannot list)."""
        ...

    async def get(self, key: str) -> MailRequest | None:
        """One message by key, or ``None``; it stays in the queue."""
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
        """Claims, one each time the caller asks for one, waiting when there are none.

        The simple form of :meth:`claims` (``prefetch=1``, no burst), for scripts.
        Closing the iterator gives back what it fetched but had not yet yielded.
        """
        ...

    def claims(self, *, prefetch: int, burst: bool, ready: asyncio.Event) -> AsyncIterator[Claim]:
        """The claims a worker runs, fed the backend's own way (a directory watch, a consumer).

        The worker pulls one claim each time a handler slot is free, so a backend
        should claim lazily: a message it claims but does not yield is held from other
        workers. Closing the iterator (``aclose``) must give back anything it claimed
        and did not yield; claims it did yield stay valid until settled.

        Args:
            prefetch: how many claims the worker holds at once (its concurrency): a
                backend that pushes messages to consumers hands it no more unacked ones.
            burst: drain what is there and end (``StopAsyncIteration``) instead of
                waiting for more. A backend that cannot tell "drained" raises
                :class:`~maildefer.errors.ConfigError` at once, from this call.
            ready: set once the feed is live: a message that arrives afterwards is
                claimed without waiting for a rescan (the worker's ``READY=1``). A
                backend whose feed can pause (a broker outage) clears it while paused
                and sets it again when it resumes (the worker's status says so).

        Raises:
            ConfigError: ``burst`` is asked of a backend that cannot drain.
        """
        ...

    @property
    def lease_renewal(self) -> float | None:
        """Seconds between renewals of in-flight claims (:meth:`renew`); ``None``: never.

        A backend whose claims expire unless renewed (a maildir on a shared filesystem,
        where a peer recovers claims older than the lease) asks the worker to renew them,
        well inside the lease (maildir: a third of it). A backend whose claims live as
        long as the worker does (the broker holds a delivery while its channel lives)
        returns ``None``, and the worker runs no heartbeat.
        """
        ...

    async def renew(self, claims: Sequence[Claim]) -> None:
        """Renew the leases of claims still being handled (see :attr:`lease_renewal`).

        Called with every claim the worker holds, every :attr:`lease_renewal` seconds;
        a claim settled meanwhile may be among them and must be skipped quietly. An
        :class:`OSError` is logged by the worker and the next renewal tries again.
        """
        ...

    async def ack(self, claim: Claim) -> None:
        """The handler succeeded: the message leaves the queue."""
        ...

    async def retry(self, claim: Claim, error: str, delay: float | None = None) -> bool:
        """The handler failed: count an attempt and retry later, or bury at ``max_attempts``.

        The delay is :meth:`QueueOptions.backoff` of the attempts so far, or ``delay``
        seconds when given (a handler's :class:`~maildefer.errors.Retry`): the message
        comes back no earlier than that, with ``attempts`` raised by one and ``error``
        recorded. A requested delay never buries earlier than ``max_attempts``.

        Returns:
            ``True`` if it will be retried, ``False`` if it was buried (reason ``"failed"``).
        """
        ...

    async def bury(self, claim: Claim, error: str, reason: BuryReason) -> None:
        """Move the message to the undeliverable queue with the error and reason recorded.

        If the move fails the original stays in the queue (the error is raised).
        """
        ...

    async def release(self, claim: Claim) -> None:
        """Give the message back unhandled (shutdown, a failed ack); no attempt is counted."""
        ...

    async def recover(self) -> RecoveryReport:
        """Return claims of dead workers, quarantine poison, clean debris (at worker start).

        A backend whose broker does this itself returns an empty :class:`RecoveryReport`.
        """
        ...

    async def close(self) -> None:
        """Release resources (files, connections); unsettled claims come back later."""
        ...

    def close_sync(self) -> None:
        """:meth:`close` for synchronous code (``with Queue(...)``): blocks until done.

        Releases what :meth:`push_sync` and the backend's own threads hold; a connection
        made on an event loop that is gone is only dropped.
        """
        ...
