"""The command line: ``python -m maildefer COMMAND``; ``main(argv) -> int``.

Each command lives in its own module, which provides ``add_arguments(parser)`` and
``run(args, settings) -> int``; this module only parses, loads settings once, configures
logging and maps errors to exit codes: 0 success, 2 bad usage or bad settings (one line
on stderr), 1 a failure at run time (logged).

Example:
    >>> main(["--help"])  # doctest: +ELLIPSIS
    usage: maildefer ...
    0
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, cast

import structlog

from maildefer import logs
from maildefer.errors import ConfigError, MaildeferError
from maildefer.relay import Relay
from maildefer.settings import Settings, load_settings
from maildefer.view import View

# (command, module, one-line help). A module is imported only when its command runs.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("queue", "maildefer.cli.queue", "inspect and manage a queue: count, keys, show, requeue..."),
    ("status", "maildefer.cli.status", "queue depths and ages; non-zero exit past thresholds"),
    ("worker", "maildefer.cli.worker", "run a queue's handlers on its messages as they arrive"),
    (
        "routes",
        "maildefer.cli.routes",
        "list the routes; --test ADDRESS shows which handlers an address reaches",
    ),
    ("serve", "maildefer.cli.serve", "receive mail over SMTP/LMTP and run the handlers"),
    ("send", "maildefer.cli.send", "send a test message over SMTP (to serve by default)"),
    ("log", "maildefer.cli.log", "an SMTP server that queues every message it gets (dev relay)"),
    ("gen", "maildefer.cli.gen", "create a new project (the example blog) in a directory"),
)


class _Command(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace, settings: Settings) -> int: ...


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() owns the exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def enter_project(settings: Settings, *, chdir: bool = False) -> None:
    """Make the project's handler modules importable: its root first on ``sys.path``.

    The root is the directory holding ``config/``, where ``app.handlers.*`` live.
    ``serve``, ``worker`` and ``routes`` import handlers; ``serve`` also works from the
    root (``chdir``), so a handler's ``Queue("run/posts")`` lands in the project whatever
    directory it was started from.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> enter_project(Settings(root=root)); enter_project(Settings(root=root))
        >>> sys.path[0] == root, sys.path.count(root)  # first, and only once
        (True, 1)
        >>> sys.path.remove(root)
    """
    root = str(settings.root)
    if chdir:
        os.chdir(root)
    if root not in sys.path:
        sys.path.insert(0, root)


def _selected(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (the first positional word), if any."""
    words = iter(argv)
    for word in words:
        if word == "--config":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def installed_version() -> str:
    """The version of the installed maildefer distribution (``pyproject.toml``'s).

    Read from the package metadata, so the number lives in one place.

    Example:
        >>> installed_version().count(".") >= 2
        True
    """
    try:
        return importlib.metadata.version("maildefer")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s module is imported (all when ``None``).

    Importing every command's dependencies (aiosmtpd, watchfiles, prometheus-client) would
    add a second to each worker start, which restarts after a crash pay for.

    Example:
        >>> build_parser("routes").parse_args(["routes", "--test", "a@example.com"]).test
        'a@example.com'
    """
    parser = _Parser(
        prog="maildefer",
        description="Receive mail over SMTP/LMTP, route it to handlers, defer work to queues.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="settings file (default: config/settings.toml)",
    )
    parser.add_argument("--version", action="version", version=f"maildefer {installed_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module, help_text in COMMANDS:
        cmd_parser = sub.add_parser(name, help=help_text, description=help_text)
        cmd_parser.add_argument(
            "--config",
            type=Path,
            default=argparse.SUPPRESS,
            help="settings file (default: config/settings.toml)",
        )
        if command is None or command == name:
            cast(_Command, importlib.import_module(module)).add_arguments(cmd_parser)
        cmd_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit status.

    Example:
        >>> main(["no-such-command"])
        2
    """
    try:
        words = list(sys.argv[1:] if argv is None else argv)
        parser = build_parser(_selected(words) or "")
        try:
            args = parser.parse_args(words)
        except SystemExit as exc:  # --help and --version exit 0 through argparse
            return int(exc.code or 0)
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"maildefer: error: {exc}", file=sys.stderr)
        return 2
    logs.configure(level=settings.logging.level, fmt=settings.logging.format)
    command = cast(_Command, importlib.import_module(args._module))
    try:
        with Relay.from_settings(settings).active(), View.from_settings(settings).active():
            return command.run(args, settings)
    except ConfigError as exc:
        print(f"maildefer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except MaildeferError as exc:
        structlog.get_logger().error("failed", command=args.command, error=str(exc))
        return 1
