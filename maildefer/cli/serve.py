"""``maildefer serve [--host H] [--port P] [--loop L]``: the SMTP/LMTP listener, in the foreground.

The process works from the project root: ``serve`` changes its working directory to the
directory holding ``config/`` and puts it first on ``sys.path``, so ``app.handlers.*``
import and a handler's ``Queue("run/posts")`` lands in the project's ``run/posts``
whatever directory ``serve`` was started from (systemd's ``WorkingDirectory=`` may be
omitted). Only this entry point does so; :class:`~maildefer.smtp.server.Server` itself never
changes process state, so tests run it in-process.

Under systemd, sockets passed by socket activation (``LISTEN_FDS``) are served instead
of binding ``host:port``; with a notify socket, ``READY=1`` is sent once they accept,
``WATCHDOG=1`` pings and ``STATUS=`` lines (sessions, messages accepted and refused) while
serving, and ``STOPPING=1`` as soon as shutdown begins. Messages are counted for
Prometheus; ``[metrics] port`` serves the counts (off by default).

Exit status: 0 after SIGTERM/SIGINT; 2 for bad settings or a handler module that does not
load (one line on stderr, nothing bound); 1 when the address cannot be bound or a handler
module's ``lifespan`` raises at startup (one line logged, ``bind_failed`` or
``lifespan_failed``; nothing bound, no ``READY=1``).

Example:
    >>> p = argparse.ArgumentParser(); add_arguments(p)
    >>> p.parse_args(["--port", "2525"]).port
    2525
"""

from __future__ import annotations

import argparse

import structlog

from maildefer.cli import enter_project
from maildefer.cli.options import add_loop_argument, with_loop, with_overrides
from maildefer.errors import LifespanError
from maildefer.ops.metrics import Metrics
from maildefer.ops.systemd import Notifier, listen_fds
from maildefer.settings import Settings
from maildefer.smtp.server import Server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``maildefer serve``.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args([]).host is None
        True
    """
    parser.add_argument("--host", default=None, help="address to listen on ([server] host)")
    parser.add_argument("--port", type=int, default=None, help="port ([server] port)")
    add_loop_argument(parser)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT; 1 if the address cannot be bound or a lifespan fails.

    Example:
        >>> ns = argparse.Namespace(host=None, port=70000, loop=None)
        >>> run(ns, Settings())
        Traceback (most recent call last):
        ...
        maildefer.errors.ConfigError: --host/--port: Input should be less than or equal to 65535
    """
    settings = with_loop(with_overrides(settings, args.host, args.port), args.loop)
    enter_project(settings, chdir=True)
    # The counters also feed STATUS=, so they exist even when no endpoint serves them.
    server = Server(
        settings,
        sockets=listen_fds(),
        metrics=Metrics(),
        notifier=Notifier.from_environ(unset=True),
    )
    try:
        server.run()
    except LifespanError:
        return 1  # lifespan_failed is already logged, the one line a failed start leaves
    except OSError as exc:
        structlog.get_logger("maildefer.server").error(
            "bind_failed",
            host=settings.server.host,
            port=settings.server.port,
            error=exc.strerror or str(exc),
        )
        return 1
    return 0
