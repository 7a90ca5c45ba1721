"""Options several commands share: ``--loop``, and ``--host``/``--port`` over ``[server]``.

``serve`` and ``worker`` take ``--loop``; ``serve`` and ``log`` take ``--host`` and
``--port``. This module imports no daemon (no aiosmtpd, no watchfiles), so ``worker``
can use it without loading ``serve``'s dependencies.

Example:
    >>> import argparse
    >>> from maildefer.settings import Settings
    >>> p = argparse.ArgumentParser(); add_loop_argument(p)
    >>> with_loop(Settings(), p.parse_args(["--loop", "asyncio"]).loop).runtime.loop
    'asyncio'
"""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from maildefer.errors import ConfigError
from maildefer.loops import LOOP_NAMES
from maildefer.settings import Settings


def add_loop_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--loop {auto,asyncio,uvloop}`` (default ``None``: ``[runtime] loop`` decides).

    Example:
        >>> p = argparse.ArgumentParser(); add_loop_argument(p)
        >>> p.parse_args(["--loop", "uvloop"]).loop, p.parse_args([]).loop
        ('uvloop', None)
    """
    parser.add_argument(
        "--loop",
        choices=LOOP_NAMES,
        default=None,
        help="event loop, overriding [runtime] loop: asyncio (stdlib), uvloop, "
        "or auto (uvloop when installed)",
    )


def with_loop(settings: Settings, loop: str | None) -> Settings:
    """The settings with ``--loop`` applied (``None`` leaves ``[runtime] loop``).

    Example:
        >>> with_loop(Settings(), "uvloop").runtime.loop
        'uvloop'
        >>> with_loop(Settings(), None).runtime.loop
        'auto'
    """
    if loop is None:
        return settings
    runtime = type(settings.runtime).model_validate({"loop": loop})
    return settings.model_copy(update={"runtime": runtime})


def with_overrides(settings: Settings, host: str | None, port: int | None) -> Settings:
    """The settings with ``--host``/``--port`` applied (validated like the file).

    Raises:
        ConfigError: a value is out of range (one line, exit 2).

    Example:
        >>> with_overrides(Settings(), None, 2525).server.port
        2525
        >>> with_overrides(Settings(), None, 70000)
        Traceback (most recent call last):
        ...
        maildefer.errors.ConfigError: --host/--port: Input should be less than or equal to 65535
    """
    changes: dict[str, object] = {}
    if host is not None:
        changes["host"] = host
    if port is not None:
        changes["port"] = port
    if not changes:
        return settings
    try:
        server = type(settings.server).model_validate({**settings.server.model_dump(), **changes})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"--host/--port: {first.get('msg', 'invalid')}") from None
    return settings.model_copy(update={"server": server})
