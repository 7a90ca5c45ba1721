"""``maildefer routes [--test ADDRESS]``: what the handlers of a project answer to.

Lists every route of ``[server] handlers`` and of each ``[queues.*] handlers``: the
handler, whether it is stateful, the pattern as written and as compiled with the
``[router] defaults``. With ``--test ADDRESS``, shows which handlers mail to that address
reaches, with the groups they receive; the exit status is 1 when none does.

Example:
    >>> import argparse
    >>> from maildefer.settings import Settings
    >>> run(argparse.Namespace(test=None), Settings(server={"handlers": []}))
    [server] (no handlers)
    0
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from maildefer.auth import requirement_of
from maildefer.cli import enter_project
from maildefer.errors import ConfigError, RoutingError
from maildefer.routing import Route, Router
from maildefer.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``maildefer routes``.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["--test", "a@example.com"]).test
        'a@example.com'
    """
    parser.add_argument(
        "--test",
        metavar="ADDRESS",
        default=None,
        help="show which handlers mail to ADDRESS reaches (exit 1 if serve would refuse it)",
    )


def sections(settings: Settings) -> list[tuple[str, list[str]]]:
    """The handler lists of a project: ``[server]`` first, then each queue.

    Example:
        >>> s = Settings(queues={"posts": {"path": "run/posts", "handlers": ["app.x"]}})
        >>> sections(s)[1]
        ('[queues.posts] run/posts', ['app.x'])
    """
    found = [("[server]", list(settings.server.handlers))]
    for name, queue in settings.queues.items():
        found.append((f"[queues.{name}] {queue.path}", list(queue.handlers)))
    return found


def _router(settings: Settings, modules: list[str]) -> Router:
    try:
        return Router.from_modules(modules, defaults=settings.router.defaults)
    except RoutingError as exc:
        # A handler list that does not load is a settings problem: exit 2, one line.
        raise ConfigError(str(exc)) from None


def _describe(route: Route, out: TextIO) -> None:
    for handler in route.handlers:
        kind = "stateless" if handler.stateless else "stateful"
        # @authenticated: the sender check serve makes before this handler runs.
        requirement = requirement_of(handler.function)
        needs = f"  requires {'+'.join(requirement.methods)}" if requirement else ""
        print(
            f"  {handler.qualified:<40} {kind:<9} {route.pattern}  =>  {route.regex.pattern}"
            f"{needs}",
            file=out,
        )


def run(args: argparse.Namespace, settings: Settings, out: TextIO | None = None) -> int:
    """List the routes, or test an address against them.

    Handler modules are imported from the project root (the directory holding
    ``config/``), as ``serve`` and ``worker`` do.

    Example:
        >>> from maildefer.settings import Settings
        >>> run(argparse.Namespace(test="a@x.org"), Settings(server={"handlers": []}))
        a@x.org: no handler
        1
    """
    out = out if out is not None else sys.stdout
    enter_project(settings)
    if args.test is None:
        for title, modules in sections(settings):
            if not modules:
                print(f"{title} (no handlers)", file=out)
                continue
            print(title, file=out)
            for route in _router(settings, modules).routes():
                _describe(route, out)
        return 0
    reached = 0
    served = 0
    for title, modules in sections(settings):
        if not modules:
            continue
        for route in _router(settings, modules).match(args.test):
            groups = route.groups(args.test) or {}
            shown = " ".join(f"{k}={v!r}" for k, v in groups.items())
            print(f"{title} {route.pattern}  {shown}", file=out)
            _describe(route, out)
            reached += len(route.handlers)
            if title == "[server]":
                served += len(route.handlers)
    if reached == 0:
        print(f"{args.test}: no handler", file=out)
        return 1
    if served == 0:
        # Queue handlers alone do not make an address deliverable: serve refuses it at RCPT.
        print(f"{args.test}: no [server] handler: serve answers 550 5.1.1", file=out)
        return 1
    # Of a module's stateful handlers, only the one named by the sender's state runs.
    print(f"{args.test}: {reached} handler(s); stateful ones run by sender state", file=out)
    return 0
