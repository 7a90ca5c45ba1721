"""Logging: the only caller of ``structlog.configure``.

Console lines in a terminal, one JSON object per line otherwise (journald, files, CI).
Per-session and per-message context (``session``, ``peer``, ``queue``, ``key``, ``attempt``)
is bound with ``structlog.contextvars`` by the code that owns it, so every line of a
session or a message carries it. Message bytes are never logged; peer-supplied strings
are passed through :func:`sanitize` first.

The client libraries that log through the standard :mod:`logging` module (aio-pika,
aiormq and pamqp for RabbitMQ, and :mod:`asyncio`'s "exception was never retrieved")
are bridged (:class:`StdlibBridge`): each of their records becomes one structlog event
through the same processors, its ``logger`` named, a traceback folded into the event's
``exception`` field, so a connection loss is one JSON line, never a raw traceback on
standard error. Their DEBUG chatter (one line per AMQP frame) is never shown: the
bridged loggers pass INFO and up, filtered again by the configured level.

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> configure(level="info", fmt="json", stream=out)
    >>> structlog.get_logger().info("hello", n=1)
    >>> '"event": "hello"' in out.getvalue()
    True
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

BRIDGED_LOGGERS = ("aio_pika", "aiormq", "pamqp", "asyncio")
"""The standard-library loggers whose records go through structlog."""
LIBRARY_FLOOR = logging.INFO
"""The lowest level a bridged library logs at, whatever the configured level."""
MAX_EVENT_CHARS = 2000
"""A library's message is cut to this (some put a whole frame's repr in it)."""


class StdlibBridge(logging.Handler):
    """A :mod:`logging` handler that hands each record to structlog, as one event.

    The event is the record's message; ``logger`` its logger's name; a record's
    ``exc_info`` becomes the event's ``exc_info`` (rendered by the configured
    processors: one ``exception`` field in JSON). When structlog is not configured
    (a test reset it), a record of WARNING or more goes where the standard library puts
    records nobody handles (:data:`logging.lastResort`), as without the bridge.

    Example:
        >>> import io, json
        >>> out = io.StringIO(); configure(level="info", fmt="json", stream=out)
        >>> logging.getLogger("aiormq.connection").warning("lost %s", "node1")
        >>> line = json.loads(out.getvalue()); line["event"], line["logger"], line["level"]
        ('lost node1', 'aiormq.connection', 'warning')
        >>> reset()
    """

    def emit(self, record: logging.LogRecord) -> None:
        """Log ``record`` through structlog (never raises into the library)."""
        try:
            if not structlog.is_configured():
                fallback = logging.lastResort
                if fallback is not None and record.levelno >= fallback.level:
                    fallback.handle(record)
                return
            event = record.getMessage()
            if len(event) > MAX_EVENT_CHARS:
                event = event[:MAX_EVENT_CHARS] + "…"
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[0] is not None:
                fields["exc_info"] = record.exc_info
            structlog.get_logger(record.name).log(record.levelno, event, **fields)
        except Exception:  # logging must never raise into the library
            self.handleError(record)


def bridge_stdlib(level: int) -> None:
    """Route the :data:`BRIDGED_LOGGERS` through structlog (replacing an earlier bridge).

    Called by :func:`configure`; each call leaves exactly one bridge on each logger, so
    configuring again (tests do, many times) never stacks handlers.

    Example:
        >>> bridges = lambda: [h for h in logging.getLogger("aiormq").handlers
        ...                    if isinstance(h, StdlibBridge)]
        >>> bridge_stdlib(logging.WARNING); bridge_stdlib(logging.WARNING); len(bridges())
        1
        >>> logging.getLogger("aiormq").level, logging.getLogger("aiormq").propagate
        (30, False)
        >>> unbridge_stdlib(); bridges()
        []
    """
    unbridge_stdlib()
    for name in BRIDGED_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(StdlibBridge())
        logger.setLevel(max(level, LIBRARY_FLOOR))
        # Not also to the root logger's handlers: one line per event.
        logger.propagate = False


def unbridge_stdlib() -> None:
    """Undo :func:`bridge_stdlib`: the loggers as the standard library left them.

    Example:
        >>> unbridge_stdlib(); logging.getLogger("aio_pika").propagate
        True
    """
    for name in BRIDGED_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, StdlibBridge)]:
            logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


def reset() -> None:
    """Undo :func:`configure` (for tests): structlog's defaults, no bridge.

    Example:
        >>> import io; configure(stream=io.StringIO()); reset()
        >>> structlog.is_configured(), logging.getLogger("aiormq").propagate
        (False, True)
    """
    unbridge_stdlib()
    structlog.reset_defaults()


def sanitize(value: object, limit: int = 200) -> str:
    """A client-supplied value made safe for one log line: printable, bounded.

    Example:
        >>> sanitize("EHLO \\x00evil\\r\\n" + "a" * 300, limit=12)
        'EHLO \\\\x00evi…'
    """
    text = value if isinstance(value, str) else repr(value)
    escaped = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + "…"


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog for the process (call once, from the CLI).

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        fmt: ``console``, ``json``, or ``auto`` (console when ``stream`` is a TTY).
        stream: where lines go; standard error by default.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> configure(level="warning", fmt="console", stream=out)
        >>> structlog.get_logger().info("dropped"); structlog.get_logger().warning("kept")
        >>> "kept" in out.getvalue(), "dropped" in out.getvalue()
        (True, False)
    """
    out = stream if stream is not None else sys.stderr
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if console:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    else:
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ]
    numeric = _LEVELS.get(level, logging.INFO)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    bridge_stdlib(numeric)
