"""The ``serve`` lifecycle: load handlers, bind, serve, drain on a signal, exit.

:class:`Server` follows uvicorn's split: ``run()`` is the synchronous process entry
(``asyncio.run(server.serve())``); tests ``await server.start()`` and
``await server.shutdown()`` (or run ``serve()`` as a task and call
:meth:`Server.request_shutdown`).

Order of things (``docs/architecture.md``):

1. ``start``: build the router (importing the handler modules; a broken one is a bad
   setting: :class:`~maildefer.errors.ConfigError`, exit 2, before any socket is bound),
   the TLS context, start the handler modules' ``lifespan`` hooks
   (``maildefer/lifespan.py``; one that raises:
   :class:`~maildefer.errors.LifespanError`, exit 1, nothing bound), then bind (or adopt
   sockets passed by systemd). A bind failure raises ``OSError`` (exit 1).
2. A :class:`~maildefer.queue.QueueRegistry` is active in the context the listener was
   created in, so every session and handler task inherits it: handlers'
   ``Queue("run/posts")`` share one backend and its group-committed directory fsync.
3. Under systemd (a :class:`~maildefer.ops.systemd.Notifier` given), through the
   :class:`~maildefer.ops.lifecycle.Lifecycle` the worker shares: ``READY=1`` once the
   sockets accept, ``WATCHDOG=1`` pings from the event loop and ``STATUS=`` lines with
   live counts while serving, ``STOPPING=1`` as soon as shutdown begins. With a
   :class:`~maildefer.ops.metrics.Metrics` given, sessions count messages and refusals, the
   queue depth of every maildir ``[queues.*]`` is reported, and ``[metrics] port`` (if
   set) serves them from this loop until shutdown is over.
4. SIGTERM or SIGINT only sets an event. ``shutdown`` then closes the listener (new
   connections are refused), says ``421`` to idle sessions, lets sessions in DATA or in
   their handlers finish within ``grace_period`` (their client gets its 250), closes the
   rest (their handlers are cancelled; pushes are cancellation-safe, and the client,
   without a reply, retries), shuts the lifespans down (reverse order), closes the queues
   and logs one summary line. A second signal skips the grace period.

Example:
    >>> import asyncio, tempfile
    >>> from pathlib import Path
    >>> from maildefer.settings import Settings
    >>> from maildefer.smtp.policy import AcceptAll
    >>> from maildefer import logs; import io; logs.configure(stream=io.StringIO())
    >>> async def demo():
    ...     s = Settings(root=Path(tempfile.mkdtemp()), server={"port": 0, "hostname": "h"})
    ...     server = Server(s, router=AcceptAll())
    ...     await server.start()
    ...     port = server.port
    ...     await server.shutdown()
    ...     return port > 0
    >>> asyncio.run(demo())
    True
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import structlog

from maildefer import loops
from maildefer.errors import ConfigError, RoutingError
from maildefer.ops.lifecycle import Lifecycle
from maildefer.ops.systemd import Notifier
from maildefer.queue.config import QueueRegistry
from maildefer.queue.maildir import MaildirQueue
from maildefer.settings import Settings
from maildefer.smtp.diskguard import DiskGuard
from maildefer.smtp.policy import DeliveryPolicy, RecipientRouter, SessionTracker
from maildefer.smtp.session import smtp_factory
from maildefer.smtp.spool import Spool, spool_for

if TYPE_CHECKING:
    from prometheus_client import Counter

    from maildefer.ops.metrics import Metrics
    from maildefer.smtp.authcheck import AuthChecker

log = structlog.get_logger("maildefer.server")

_ABORT_WAIT = 5.0
"""Seconds to let cancelled sessions unwind after the grace period (their handlers'
cleanup, a push finishing its fsync) before the queues are closed under them."""


def _total(counter: Counter) -> int:
    """A counter's value summed over its labels (only this counter is collected)."""
    return int(
        sum(
            sample.value
            for family in counter.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
        )
    )


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The STARTTLS context of ``[server] tls_cert``/``tls_key``, or ``None``.

    Raises:
        ConfigError: only one of the two is set, or they cannot be loaded.

    Example:
        >>> tls_context(Settings()) is None
        True
    """
    cert, key = settings.server.tls_cert, settings.server.tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("server.tls_cert and server.tls_key must be set together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.resolve(cert), settings.resolve(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"server.tls_cert/tls_key = {str(cert)!r}: cannot load: {exc}") from None
    return context


class Server:
    """The SMTP/LMTP listener of ``maildefer serve``.

    Args:
        settings: the whole settings (``[server]``, ``[router]``, ``[undeliverable]``).
        router: the router to use (a :class:`~maildefer.routing.Router`, or
            :class:`~maildefer.smtp.policy.AcceptAll` for the log server); by default
            one is built from ``[server] handlers`` with the file-backed state store.
        sockets: already-bound listening sockets (systemd socket activation) to serve
            on instead of binding ``host:port``.
        per_recipient: deliver once per recipient (a router) or once per message.
        metrics: count messages, refusals, handler time and queue depth; its endpoint
            is served while serving when ``[metrics] port`` is set.
        notifier: the service manager to tell about readiness, liveness and shutdown
            (``sd_notify``); nothing is sent without one.

    Example:
        >>> Server(Settings()).port is None
        True
    """

    def __init__(
        self,
        settings: Settings,
        *,
        router: RecipientRouter | None = None,
        sockets: Sequence[socket.socket] | None = None,
        per_recipient: bool = True,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.router = router
        self.metrics = metrics
        self.notifier = notifier
        self.registry = QueueRegistry.from_settings(settings)
        server = settings.server
        self.tracker = SessionTracker(
            max_connections=server.max_connections, max_per_ip=server.max_connections_per_ip
        )
        self.disk_guard = self._build_disk_guard()
        self.spool: Spool | None = None  # made by start()
        self.on_ready: Callable[[], object] | None = None
        self._sockets = list(sockets or [])
        self._per_recipient = per_recipient
        self._listeners: list[asyncio.Server] = []
        self._context: contextvars.Context | None = None
        self._activation: contextlib.AbstractContextManager[QueueRegistry] | None = None
        self._state_close: Callable[[], None] | None = None
        self._lifespan: AbstractAsyncContextManager[object] | None = None
        self._auth: AuthChecker | None = None
        self._started = 0.0
        self._lifecycle = Lifecycle(
            self.status_line, notifier, on_force=self._abort_sessions, log=log
        )

    @property
    def port(self) -> int | None:
        """The port actually bound (useful with ``port = 0``), once started."""
        for listener in self._listeners:
            for sock in listener.sockets:
                name = sock.getsockname()
                if isinstance(name, tuple):
                    return int(name[1])
        return None

    def status_line(self) -> str:
        """The ``STATUS=`` line: live sessions and, with metrics, message counts.

        Example:
            >>> Server(Settings()).status_line()
            '0 sessions'
        """
        text = f"{self.tracker.count} sessions"
        if self.metrics is not None:
            text += (
                f", {_total(self.metrics.accepted)} accepted,"
                f" {_total(self.metrics.refused)} refused"
            )
        return text

    def _build_disk_guard(self) -> DiskGuard | None:
        """R8: free space on every maildir queue's filesystem, ``None`` if turned off.

        Example:
            >>> Server(Settings(server={"min_free_space": 0})).disk_guard is None
            True
        """
        settings = self.settings
        paths = [queue.path for queue in settings.queues.values()]
        paths.append(settings.undeliverable.path)
        if settings.server.spool_dir is not None:  # else the spool is a queue's tmp/
            paths.append(str(settings.server.spool_dir))
        guard = DiskGuard(
            (settings.resolve(p) for p in paths if "://" not in p),  # a broker guards its own
            settings.server.min_free_bytes,
        )
        return guard if guard.enabled else None

    def _build_auth(self) -> AuthChecker | None:
        """``[auth] verify``: the checker every message goes through; ``None`` when off.

        Off, handlers that require authentication (``@authenticated``) run unchecked:
        said once, at start, as ``auth_not_verified``.
        """
        if not self.settings.auth.verify:
            from maildefer.auth import requirement_of
            from maildefer.routing import Router

            router = self.router
            required = sorted(
                {
                    h.qualified
                    for r in (router.routes() if isinstance(router, Router) else [])
                    for h in r.handlers
                    if requirement_of(h.function) is not None
                }
            )
            if required:
                log.warning("auth_not_verified", handlers=required, setting="auth.verify")
            return None
        # Imported here: dkimpy, pyspf and the public suffix list only load when used.
        from maildefer.smtp.authcheck import AuthChecker

        return AuthChecker.from_settings(self.settings)

    def _build_router(self) -> RecipientRouter:
        # Imported here: routing imports the handler modules' dependencies, and a server
        # given its own router (the log server, tests) does not need it.
        from maildefer.routing import Router
        from maildefer.state import state_store_for

        store = state_store_for(self.settings)
        try:
            router = Router.from_modules(
                self.settings.server.handlers,
                defaults=self.settings.router.defaults,
                state=store,
            )
        except RoutingError as exc:
            store.close()
            # A handler module that does not load is a bad setting: exit 2, nothing bound.
            raise ConfigError(f"server.handlers: {exc}") from None
        self._state_close = store.close
        return router

    async def start(self) -> None:
        """Load the handlers and start listening; returns once the sockets accept.

        Raises:
            ConfigError: a handler module or the TLS files cannot be loaded.
            LifespanError: a handler module's ``lifespan`` raised (logged; nothing bound).
            OSError: the address cannot be bound (in use, not permitted).
        """
        server = self.settings.server
        context = tls_context(self.settings)
        if self.router is None:
            self.router = self._build_router()
        # aiosmtpd logs every command at INFO through stdlib logging, peer strings
        # unsanitized; our own structured lines replace it.
        logging.getLogger("mail.log").setLevel(logging.ERROR)
        # The memory budget every session shares, and where large messages are spooled.
        self.spool = spool_for(self.settings)
        self._auth = self._build_auth()
        policy = DeliveryPolicy(
            self.router,
            server,
            per_recipient=self._per_recipient,
            metrics=self.metrics,
            disk_guard=self.disk_guard,
            auth=self._auth,
            spool=self.spool,
        )
        factory = smtp_factory(server, policy, self.tracker, tls_context=context)
        # The listener is created in a private context holding the active registry:
        # every accepted session and every handler task copies it from there.
        self._context = contextvars.copy_context()
        self._activation = self.registry.active()
        self._context.run(self._activation.__enter__)
        loop = asyncio.get_running_loop()
        # The lifespans start before anything is bound: one that fails leaves no port that
        # ever accepted, and READY=1 unsent. Their task starts in the listener's context.
        lifespan = self._lifespan_of(self.router)
        if lifespan is not None:
            try:
                await loop.create_task(lifespan.__aenter__(), context=self._context)
            except BaseException:
                await self._release()
                raise
            self._lifespan = lifespan

        async def bind() -> list[asyncio.Server]:
            if self._sockets:
                return [
                    await loop.create_server(factory, sock=sock, start_serving=True)
                    for sock in self._sockets
                ]
            # A listen backlog as deep as the session cap: a burst of connections is
            # accepted and answered (220 or 421) instead of stalling in SYN retries.
            backlog = max(100, server.max_connections)
            return [
                await loop.create_server(
                    factory, host=server.host, port=server.port, backlog=backlog
                )
            ]

        try:
            self._listeners = await loop.create_task(bind(), context=self._context)
        except BaseException:
            await self._release()
            raise
        try:
            await self._start_metrics()
        except BaseException:
            for listener in self._listeners:
                listener.close()
            self._listeners = []
            await self._release()
            raise
        self._started = time.monotonic()
        log.info(
            "listening",
            host=server.host,
            port=self.port,
            lmtp=server.lmtp,
            starttls=context is not None,
            proxy_protocol=server.proxy_protocol,
            loop=loops.running_loop_name(),
        )

    def _lifespan_of(self, router: RecipientRouter) -> AbstractAsyncContextManager[object] | None:
        """The ``lifespan`` hooks of a router's handler modules (none for other routers)."""
        from maildefer.routing import Router

        return router.lifespan(self.settings) if isinstance(router, Router) else None

    async def _start_metrics(self) -> None:
        """Report every maildir queue's depth; serve the endpoint if a port is set."""
        if self.metrics is None:
            return
        for name, queue in self.settings.queues.items():
            if "://" not in queue.path:  # a broker's depth is the broker's to report
                self.metrics.track_queue(name, MaildirQueue(self.settings.resolve(queue.path)))
        await self.metrics.start_endpoint(self.settings.metrics, log)

    @property
    def stopping(self) -> bool:
        """Whether a shutdown was requested (a signal, :meth:`request_shutdown`).

        Example:
            >>> server = Server(Settings()); server.request_shutdown(); server.stopping
            True
        """
        return self._lifecycle.stopping

    def request_shutdown(self, *, force: bool = False) -> None:
        """Ask :meth:`serve` to shut down (what SIGTERM and SIGINT do).

        Args:
            force: skip the grace period (what a second signal does, which also closes
                the sessions at once).

        Example:
            >>> server = Server(Settings()); server.request_shutdown(force=True)
            >>> server.stopping
            True
        """
        self._lifecycle.request_shutdown(force=force)

    def _abort_sessions(self, signame: str) -> None:
        """A second signal: close every session now (their clients, unanswered, retry)."""
        self.tracker.abort_all()

    async def serve(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or :meth:`request_shutdown`), drain.

        Raises:
            ConfigError: bad handlers or TLS files (nothing was bound).
            LifespanError: a handler module's ``lifespan`` raised at startup (nothing
                was bound, no ``READY=1``).
            OSError: the address cannot be bound.
        """
        # The lifecycle is left after the drain: the watchdog pings through it.
        async with self._lifecycle:
            await self.start()
            try:
                if self.on_ready is not None:
                    self.on_ready()
                # After start(): the sockets accept, so READY=1 is the truth.
                self._lifecycle.ready(f"listening on port {self.port}")
                await self._lifecycle.wait()
            finally:
                await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, drain sessions within ``grace_period``, close everything.

        Example:
            >>> import asyncio; asyncio.run(Server(Settings()).shutdown())
        """
        if not self._listeners and self._context is None:
            return
        self._lifecycle.announce_stopping()
        for listener in self._listeners:
            listener.close()
        self.tracker.begin_shutdown()
        busy = self.tracker.count
        grace = 0.0 if self._lifecycle.forced else self.settings.server.grace_period
        drained = await self.tracker.wait_empty(grace)
        if not drained:
            log.warning("grace_period_over", sessions=self.tracker.count)
            self.tracker.abort_all()
            await self.tracker.wait_empty(_ABORT_WAIT)
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners = []
        await self._release()
        log.info(
            "stopped",
            sessions_at_stop=busy,
            drained=drained,
            uptime_s=round(time.monotonic() - self._started, 1) if self._started else 0,
        )

    async def _release(self) -> None:
        """Shut the lifespans down; close the metrics endpoint, the queues, the state store."""
        # First: a lifespan's shutdown may still push (the queues are open until below).
        lifespan, self._lifespan = self._lifespan, None
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)
        if self.metrics is not None:
            await self.metrics.stop_http()
        if self._auth is not None:
            self._auth.close()
            self._auth = None
        await self.registry.close()
        if self.spool is not None:
            self.spool.close()  # its threads end (no session is left to spool)
        if self._state_close is not None:
            self._state_close()
            self._state_close = None
        if self._context is not None and self._activation is not None:
            self._context.run(self._activation.__exit__, None, None, None)
        self._context = None
        self._activation = None

    def run(self) -> None:
        """Serve in a new event loop until a signal; the synchronous entry of the CLI.

        The loop is the one ``[runtime] loop`` names (stdlib asyncio or uvloop).

        Raises:
            ConfigError: bad handlers or TLS files, or uvloop asked for and not installed.
            OSError: the address cannot be bound.
        """
        loops.run(self.serve(), self.settings.runtime.loop)
