"""What a handler module declares: ``@route``, ``@route_like``, ``@stateless``, its routes.

The decorators only attach metadata to the function they decorate; nothing is registered
anywhere. :func:`module_routes` reads that metadata back from one module as
:class:`Route` objects (patterns compiled, groups checked against each handler's
signature), which :class:`~maildefer.routing.Router` is built from. Split from
``routing.py``, which keeps what happens per message (matching, state, locks).

Example:
    >>> import sys, types
    >>> app = sys.modules["doc_routes"] = types.ModuleType("doc_routes")
    >>> exec('''
    ... from maildefer import route, stateless
    ... @route("(name)@(host)")
    ... @stateless
    ... async def ARCHIVE(message, name, host): ...
    ... ''', app.__dict__)
    >>> [(r.pattern, r.handlers[0].stateless) for r in module_routes(app, {})]
    [('(name)@(host)', True)]
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from maildefer.errors import RoutingError

__all__ = [
    "Handler",
    "Route",
    "check_signature",
    "is_stateless",
    "module_routes",
    "route",
    "route_like",
    "stateless",
]

F = TypeVar("F", bound=Callable[..., Any])

ROUTES_ATTR = "_maildefer_routes"
"""The attribute ``@route`` sets on a handler: its ``(pattern, groups)`` pairs."""
STATELESS_ATTR = "_maildefer_stateless"
"""The attribute ``@stateless`` sets on a handler."""
# "(name)" not preceded by a backslash: a Lamson group. "(?:...)", "(a|b)" are left alone.
_GROUP = re.compile(r"(?<!\\)\(([A-Za-z_][A-Za-z0-9_]*)\)")


def route(pattern: str, **groups: str) -> Callable[[F], F]:
    """Route the addresses ``pattern`` matches to the decorated handler.

    Args:
        pattern: a regex over the whole address, in which ``(name)`` is a named group.
        **groups: regexes for some groups, overriding the router's defaults.

    Returns:
        A decorator that attaches the route to the function and returns it unchanged.
        It may be stacked to give one handler several patterns.

    Example:
        >>> import asyncio, sys, types
        >>> from maildefer.mail import MailRequest
        >>> from maildefer.routing import Router
        >>> app = sys.modules["doc_route"] = types.ModuleType("doc_route")
        >>> exec('''
        ... from maildefer import route
        ... @route("(user)-list@(host)", user="[a-z]+")
        ... async def START(message, user, host):
        ...     print("list", user, "at", host)
        ... ''', app.__dict__)
        >>> router = Router.from_modules(["doc_route"])
        >>> asyncio.run(router.deliver(MailRequest(b"\\n", rcpt_tos=["news-list@x.org"])))
        list news at x.org
        1
        >>> router.match("news2-list@x.org")  # the group's own regex: [a-z]+
        []
    """

    def decorate(fn: F) -> F:
        previous: tuple[tuple[str, dict[str, str]], ...] = getattr(fn, ROUTES_ATTR, ())
        setattr(fn, ROUTES_ATTR, (*previous, (pattern, dict(groups))))
        return fn

    return decorate


def route_like(other: Callable[..., Any]) -> Callable[[F], F]:
    """Give the decorated handler the same route(s) as ``other``.

    Raises:
        RoutingError: ``other`` has no ``@route``.

    Example:
        >>> import asyncio, sys, types
        >>> from maildefer.mail import MailRequest
        >>> from maildefer.routing import Router
        >>> app = sys.modules["doc_route_like"] = types.ModuleType("doc_route_like")
        >>> exec('''
        ... from maildefer import route, route_like
        ... @route("(name)@(host)")
        ... async def START(message, name, host):
        ...     print("START", name)
        ...     return POSTING
        ... @route_like(START)
        ... async def POSTING(message, name, host):
        ...     print("POSTING", name)
        ... ''', app.__dict__)
        >>> router = Router.from_modules(["doc_route_like"])
        >>> message = MailRequest(b"\\n", mail_from="ann@y.org", rcpt_tos=["blog@x.org"])
        >>> for _ in range(2):  # POSTING answers on START's addresses
        ...     _ = asyncio.run(router.deliver(message))
        START blog
        POSTING blog
    """
    routes: tuple[tuple[str, dict[str, str]], ...] = getattr(other, ROUTES_ATTR, ())
    if not routes:
        name = getattr(other, "__qualname__", repr(other))
        raise RoutingError(f"route_like({name}): {name} has no @route")

    def decorate(fn: F) -> F:
        previous: tuple[tuple[str, dict[str, str]], ...] = getattr(fn, ROUTES_ATTR, ())
        setattr(fn, ROUTES_ATTR, previous + routes)
        return fn

    return decorate


def stateless(fn: F) -> F:
    """Mark a handler stateless: called for every matching message, no state, no lock.

    Example:
        ``ARCHIVE`` runs for every message (first), whatever the sender's state:

        >>> import asyncio, io, sys, types
        >>> from maildefer import logs; logs.configure(level="warning", stream=io.StringIO())
        >>> from maildefer.mail import MailRequest
        >>> from maildefer.routing import Router
        >>> app = sys.modules["doc_stateless"] = types.ModuleType("doc_stateless")
        >>> exec('''
        ... from maildefer import route, stateless
        ... @route("(name)@(host)")
        ... async def START(message, name, host):
        ...     print("START")
        ...     return CONFIRMED
        ... @route("confirm-(name)@(host)")
        ... async def CONFIRMED(message, name, host):
        ...     print("CONFIRMED")
        ... @route("(name)@(host)")
        ... @stateless
        ... async def ARCHIVE(message, name, host):
        ...     print("ARCHIVE")
        ... ''', app.__dict__)
        >>> router = Router.from_modules(["doc_stateless"])
        >>> message = MailRequest(b"\\n", mail_from="ann@y.org", rcpt_tos=["blog@x.org"])
        >>> asyncio.run(router.deliver(message))
        ARCHIVE
        START
        2
        >>> asyncio.run(router.deliver(message))  # the sender is now in CONFIRMED
        ARCHIVE
        1
    """
    setattr(fn, STATELESS_ATTR, True)
    return fn


@dataclass(frozen=True)
class Handler:
    """One handler function as the router sees it.

    Example:
        >>> def START(message): ...
        >>> Handler("START", START, stateless=False, module="app").qualified
        'app.START'
    """

    name: str
    function: Callable[..., Any]
    stateless: bool
    module: str

    @property
    def qualified(self) -> str:
        """``module.name``."""
        return f"{self.module}.{self.name}"


@dataclass(frozen=True, eq=False, repr=False)
class Route:
    """One pattern of one module, and the handlers it leads to.

    Example:
        >>> r = Route.compile("post-(name)@(host)", {}, {"host": "x\\\\.org"}, "app", ())
        >>> r.regex.pattern
        'post-(?P<name>.+)@(?P<host>x\\\\.org)'
        >>> r.groups("Post-a@X.org")
        {'name': 'a', 'host': 'X.org'}
    """

    pattern: str
    regex: re.Pattern[str]
    module: str
    handlers: tuple[Handler, ...]

    @classmethod
    def compile(
        cls,
        pattern: str,
        groups: Mapping[str, str],
        defaults: Mapping[str, str],
        module: str,
        handlers: tuple[Handler, ...],
    ) -> Route:
        """Expand the ``(name)`` groups of a pattern and compile it.

        Raises:
            RoutingError: the expanded pattern is not a valid regex, or ``groups`` names a
                group the pattern does not have.

        Example:
            >>> Route.compile("(a)@x", {"a": "[0-9]+"}, {}, "m", ()).regex.pattern
            '(?P<a>[0-9]+)@x'
        """
        names: list[str] = []

        def expand(match: re.Match[str]) -> str:
            name = match.group(1)
            names.append(name)
            return f"(?P<{name}>{groups.get(name, defaults.get(name, '.+'))})"

        expanded = _GROUP.sub(expand, pattern)
        unknown = sorted(set(groups) - set(names))
        if unknown:
            raise RoutingError(f"{module}: route {pattern!r} has no group named {unknown[0]!r}")
        try:
            regex = re.compile(expanded, re.IGNORECASE)
        except re.error as exc:
            raise RoutingError(f"{module}: route {pattern!r} is not a valid regex: {exc}") from None
        return cls(pattern, regex, module, handlers)

    @property
    def handler_names(self) -> tuple[str, ...]:
        """The names of the handlers on this route, in definition order."""
        return tuple(h.name for h in self.handlers)

    @property
    def handler_name(self) -> str:
        """The first handler's name (most routes have one)."""
        return self.handlers[0].name if self.handlers else ""

    def __repr__(self) -> str:
        return f"<Route {self.pattern!r} {self.module} {','.join(self.handler_names)}>"

    def groups(self, address: str) -> dict[str, str] | None:
        """The groups of ``address`` if this route matches it whole, else ``None``.

        Example:
            >>> Route.compile("(a)@x", {}, {}, "m", ()).groups("b@y") is None
            True
        """
        match = self.regex.fullmatch(address)
        return None if match is None else match.groupdict()


def module_routes(module: ModuleType, defaults: Mapping[str, str]) -> list[Route]:
    """The routes a handler module declares, in definition order.

    Raises:
        RoutingError: the module declares no route, a pattern is invalid, or a handler
            cannot take its route's groups.

    Example:
        >>> import sys, types
        >>> app = sys.modules["doc_module_routes"] = types.ModuleType("doc_module_routes")
        >>> exec('''
        ... from maildefer import route
        ... @route("(name)@x[.]org")
        ... async def START(message, name): ...
        ... ''', app.__dict__)
        >>> module_routes(app, {})
        [<Route '(name)@x[.]org' doc_module_routes START>]
    """
    name = module.__name__
    found: dict[tuple[str, tuple[tuple[str, str], ...]], list[Handler]] = {}
    seen: set[int] = set()
    for fn in list(vars(module).values()):
        routes = getattr(fn, ROUTES_ATTR, None)
        # A handler imported from another module belongs to that module, as in Lamson.
        if not routes or not callable(fn) or getattr(fn, "__module__", None) != name:
            continue
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        handler = Handler(fn.__name__, fn, bool(getattr(fn, STATELESS_ATTR, False)), name)
        for pattern, groups in routes:
            found.setdefault((pattern, tuple(sorted(groups.items()))), []).append(handler)
    result = []
    for (pattern, groups), handlers in found.items():
        compiled = Route.compile(pattern, dict(groups), defaults, name, tuple(handlers))
        for handler in handlers:
            check_signature(handler, compiled)
        result.append(compiled)
    if not result:
        raise RoutingError(f"handler module {name!r} defines no @route handler")
    return result


def check_signature(handler: Handler, compiled: Route) -> None:
    """Refuse a handler that cannot take its route's groups as keyword arguments.

    Raises:
        RoutingError: calling it with the message and the groups would fail.

    Example:
        >>> r = Route.compile("(name)@x", {}, {}, "m", ())
        >>> check_signature(Handler("START", lambda message: None, False, "m"), r)
        Traceback (most recent call last):
        ...
        maildefer.errors.RoutingError: m.START cannot take the groups of route '(name)@x' ...
    """
    try:
        signature = inspect.signature(handler.function)
    except (TypeError, ValueError):
        return  # a builtin or C callable: nothing to check
    try:
        signature.bind(None, **dict.fromkeys(compiled.regex.groupindex, ""))
    except TypeError as exc:
        raise RoutingError(
            f"{handler.qualified} cannot take the groups of route {compiled.pattern!r}"
            f" as keyword arguments: {exc}"
        ) from None


def is_stateless(fn: object) -> bool:
    """Whether ``fn`` was marked ``@stateless``.

    Example:
        >>> @stateless
        ... async def ARCHIVE(message): ...
        >>> is_stateless(ARCHIVE), is_stateless(print)
        (True, False)
    """
    return bool(getattr(fn, STATELESS_ATTR, False))
