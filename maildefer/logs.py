"""Logging: the only caller of ``structlog.configure``.

Console lines in a terminal, one JSON object per line otherwise (journald, files, CI).
Per-session and per-message context (``session``, ``peer``, ``queue``, ``key``, ``attempt``)
is bound with ``structlog.contextvars`` by the code that owns it, so every line of a
session or a message carries it. Message bytes are never logged; peer-supplied strings
are passed through :func:`sanitize` first.

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
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
