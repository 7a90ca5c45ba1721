"""The queue worker: claim a message, run its handlers, then ack, retry or bury it.

A :class:`Worker` pulls claims from its queue only while one of its ``concurrency``
handler slots is free, so it never holds more messages than it can run (the rest stay
in ``new/`` for other workers). Each message runs in its own task, under
``handler_timeout``:

- the handlers return: **ack** (the message leaves the queue);
- they raise or time out: **retry** with backoff, or after ``max_attempts`` **bury** it
  in the undeliverable queue with the error and traceback recorded;
- :class:`~maildefer.errors.Retry`: **retry** after its delay (still an attempt); a 5xx
  :class:`~maildefer.errors.SMTPError` or no route: **bury** at once (``Settlement``).

As :class:`~maildefer.smtp.server.Server`: ``serve()`` is the whole run (async), ``run()``
its synchronous entry, and a :class:`~maildefer.ops.lifecycle.Lifecycle` handles signals,
``READY=1`` (once live), ``STATUS=``, the watchdog and ``STOPPING=1``. Shutdown
(:meth:`Worker.request_shutdown`, the first SIGTERM/SIGINT) stops claiming, lets
in-flight handlers finish within ``grace_period``, gives back the unfinished ones
(``release``: back to ``new/``, no attempt counted) and logs one summary line. A second
signal exits at once (status 1): as a process killed outright, it leaves its claims in
``cur/`` for the next worker's ``recover`` (at-least-once; ``docs/reliability.md``).

Every message gets one canonical log line, ``event="message"``, with ``queue``,
``key``, ``attempt`` (bound as context for anything the handlers log), ``handlers``,
``outcome`` (``ok``, ``retry``, ``buried`` or ``released``; ``reason`` beside ``buried``),
``duration_ms`` and ``latency_ms`` (from entering the queue to the handler's start).

Example:
    >>> import asyncio, tempfile
    >>> from maildefer import logs
    >>> from maildefer.queue.maildir import MaildirQueue
    >>> logs.configure(level="error")
    >>> async def demo():
    ...     q = MaildirQueue(tempfile.mkdtemp())
    ...     await q.push(b"Subject: hi\\n\\n")
    ...     seen = []
    ...     async def deliver(message):
    ...         seen.append(message["Subject"])
    ...     stats = await Worker(q, deliver, burst=True).serve()
    ...     return seen, stats.handled
    >>> asyncio.run(demo())
    (['hi'], 1)
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, nullcontext
from dataclasses import asdict
from typing import TYPE_CHECKING

import structlog
from structlog.contextvars import bind_contextvars

from maildefer import loops
from maildefer.errors import ConfigError, NoRouteError
from maildefer.logs import sanitize
from maildefer.mail import MailRequest
from maildefer.ops.lifecycle import Lifecycle
from maildefer.ops.systemd import Notifier
from maildefer.ops.worker_status import WorkerStats, status_text
from maildefer.queue import QueueBackend
from maildefer.queue.backend import ACKED, RELEASED, Claim, Settlement
from maildefer.queue.config import QueueRegistry
from maildefer.settings import MetricsSettings

if TYPE_CHECKING:  # prometheus-client is imported only when metrics are on
    from maildefer.ops.metrics import Metrics

__all__ = ["Deliver", "Worker", "WorkerStats"]  # WorkerStats: its 0.1 home

Deliver = Callable[[MailRequest], Awaitable[object]]
"""What runs a message: ``Router.deliver`` in the CLI, any coroutine function in tests."""


class Worker:
    """Runs one queue's handlers on its messages, ``concurrency`` at a time.

    Args:
        backend: the queue (any :class:`~maildefer.queue.QueueBackend`).
        deliver: runs one message (``Router(...).deliver``).
        concurrency: handler tasks at once, and so claims held at once.
        handler_timeout: seconds one message's handlers may run; longer is a failure.
        grace_period: seconds in-flight handlers get to finish once a shutdown begins.
        burst: drain what is in the queue (and retries already due), then return.
        handlers: names for the log line (the handler modules).
        registry: made active while the worker runs, so the handlers'
            ``Queue(...)`` share backends with it; closed when :meth:`serve` ends.
        metrics: where to count pickups, handler runs, retries and burials (none by
            default: the hot path then pays nothing for them).
        metrics_endpoint: ``[metrics]``; with a ``port``, ``metrics`` are served there.
        notifier: the service manager to tell about readiness, status and shutdown
            (``sd_notify``); nothing is sent without one.
        name: the queue's name in metrics and status lines; its URL by default.
        lifespan: entered by :meth:`serve` before recovery and any claim, left after the
            drain: the handler modules' hooks, ``Router(...).lifespan(settings)``.

    Attributes:
        ready: set once the worker is live: a maildir queue's watcher is armed and the
            first scan batch is in (a message landing afterwards is picked up at once);
            for a broker queue, once its consumer is registered. A broker outage clears
            it until the consumer is back: the status line then says ``paused``.

    Example:
        >>> import tempfile
        >>> from maildefer.queue.maildir import MaildirQueue
        >>> async def deliver(message): ...
        >>> Worker(MaildirQueue(tempfile.mkdtemp()), deliver, concurrency=0)
        Traceback (most recent call last):
        ...
        maildefer.errors.ConfigError: concurrency = 0: expected at least 1
    """

    def __init__(
        self,
        backend: QueueBackend,
        deliver: Deliver,
        *,
        concurrency: int = 8,
        handler_timeout: float = 300.0,
        grace_period: float = 30.0,
        burst: bool = False,
        handlers: Sequence[str] = (),
        registry: QueueRegistry | None = None,
        metrics: Metrics | None = None,
        metrics_endpoint: MetricsSettings | None = None,
        notifier: Notifier | None = None,
        name: str | None = None,
        lifespan: AbstractAsyncContextManager[object] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"concurrency = {concurrency}: expected at least 1")
        self.backend = backend
        self.deliver = deliver
        self.concurrency = concurrency
        self.handler_timeout = handler_timeout
        self.grace_period = grace_period
        self.burst = burst
        self.handlers = list(handlers)
        self.registry = registry
        self.metrics = metrics
        self.metrics_endpoint = metrics_endpoint
        self.name = name or backend.url
        self.lifespan = lifespan
        self._instruments = None if metrics is None else metrics.instruments("worker", self.name)
        self.ready = asyncio.Event()
        self._live = False  # READY=1 was sent: a cleared ``ready`` now means paused
        self.stats = WorkerStats()
        self._lifecycle = Lifecycle(self.status_line, notifier, on_force=self._exit_at_once)
        self._slots = asyncio.Semaphore(concurrency)
        self._running: dict[asyncio.Task[None], Claim] = {}
        # Handler deadlines, checked by one timer task (_expire_overdue) instead of an
        # asyncio.timeout per message: that cost 8 % of a no-op drain (docs/benchmarks.md).
        self._deadlines: dict[Claim, float] = {}
        self._expired: set[Claim] = set()
        self._releasing: dict[asyncio.Task[None], Claim] = {}
        # Seconds before a claim whose ack/retry/bury failed goes back to new/.
        self.release_delay = 5.0
        self._log = structlog.get_logger("maildefer.worker")

    @property
    def stopping(self) -> bool:
        """Whether a shutdown was requested (see :meth:`request_shutdown`'s example)."""
        return self._lifecycle.stopping

    def request_shutdown(self, *, force: bool = False) -> None:
        """Ask the worker to stop: no more claims, then finish or release in-flight ones.

        What the first SIGTERM or SIGINT does; safe in a ``loop.add_signal_handler``
        callback. ``force``: no grace period (if given before the drain begins).

        Example:
            >>> import asyncio, tempfile
            >>> from maildefer.queue.maildir import MaildirQueue
            >>> async def deliver(message): ...
            >>> w = Worker(MaildirQueue(tempfile.mkdtemp()), deliver)  # not a burst
            >>> before = w.stopping; w.request_shutdown()
            >>> before, w.stopping, asyncio.run(w.serve()).handled  # serve returns at once
            (False, True, 0)
        """
        self._lifecycle.request_shutdown(force=force)

    def in_flight(self) -> list[Claim]:
        """The claims whose handlers are running now (see :meth:`serve`'s example)."""
        return list(self._running.values())

    def status_line(self) -> str:
        """The worker's ``STATUS=`` line: its counts so far, and whether it is paused.

        Paused: ``ready`` was cleared after it was live (a broker outage).

        Example:
            >>> import tempfile
            >>> from maildefer.queue.maildir import MaildirQueue
            >>> async def deliver(message): ...
            >>> w = Worker(MaildirQueue(tempfile.mkdtemp()), deliver, name="posts")
            >>> w.stats.handled = 3; w.status_line()
            'posts: 3 handled, 0 in flight, 0 retried, 0 buried'
        """
        paused = self._live and not self.ready.is_set()
        return status_text(self.name, self.stats, in_flight=len(self._running), paused=paused)

    # -- the run -------------------------------------------------------------------------

    def run(self, loop: str = "asyncio") -> WorkerStats:
        """:meth:`serve` on a new event loop of the kind ``loop`` names (``[runtime] loop``).

        Example:
            >>> import tempfile
            >>> from maildefer.queue.maildir import MaildirQueue
            >>> async def deliver(message): ...
            >>> Worker(MaildirQueue(tempfile.mkdtemp()), deliver, burst=True).run().handled
            0
        """
        return loops.run(self.serve(), loop)

    async def serve(self) -> WorkerStats:
        """Run until :meth:`request_shutdown` or a signal (a burst: until drained).

        Handles SIGTERM/SIGINT (in the main thread), enters ``lifespan``, serves the metrics
        endpoint if set, says ``READY=1`` once live (never if it fails first); at the end
        (after the drain) leaves ``lifespan`` and closes the registry.

        Returns:
            The counts, also logged as the ``worker_stopped`` summary line.

        Raises:
            LifespanError: a lifespan's startup raised (logged; nothing claimed, no READY=1).
            OSError: the metrics endpoint cannot be bound.

        Example:
            >>> import asyncio, tempfile
            >>> from maildefer.queue.maildir import MaildirQueue
            >>> async def demo():
            ...     q = MaildirQueue(tempfile.mkdtemp())
            ...     await q.push(b"Subject: x\\n\\n"); await q.push(b"Subject: y\\n\\n")
            ...     seen = []
            ...     async def deliver(message):  # one at a time: concurrency=1
            ...         seen.append(len(worker.in_flight()))
            ...     worker = Worker(q, deliver, burst=True, concurrency=1)
            ...     stats = await worker.serve()
            ...     return seen, stats.handled, worker.in_flight(), await q.count()
            >>> asyncio.run(demo())
            ([1, 1], 2, [], 0)
        """
        loop = asyncio.get_running_loop()
        async with self._lifecycle:
            work: asyncio.Task[WorkerStats] | None = None
            live: asyncio.Task[object] | None = None
            entered: AbstractAsyncContextManager[object] = nullcontext()
            try:
                if self.lifespan is not None:
                    # Before recovery and any claim; a lifespan's Queue(...) shares our backends.
                    with self.registry.active() if self.registry else nullcontext():
                        await self.lifespan.__aenter__()
                    entered = self.lifespan
                if self.metrics is not None and self.metrics_endpoint is not None:
                    await self.metrics.start_endpoint(self.metrics_endpoint, self._log)
                work = loop.create_task(self._work())
                live = loop.create_task(self.ready.wait())
                # READY=1 only once the worker is live; a worker that fails first never says it.
                await asyncio.wait([work, live], return_when=asyncio.FIRST_COMPLETED)
                if self.ready.is_set() and not self.stopping:
                    self._live = True
                    self._lifecycle.ready(self.status_line())
                return await work
            finally:
                if live is not None:
                    await loops.cancel_and_wait(live)
                if work is not None:
                    await loops.cancel_and_wait(work)  # serve() itself was cancelled
                # A burst that finished, or a failure: STOPPING=1 all the same (once).
                self._lifecycle.announce_stopping(self.status_line())
                await entered.__aexit__(None, None, None)  # after the drain: no handler runs
                if self.metrics is not None:
                    await self.metrics.stop_http()
                if self.registry is not None:
                    await self.registry.close()

    def _exit_at_once(self, signame: str) -> None:
        """A second signal: exit now, leaving the claims in ``cur/`` for recovery."""
        self._log.warning("worker_killed", reason="second signal", in_flight=len(self._running))
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)  # in-flight claims stay in cur/ for the next recovery

    async def _work(self) -> WorkerStats:
        """Recover, then handle messages until a shutdown (or, in burst mode, drained)."""
        context: AbstractContextManager[object] = (
            self.registry.active() if self.registry is not None else nullcontext()
        )
        # A concrete logger for the run: the lazy proxy would rebuild it on every line.
        self._log = structlog.get_logger("maildefer.worker").bind()
        with context, structlog.contextvars.bound_contextvars(queue=self.backend.url):
            report = await self.backend.recover()
            if self.metrics is not None and report.quarantined:
                self.metrics.buried(self.name, "poison", count=report.quarantined)
            self._log.info(
                "worker_started",
                concurrency=self.concurrency,
                burst=self.burst,
                handlers=self.handlers,
                recovered=report.returned,
                quarantined=report.quarantined,
                due=report.due,
                loop=loops.running_loop_name(),
            )
            claims = self._claims()
            loop = asyncio.get_running_loop()
            pull: asyncio.Task[object] = loop.create_task(self._pull(claims))
            stop: asyncio.Task[object] = loop.create_task(self._lifecycle.wait())
            heartbeat = self._start_heartbeat()
            expiry = loop.create_task(self._expire_overdue())
            try:
                await asyncio.wait([pull, stop], return_when=asyncio.FIRST_COMPLETED)
                if pull.done() and loops.task_failure(pull) is None:
                    # Burst mode, drained: wait for the last handlers (or a stop).
                    while self._running and not self.stopping:
                        await asyncio.wait(
                            [*self._running, stop], return_when=asyncio.FIRST_COMPLETED
                        )
                await loops.cancel_and_wait(pull)
                await self._drain()
            finally:
                await loops.cancel_and_wait(pull)
                await loops.cancel_and_wait(stop)
                if heartbeat is not None:
                    await loops.cancel_and_wait(heartbeat)
                await self._drain(grace=0.0)
                await loops.cancel_and_wait(expiry)
                await self._release_waiting()
                await loops.aclose(claims)
                self._log.info("worker_stopped", **asdict(self.stats))
        failure = loops.task_failure(pull)
        if failure is not None:
            raise failure  # the queue itself failed (a listing, a watcher that cannot start)
        return self.stats

    def _claims(self) -> AsyncIterator[Claim]:
        # Each backend feeds its own claims (inotify and scans, a broker consumer):
        # the worker only says how many it holds at once.
        return self.backend.claims(prefetch=self.concurrency, burst=self.burst, ready=self.ready)

    async def _pull(self, claims: AsyncIterator[Claim]) -> None:
        """Claim one message each time a handler slot is free."""
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                claim = await anext(claims)
            except StopAsyncIteration:
                self._slots.release()
                return  # burst mode: drained
            except BaseException:
                self._slots.release()
                raise
            task = loop.create_task(self._handle(claim))
            self._running[task] = claim
            self._deadlines[claim] = loop.time() + self.handler_timeout
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        claim = self._running.pop(task, None)
        if claim is not None:
            self._deadlines.pop(claim, None)
            self._expired.discard(claim)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            self._log.error("handler_task_failed", error=repr(task.exception()))

    async def _drain(self, grace: float | None = None) -> None:
        """Let running handlers finish within the grace period; release the rest."""
        if not self._running:
            return
        wait = self.grace_period if grace is None else grace
        if self._lifecycle.forced:
            wait = 0.0
        tasks = list(self._running)
        if wait > 0:
            await asyncio.wait(tasks, timeout=wait)
        late = [task for task in tasks if not task.done()]
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)

    async def _expire_overdue(self) -> None:
        """Cancel the handlers that ran past ``handler_timeout`` (they are retried).

        Checked every twentieth of the timeout (at most every second), so a handler may
        run up to that much longer than its timeout.
        """
        loop = asyncio.get_running_loop()
        every = min(1.0, max(0.005, self.handler_timeout / 20))
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            for task, claim in list(self._running.items()):
                deadline = self._deadlines.get(claim)
                if deadline is not None and now >= deadline and claim not in self._expired:
                    self._expired.add(claim)
                    task.cancel()

    def _handler_ended(self, claim: Claim) -> bool:
        """A claim's handlers ended: no deadline any more. Was it the timeout?

        Called in its task before it awaits anything else (the ack, the retry), so the
        timer task cannot cancel those; a cancellation that was the timeout is undone.
        Keyed by claim: ``asyncio.current_task`` per message cost 5 % of a no-op drain.
        """
        self._deadlines.pop(claim, None)
        if claim not in self._expired:
            return False
        self._expired.discard(claim)
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()  # the rest of the task (retry) runs as usual
        return True

    def _start_heartbeat(self) -> asyncio.Task[object] | None:
        """Renew in-flight claims' leases, if the backend's claims have any (shared fs)."""
        backend = self.backend
        every = backend.lease_renewal
        if every is None:
            return None

        async def beat() -> None:
            while True:
                await asyncio.sleep(every)
                try:
                    await backend.renew(self.in_flight())
                except OSError as exc:
                    self._log.error("heartbeat_failed", error=str(exc))

        return asyncio.get_running_loop().create_task(beat())

    # -- one message ----------------------------------------------------------------------

    async def _handle(self, claim: Claim) -> None:
        attempt = claim.attempts + 1
        # Bound for good: each handler task runs in its own copy of the context, so
        # nothing needs resetting (and the unbind would cost on every message).
        bind_contextvars(key=claim.key, attempt=attempt)
        started = time.time()
        queued_at = claim.queued_at
        message = claim.message
        # The claim as handlers see it (contract §3); for_recipient copies carry it too.
        message.key, message.attempt, message.queued_at = claim.key, attempt, queued_at
        latency = None if queued_at is None else (started - queued_at) * 1000
        t0 = time.perf_counter()
        instruments = self._instruments
        if instruments is not None and claim.attempts == 0:
            # First attempts only: a retry's key time is its first push, and its
            # backoff would swamp the push-to-claim latency the histogram shows.
            instruments.picked_up(queued_at, started)
        try:
            if instruments is None:
                await self.deliver(message)
            else:
                # The children themselves, not instruments.handling(): a context manager
                # per message is measurable on a no-op drain.
                instruments.in_flight.inc()
                try:
                    await self.deliver(message)
                finally:
                    instruments.in_flight.dec()
                    instruments.seconds.observe(time.perf_counter() - t0)
            failure: BaseException | None = None
        except (asyncio.CancelledError, Exception) as exc:
            failure = exc
        # Before any other await (the ack, the retry), so the timer task cannot cancel those.
        timed_out = self._handler_ended(claim)
        if failure is None:
            settlement = ACKED
        elif isinstance(failure, asyncio.CancelledError) and not timed_out:
            # Only the shutdown cancels a handler otherwise (past the grace period).
            await asyncio.shield(self._finish(claim, RELEASED))
            self._line("released", t0, latency, RELEASED)
            raise failure
        elif timed_out and not isinstance(failure, NoRouteError):
            # Cancelled at its deadline (or the handler turned that into another error).
            settlement = Settlement("retry", f"handler timed out after {self.handler_timeout:g} s")
        else:  # Retry, SMTPError, no route, a crash: contract §3
            settlement = Settlement.of_failure(failure)
        del failure  # its traceback holds this frame: no cycle left for the GC per failure
        outcome = await self._finish(claim, settlement)
        self._line(outcome, t0, latency, settlement)

    async def _finish(self, claim: Claim, settlement: Settlement) -> str:
        """Ack, retry, bury or release a claim; returns the outcome that happened."""
        stats = self.stats
        outcome = settlement.outcome
        try:
            if outcome == "ok":
                await self.backend.ack(claim)
                stats.handled += 1
            elif outcome == "released":
                await self.backend.release(claim)
                stats.released += 1
            elif outcome == "buried":
                stats.failed += 1
                await self.backend.bury(claim, settlement.error or "", settlement.reason)
                stats.buried += 1
                if self.metrics is not None:
                    self.metrics.buried(self.name, settlement.reason)
            else:
                stats.failed += 1
                # The delay only when asked: a backend written for 0.1 takes (claim, error).
                retry, delay, error = self.backend.retry, settlement.delay, settlement.error or ""
                if await (retry(claim, error) if delay is None else retry(claim, error, delay)):
                    stats.retried += 1
                    if self.metrics is not None:
                        self.metrics.retried(self.name)
                else:  # out of attempts: the backend buried it
                    stats.buried += 1
                    outcome = "buried"
                    if self.metrics is not None:
                        self.metrics.buried(self.name, "failed")
        except Exception as exc:
            self._log.error("queue_op_failed", outcome=outcome, error=str(exc))
            if outcome != "released":
                self._release_later(claim)
        return outcome

    def _release_later(self, claim: Claim) -> None:
        """Give back a claim whose ack/retry/bury failed, after a pause.

        Recovery skips the claims of a live worker, so without this the message would wait
        in cur/ for this worker's restart. The pause keeps a queue operation that keeps
        failing (a full undeliverable disk) from turning into a tight claim-fail loop.
        """

        async def release() -> None:
            await asyncio.sleep(self.release_delay)
            try:
                await self.backend.release(claim)
            except Exception as exc:
                # Still in cur/: the next start's recovery returns it (at-least-once).
                self._log.error("release_failed", error=str(exc))

        task = asyncio.get_running_loop().create_task(release())
        self._releasing[task] = claim
        task.add_done_callback(lambda done: self._releasing.pop(done, None))

    async def _release_waiting(self) -> None:
        """At shutdown: give back at once the claims still waiting out their pause."""
        for task, claim in list(self._releasing.items()):
            await loops.cancel_and_wait(task)
            try:
                await self.backend.release(claim)
            except Exception as exc:
                self._log.error("release_failed", error=str(exc))

    def _line(self, outcome: str, t0: float, latency: float | None, done: Settlement) -> None:
        """The canonical log line of one message (``reason`` too when it was buried)."""
        fields: dict[str, object] = {
            "handlers": self.handlers,
            "outcome": outcome,
            "duration_ms": round((time.perf_counter() - t0) * 1000, 3),
            "latency_ms": None if latency is None else round(latency, 3),
        }
        if outcome == "buried":
            fields["reason"] = done.reason
        if done.error is None:
            self._log.info("message", **fields)
        else:
            last = done.error.rstrip().rpartition("\n")[2]
            self._log.warning("message", error=sanitize(last, 300), **fields)
