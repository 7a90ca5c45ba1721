"""What ``serve`` and ``worker`` share around their run: signals, readiness, status, watchdog.

Each daemon (:class:`~maildefer.smtp.server.Server`, :class:`~maildefer.worker.Worker`)
holds one :class:`Lifecycle` and runs its ``serve()`` inside it (``async with``):

- SIGTERM and SIGINT only request a shutdown (:meth:`Lifecycle.request_shutdown`). A
  signal that comes while a shutdown is already under way is a forced one: the daemon's
  ``on_force`` runs (serve aborts its sessions; the worker exits at once, leaving its
  claims for the next worker's recovery). Handlers are installed on the running loop in
  the main thread only: in any other thread, whoever runs the daemon handles signals.
- ``WATCHDOG=1`` is pinged from the event loop for the whole run, the drain included: a
  long grace period must not look like a hung loop.
- ``READY=1`` once the daemon says it is live (:meth:`Lifecycle.ready`), then ``STATUS=``
  every :data:`STATUS_INTERVAL` seconds when the line changed.
- ``STOPPING=1`` as soon as a shutdown begins, once.

Without a :class:`~maildefer.ops.systemd.Notifier` nothing is sent; signals still work.
See ``docs/architecture.md`` for the order of things in each daemon.

Example:
    >>> import asyncio
    >>> async def demo():
    ...     lifecycle = Lifecycle(lambda: "idle")
    ...     async with lifecycle:
    ...         lifecycle.ready()
    ...         asyncio.get_running_loop().call_later(0.01, lifecycle.request_shutdown)
    ...         await lifecycle.wait()
    ...     return lifecycle.stopping, lifecycle.forced
    >>> asyncio.run(demo())
    (True, False)
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Protocol

from maildefer.ops.systemd import Notifier, run_status, run_watchdog

STATUS_INTERVAL = 5.0
"""Seconds between ``STATUS=`` updates (sent only when the text changed)."""

SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""The signals that stop a daemon: the first gracefully, the next one forcibly."""


class _Log(Protocol):
    """The part of a structlog logger :class:`Lifecycle` logs signals with."""

    def info(self, event: str, **fields: Any) -> Any: ...

    def warning(self, event: str, **fields: Any) -> Any: ...


class Lifecycle:
    """Signals, ``sd_notify`` and the watchdog around one run of a daemon.

    Args:
        status_line: the ``STATUS=`` text (the daemon's ``status_line``).
        notifier: the service manager to tell; nothing is sent without one.
        on_force: what a signal during a shutdown does, after the shutdown was marked
            forced; called with the signal's name.
        log: where to log each signal (``signal``, ``second_signal``); silent if ``None``.

    Example:
        >>> lifecycle = Lifecycle(lambda: "3 sessions")
        >>> lifecycle.request_shutdown(force=True)
        >>> lifecycle.stopping, lifecycle.forced
        (True, True)
    """

    def __init__(
        self,
        status_line: Callable[[], str],
        notifier: Notifier | None = None,
        *,
        on_force: Callable[[str], object] | None = None,
        log: _Log | None = None,
    ) -> None:
        self.status_line = status_line
        self.notifier = notifier
        self._on_force = on_force
        self._log = log
        self._stop = asyncio.Event()
        self._forced = False
        self._announced = False
        self._tasks: list[asyncio.Task[None]] = []
        self._installed: list[signal.Signals] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def stopping(self) -> bool:
        """Whether a shutdown was requested (by a signal or :meth:`request_shutdown`).

        Example:
            >>> Lifecycle(lambda: "").stopping
            False
        """
        return self._stop.is_set()

    @property
    def forced(self) -> bool:
        """Whether the shutdown is to skip the grace period (a second signal).

        Example:
            >>> lifecycle = Lifecycle(lambda: ""); lifecycle.request_shutdown()
            >>> lifecycle.forced
            False
        """
        return self._forced

    def request_shutdown(self, *, force: bool = False) -> None:
        """Begin the shutdown: ``STOPPING=1`` now, and :meth:`wait` returns.

        Safe to call from a signal handler installed with ``loop.add_signal_handler``,
        and more than once (``force`` sticks once given).

        Example:
            >>> lifecycle = Lifecycle(lambda: "")
            >>> lifecycle.request_shutdown(); lifecycle.request_shutdown(force=True)
            >>> lifecycle.stopping, lifecycle.forced
            (True, True)
        """
        self._forced = self._forced or force
        self._stop.set()
        self.announce_stopping()

    async def wait(self) -> None:
        """Return once a shutdown is requested.

        Example:
            >>> lifecycle = Lifecycle(lambda: ""); lifecycle.request_shutdown()
            >>> asyncio.run(lifecycle.wait())
        """
        await self._stop.wait()

    def announce_stopping(self, status: str | None = None) -> None:
        """Send ``STOPPING=1`` once, with ``status`` (by default ``stopping: <status line>``).

        Called by :meth:`request_shutdown`, and by a daemon whose run ends on its own (a
        drained burst, a failure).

        Example:
            >>> lifecycle = Lifecycle(lambda: "", Notifier("/nonexistent/notify"))
            >>> lifecycle.announce_stopping()  # the send fails quietly: no manager there
        """
        if self._announced:
            return
        self._announced = True
        if self.notifier is not None:
            text = f"stopping: {self.status_line()}" if status is None else status
            self.notifier.stopping(text)

    def ready(self, status: str | None = None) -> None:
        """The daemon is live: ``READY=1`` (with ``status``), then the ``STATUS=`` updates.

        Call it inside ``async with`` (the updates run as a task until the end).

        Example:
            >>> async def demo():
            ...     async with Lifecycle(lambda: "idle") as lifecycle:
            ...         lifecycle.ready("listening")
            >>> asyncio.run(demo())
        """
        if self.notifier is None:
            return
        self.notifier.ready(status)
        if self.notifier.enabled:
            self._spawn(run_status(self.notifier, self.status_line, STATUS_INTERVAL))

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(job))

    def _on_signal(self, signame: str) -> None:
        # Runs as a loop callback (add_signal_handler): it only sets state; the daemon's
        # tasks act on it.
        if not self.stopping:
            if self._log is not None:
                self._log.info("signal", signal=signame)
            self.request_shutdown()
            return
        if self._log is not None:
            self._log.warning("second_signal", signal=signame)
        self.request_shutdown(force=True)
        if self._on_force is not None:
            self._on_force(signame)

    async def __aenter__(self) -> Lifecycle:
        loop = asyncio.get_running_loop()
        self._loop = loop
        for sig in SIGNALS:
            try:
                loop.add_signal_handler(sig, self._on_signal, sig.name)
            except (ValueError, RuntimeError, NotImplementedError):
                continue  # not the main thread: whoever runs us handles signals
            self._installed.append(sig)
        if self.notifier is not None and self.notifier.watchdog_interval is not None:
            self._spawn(run_watchdog(self.notifier))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        installed, self._installed = self._installed, []
        if self._loop is not None:
            for sig in installed:
                self._loop.remove_signal_handler(sig)
        self._loop = None
