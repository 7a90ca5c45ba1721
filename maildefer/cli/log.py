"""``maildefer log [--port 8825] [--queue run/queue]``: Lamson's logging server.

An SMTP server that accepts mail for *every* recipient and pushes each message, once,
durably to a queue (a maildir: read it with ``maildefer queue run/queue show KEY``, mutt,
or any maildir tool). Point ``[relay]`` at it in development, and every reply your
handlers send lands there instead of in someone's inbox.

It never relays: messages stop in the queue. It listens on ``[server] host`` unless
``--host`` says otherwise, with the limits of ``[server]``; 250 means the message is on
disk, a failed push answers 451.

Example:
    >>> p = argparse.ArgumentParser(); add_arguments(p)
    >>> p.parse_args([]).queue
    'run/queue'
"""

from __future__ import annotations

import argparse

import structlog

from maildefer.cli.options import with_overrides
from maildefer.mail import MailRequest
from maildefer.queue import Queue
from maildefer.queue.config import resolve_queue
from maildefer.settings import Settings
from maildefer.smtp.policy import AcceptAll
from maildefer.smtp.server import Server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``maildefer log``.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["--port", "2600"]).port
        2600
    """
    parser.add_argument("--host", default=None, help="address to listen on ([server] host)")
    parser.add_argument("--port", type=int, default=8825, help="port (default 8825)")
    parser.add_argument("--queue", default="run/queue", help="queue path, URL or name")


def log_server(settings: Settings, queue: str) -> Server:
    """A server that pushes every message it receives to ``queue``.

    Example:
        >>> log_server(Settings(), "/tmp/q-doc-log").port is None
        True
    """
    target = resolve_queue(settings, queue)

    async def push(message: MailRequest) -> None:
        # Queue() inside the server's registry: every session shares one backend.
        key = await Queue(target).push(message)
        structlog.get_logger("maildefer.log").info("logged", queue=target, key=key)

    return Server(settings, router=AcceptAll(push), per_recipient=False)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT; 1 if the port cannot be bound.

    Example:
        >>> import io, socket
        >>> from maildefer import logs; logs.configure(stream=io.StringIO())
        >>> with socket.create_server(("127.0.0.1", 0)) as taken:  # the port is in use
        ...     port = taken.getsockname()[1]
        ...     ns = argparse.Namespace(host="127.0.0.1", port=port, queue="/tmp/q-doc-log")
        ...     run(ns, Settings())
        1
    """
    settings = with_overrides(settings, args.host, args.port)
    server = log_server(settings, args.queue)
    try:
        server.run()
    except OSError as exc:
        structlog.get_logger("maildefer.server").error(
            "bind_failed", port=settings.server.port, error=exc.strerror or str(exc)
        )
        return 1
    return 0
