"""``maildefer worker --queue QUEUE``: run a queue's handlers on its messages as they arrive.

``--queue`` is a path, a URL or a queue name from settings; the handlers are the
queue's ``[queues.NAME] handlers``. ``--concurrency`` overrides the queue's
``concurrency``; ``--burst`` drains what is there (with retries already due) and exits.

Exit status: 0 after a clean shutdown (SIGTERM or SIGINT) or a finished burst; 2 for bad
usage or settings (one line on stderr: an unknown queue option, no handlers, a handler
module that does not import); 1 for a failure at run time, logged. A second SIGTERM or
SIGINT exits at once with status 1; the claims it held are returned by the next
worker's recovery.

Under systemd (``Type=notify``) the worker reports ``READY=1`` when it starts,
``STOPPING=1`` on shutdown, and pings the watchdog from its event loop.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser(); add_arguments(p)
    >>> p.parse_args(["--queue", "posts", "--burst"]).burst
    True
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import structlog

from maildefer.errors import ConfigError, MaildeferError, RoutingError
from maildefer.queue import QueueRegistry, queue_options, resolve_queue
from maildefer.routing import Router
from maildefer.settings import Settings
from maildefer.state import state_store_for
from maildefer.systemd import Notifier, run_watchdog
from maildefer.worker import Worker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``maildefer worker``.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["--queue", "run/posts", "--concurrency", "2"]).concurrency
        2
    """
    parser.add_argument(
        "--queue", required=True, help="queue path, URL, or name from settings ([queues.NAME])"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="N",
        help="handler tasks at once (default: the queue's concurrency)",
    )
    parser.add_argument(
        "--burst",
        action="store_true",
        help="handle what is queued (and retries already due), then exit 0",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Build the worker from settings and run it until it is told to stop.

    Raises:
        ConfigError: bad usage or settings (the CLI exits 2).

    Example:
        >>> ns = argparse.Namespace(queue="nope", concurrency=None, burst=True)
        >>> run(ns, Settings())
        Traceback (most recent call last):
        ...
        maildefer.errors.ConfigError: queue 'nope' has no handlers (set [queues.NAME] handlers)
    """
    queue = settings.queue_settings(args.queue)
    if not queue.handlers:
        raise ConfigError(f"queue {args.queue!r} has no handlers (set [queues.NAME] handlers)")
    concurrency = queue.concurrency if args.concurrency is None else args.concurrency
    if concurrency < 1:
        raise ConfigError(f"--concurrency {concurrency}: expected at least 1")
    # Handler modules live in the project (app/handlers), importable from its root.
    root = str(settings.root)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        router = Router.from_modules(
            queue.handlers, defaults=settings.router.defaults, state=state_store_for(settings)
        )
    except RoutingError as exc:
        raise ConfigError(str(exc)) from None
    registry = QueueRegistry(undeliverable=settings.resolve(settings.undeliverable.path))
    backend = registry.get(resolve_queue(settings, args.queue), options=queue_options(queue))
    worker = Worker(
        backend,
        router.deliver,
        concurrency=concurrency,
        handler_timeout=queue.handler_timeout,
        grace_period=queue.grace_period,
        burst=args.burst,
        handlers=queue.handlers,
        registry=registry,
    )
    log = structlog.get_logger("maildefer.worker")
    try:
        asyncio.run(_serve(worker, registry))
    except MaildeferError:
        raise
    except Exception:
        log.exception("worker_failed", queue=backend.url)
        return 1
    return 0


async def _serve(worker: Worker, registry: QueueRegistry) -> None:
    """Run the worker with signal handling, systemd notification and the watchdog."""
    loop = asyncio.get_running_loop()
    notifier = Notifier.from_environ(unset=True)
    force = asyncio.Event()

    def on_signal(signum: int) -> None:
        # Signals only set events; the tasks below act on them.
        if worker.stopping:
            force.set()
        else:
            worker.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    async def exit_at_once() -> None:
        await force.wait()
        structlog.get_logger("maildefer.worker").warning(
            "worker_killed", reason="second signal", in_flight=len(worker.in_flight())
        )
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)  # in-flight claims stay in cur/ for the next recovery

    forced = loop.create_task(exit_at_once())
    watchdog = loop.create_task(run_watchdog(notifier))
    notifier.ready(f"worker on {worker.backend.url}")
    try:
        await worker.run()
    finally:
        notifier.stopping()
        for task in (forced, watchdog):
            task.cancel()
        await asyncio.gather(forced, watchdog, return_exceptions=True)
        await registry.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
