"""``maildefer worker --queue QUEUE``: run a queue's handlers on its messages as they arrive.

``--queue`` is a path, a URL or a queue name from settings; the handlers are the
queue's ``[queues.NAME] handlers``. ``--concurrency`` overrides the queue's
``concurrency``; ``--burst`` drains what is there (with retries already due) and exits;
``--loop`` overrides ``[runtime] loop`` (the event loop: asyncio, uvloop or auto).

Exit status: 0 after a clean shutdown (SIGTERM or SIGINT) or a finished burst; 2 for bad
usage or settings (one line on stderr: an unknown queue option, no handlers, a handler
module that does not import); 1 for a failure at run time, logged (a handler module's
``lifespan`` that raises at startup: one ``lifespan_failed`` line, nothing claimed). A
second SIGTERM or SIGINT exits at once with status 1; the claims it held are returned by
the next worker's recovery.

Under systemd (``Type=notify``) the worker reports ``READY=1`` once it is live (a maildir
queue's watcher armed and its first scan batch in, so a message landing afterwards is
picked up at once), ``STATUS=`` lines with its counts, ``STOPPING=1`` as soon as a
shutdown begins, and pings the watchdog from its event loop. With ``[metrics] port`` set
it serves Prometheus metrics (pickup latency, handler time, retries, burials, in-flight,
queue depth) on that port.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser(); add_arguments(p)
    >>> p.parse_args(["--queue", "posts", "--burst"]).burst
    True
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import structlog

from maildefer.cli import enter_project
from maildefer.cli.options import add_loop_argument
from maildefer.errors import ConfigError, LifespanError, MaildeferError, RoutingError
from maildefer.ops.systemd import Notifier
from maildefer.queue.config import QueueRegistry, queue_options, resolve_queue
from maildefer.queue.maildir import MaildirQueue
from maildefer.routing import Router
from maildefer.settings import Settings
from maildefer.state import state_store_for
from maildefer.worker import Worker

if TYPE_CHECKING:
    from maildefer.ops.metrics import Metrics


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
    add_loop_argument(parser)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Build the worker from settings and run it until it is told to stop.

    Raises:
        ConfigError: bad usage or settings (the CLI exits 2).

    Example:
        >>> ns = argparse.Namespace(queue="nope", concurrency=None, burst=True, loop=None)
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
    enter_project(settings)
    try:
        router = Router.from_modules(
            queue.handlers, defaults=settings.router.defaults, state=state_store_for(settings)
        )
    except RoutingError as exc:
        raise ConfigError(str(exc)) from None
    registry = QueueRegistry.from_settings(settings)
    backend = registry.get(resolve_queue(settings, args.queue), options=queue_options(queue))
    name = queue_name(settings, args.queue)
    metrics: Metrics | None = None
    if settings.metrics.port is not None:
        # Imported only when asked for: prometheus-client costs every worker start.
        from maildefer.ops.metrics import Metrics

        metrics = Metrics()
        if isinstance(backend, MaildirQueue):
            metrics.track_queue(name, backend)
    worker = Worker(
        backend,
        router.deliver,
        concurrency=concurrency,
        handler_timeout=queue.handler_timeout,
        grace_period=queue.grace_period,
        burst=args.burst,
        handlers=queue.handlers,
        registry=registry,
        metrics=metrics,
        metrics_endpoint=settings.metrics,
        notifier=Notifier.from_environ(unset=True),
        name=name,
        # The queue's handler modules' lifespan hooks: the same ones serve runs for its own.
        lifespan=router.lifespan(settings),
    )
    try:
        worker.run(settings.runtime.loop if args.loop is None else args.loop)
    except LifespanError:
        return 1  # lifespan_failed is already logged, the one line a failed start leaves
    except MaildeferError:
        raise
    except Exception:
        structlog.get_logger("maildefer.worker").exception("worker_failed", queue=backend.url)
        return 1
    return 0


def queue_name(settings: Settings, ref: str) -> str:
    """The ``[queues.NAME]`` table a ``--queue`` reference names (the label in metrics).

    A path or URL that no table names is its own name.

    Example:
        >>> s = Settings(queues={"posts": {"path": "run/posts"}})
        >>> queue_name(s, "posts"), queue_name(s, "run/posts"), queue_name(s, "run/x")
        ('posts', 'posts', 'run/x')
    """
    if ref in settings.queues:
        return ref
    target = settings.queue_settings(ref)
    for name, queue in settings.queues.items():
        if queue is target:
            return name
    return ref
