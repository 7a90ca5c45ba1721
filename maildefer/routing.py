"""Routing: recipient address → handler functions, with Lamson's per-sender state functions.

The decorators (``maildefer/routes.py``, re-exported here) only attach metadata to the
function they decorate; nothing is registered anywhere. :meth:`Router.from_modules`
imports handler modules and builds a router instance from what it finds (their routes
and their ``lifespan`` hooks: ``maildefer/lifespan.py``), so two routers in one process
never interfere.

Patterns are Lamson's: a regex over the whole address in which ``(name)`` is a named
group. A group's regex comes from the ``route(...)`` keyword of the same name, else from
``defaults`` (``[router] defaults`` in the settings), else ``.+``. Matching is anchored
on the whole address and case-insensitive; the groups become keyword arguments.

State functions, as in Lamson:

* Every (handler module, sender address) pair has a state, the name of a function in
  that module; it starts at ``START``.
* A message goes to the state's function when that function's route matches the
  recipient. A state function without a ``@route`` uses the routes of ``START``.
* The function returns the next state function (``return POSTING``) or ``None`` to stay
  in the same state (Lamson sets a state only when the returned value is truthy).
* A handler that raises changes no state (Salmon moves the sender to an ``ERROR`` state
  that traps every later message): the exception is logged and propagates unchanged, so
  the caller can answer 451 or retry the message.
* Stateful handlers of one (module, sender) run one at a time (an asyncio lock in this
  process); ``@stateless`` handlers run for every matching message, without state or lock.

Example:
    >>> import asyncio, sys, types
    >>> mod = types.ModuleType("doc_blog"); sys.modules["doc_blog"] = mod
    >>> exec('''
    ... from maildefer.routing import route
    ... @route("post-(name)@(host)", name="[a-z]+")
    ... async def START(message, name, host):
    ...     message.seen = (name, host)
    ... ''', mod.__dict__)
    >>> router = Router.from_modules(["doc_blog"], defaults={"host": r"example\\.com"})
    >>> [r.handler_names for r in router.match("POST-news@example.com")]
    [('START',)]
    >>> router.match("post-news@elsewhere.org")
    []
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any

import structlog

from maildefer.auth import check_requirement
from maildefer.errors import NoRouteError, RoutingError, SMTPError
from maildefer.lifespan import LifespanHook, Lifespans, bind_resources, module_lifespan
from maildefer.logs import sanitize
from maildefer.mail import MailRequest
from maildefer.routes import (
    Handler,
    Route,
    is_stateless,
    module_routes,
    route,
    route_like,
    stateless,
)
from maildefer.settings import Settings
from maildefer.state import MemoryStateStore, StateStore

__all__ = ["Handler", "Route", "Router", "route", "route_like", "stateless"]

START = "START"


class _KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


async def _invoke(fn: Callable[..., Any], message: MailRequest, groups: dict[str, str]) -> Any:
    result = fn(message, **groups)
    if inspect.isawaitable(result):
        result = await result
    return result


class Router:
    """Routes messages to the handlers of some modules; holds no global state.

    Args:
        routes: the routes, in the order they are tried.
        modules: the handler modules by name, to find state functions without ``@route``
            (default: looked up in ``sys.modules``) and their ``lifespan`` hooks
            (:meth:`lifespan`; only these modules' are run).
        state: where sender states live (default: in memory).

    Raises:
        RoutingError: a module has stateful handlers but no ``START``, or a ``lifespan``
            that is not a hook (see :func:`~maildefer.lifespan.module_lifespan`).

    Example:
        >>> import asyncio
        >>> greet = Handler("greet", lambda m, name: print("hi", name), stateless=True, module="d")
        >>> router = Router([Route.compile("(name)@x\\\\.org", {}, {}, "d", (greet,))])
        >>> asyncio.run(router.deliver(MailRequest(b"\\n", rcpt_tos=["ann@x.org"])))
        hi ann
        1
    """

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        modules: Mapping[str, ModuleType] | None = None,
        state: StateStore | None = None,
    ) -> None:
        self._routes = list(routes)
        self._modules = dict(modules or {})
        self.state: StateStore = state if state is not None else MemoryStateStore()
        self._locks = _KeyedLocks()
        # module -> state function name -> (function, the routes it answers on)
        self._states: dict[str, dict[str, tuple[Callable[..., Any], tuple[Route, ...]]]] = {}
        for r in self._routes:
            for h in r.handlers:
                if not h.stateless:
                    fns = self._states.setdefault(r.module, {})
                    fn, previous = fns.get(h.name, (h.function, ()))
                    fns[h.name] = (fn, (*previous, r))
        for module, fns in self._states.items():
            if START not in fns:
                raise RoutingError(
                    f"handler module {module!r} has state functions"
                    f" ({', '.join(sorted(fns))}) but no START"
                )
        self._lifespans: list[tuple[str, LifespanHook]] = [
            (name, hook)
            for name, mod in self._modules.items()
            if (hook := module_lifespan(mod)) is not None
        ]
        # Module -> what its lifespan yielded, filled while lifespan() is entered.
        self._resources: dict[str, Any] = {}

    @classmethod
    def from_modules(
        cls,
        modules: Sequence[str],
        *,
        defaults: Mapping[str, str] | None = None,
        state: StateStore | None = None,
    ) -> Router:
        """Import handler modules and build a router from their ``@route`` handlers.

        Args:
            modules: dotted module names, e.g. ``["app.handlers.posting"]``.
            defaults: regexes for named groups (``[router] defaults``).
            state: the state store (default: in memory).

        Raises:
            RoutingError: a module cannot be imported, declares no route, or has an
                invalid pattern, a handler that cannot take its route's groups or a
                ``lifespan`` that is not a hook.

        Example:
            >>> Router.from_modules(["no.such.module"])
            Traceback (most recent call last):
            ...
            maildefer.errors.RoutingError: cannot import handler module 'no.such.module': ...
        """
        routes: list[Route] = []
        loaded: dict[str, ModuleType] = {}
        for name in modules:
            try:
                module = importlib.import_module(name)
            except Exception as exc:
                raise RoutingError(
                    f"cannot import handler module {name!r}: {type(exc).__name__}: {exc}"
                ) from exc
            loaded[name] = module
            routes.extend(module_routes(module, defaults or {}))
        return cls(routes, modules=loaded, state=state)

    def lifespan(self, settings: Settings) -> Lifespans:
        """The ``lifespan`` hooks of this router's modules, to enter around serving.

        ``Server`` enters it by itself; give it to a ``Worker`` as its ``lifespan``; a
        test may enter it around a conversation. While it is entered, a handler's
        :func:`~maildefer.lifespan.resources` is what its module's lifespan yielded.

        Example:
            >>> import asyncio, sys, types
            >>> from maildefer.settings import Settings
            >>> app = sys.modules["doc_router_lifespan"] = types.ModuleType("doc_router_lifespan")
            >>> exec('''
            ... from contextlib import asynccontextmanager
            ... from maildefer import resources, route
            ... @asynccontextmanager
            ... async def lifespan(settings):
            ...     yield {"greeting": "hello"}
            ... @route("(name)@x[.]org")
            ... async def START(message, name):
            ...     print(resources()["greeting"], name)
            ... ''', app.__dict__)
            >>> router = Router.from_modules(["doc_router_lifespan"])
            >>> async def demo():
            ...     async with router.lifespan(Settings()):
            ...         await router.deliver(MailRequest(b"\\n", rcpt_tos=["ann@x.org"]))
            >>> asyncio.run(demo())
            hello ann
        """
        return Lifespans(self._lifespans, settings, resources=self._resources)

    def routes(self) -> list[Route]:
        """Every route, in the order they are tried.

        Example:
            >>> r = Route.compile("(a)@x", {}, {}, "m", ())
            >>> Router([r]).routes() == [r]
            True
        """
        return list(self._routes)

    def match(self, address: str) -> list[Route]:
        """The routes whose pattern matches the whole address (case-insensitive).

        An empty list means no handler can take mail for this address (SMTP: 550 at RCPT).

        Example:
            >>> router = Router([Route.compile("(a)@x\\\\.org", {}, {}, "m", ())])
            >>> router.match("B@X.ORG")[0].pattern
            '(a)@x\\\\.org'
        """
        return [r for r in self._routes if r.regex.fullmatch(address)]

    @staticmethod
    def state_key(module: str, sender: str) -> str:
        """The state store key of one sender in one handler module.

        Example:
            >>> Router.state_key("app.handlers.posting", "Ann@Example.com")
            'app.handlers.posting:ann@example.com'
        """
        return f"{module}:{sender.lower()}"

    async def deliver(self, message: MailRequest) -> int:
        """Call every handler whose route matches ``message.rcpt_to``.

        Stateless handlers are all called; of each module's stateful handlers only the
        one named by the sender's state is, when its route matches. Handlers run one
        after the other, in route order; the first exception stops the delivery.

        Returns:
            How many handlers ran (at least one).

        Raises:
            NoRouteError: no route matches ``message.rcpt_to``, or routes match but none
                of a stateless handler or of the sender's state function does.
            Exception: whatever a handler raised (``SMTPError`` included), unchanged.

        Example:
            >>> import asyncio
            >>> asyncio.run(Router([]).deliver(MailRequest(b"\\n", rcpt_tos=["a@x"])))
            Traceback (most recent call last):
            ...
            maildefer.errors.NoRouteError: no route matches 'a@x'
        """
        address = message.rcpt_to
        matched = self.match(address)
        if not matched:
            raise NoRouteError(f"no route matches {address!r}")
        by_module: dict[str, list[Route]] = {}
        for r in matched:
            by_module.setdefault(r.module, []).append(r)
        ran = 0
        for module, routes in by_module.items():
            for r in routes:
                for h in r.handlers:
                    if h.stateless:
                        await self._call(h.qualified, h.function, r, message)
                        ran += 1
            if any(not h.stateless for r in routes for h in r.handlers):
                ran += await self._deliver_stateful(module, routes, message)
        if ran == 0:
            # Routes match, but not the one of the sender's state (a list waiting for a
            # confirmation): nothing handled it, so it must not count as delivered. Serve
            # refuses it (550), a worker sets it aside with this reason (Lamson: undeliverable).
            raise NoRouteError(
                f"no handler for {address!r} in the state of sender {message.mail_from!r}"
            )
        return ran

    async def _deliver_stateful(
        self, module: str, matched: list[Route], message: MailRequest
    ) -> int:
        key = self.state_key(module, message.mail_from)
        async with self._locks.hold(key):
            state = await self.state.get(key) or START
            name, fn, fn_routes = self._state_function(module, state)
            chosen = next((r for r in matched if any(r is fr for fr in fn_routes)), None)
            if chosen is None:
                structlog.get_logger("maildefer.routing").debug(
                    "state route does not match", module=module, state=name
                )
                return 0
            result = await self._call(f"{module}.{name}", fn, chosen, message)
            await self._next_state(module, message.mail_from, name, result)
            return 1

    def _state_function(
        self, module: str, state: str
    ) -> tuple[str, Callable[..., Any], tuple[Route, ...]]:
        fns = self._states[module]
        if state in fns:
            return state, *fns[state]
        # Lamson: a state function without @route answers on the routes of START.
        mod = self._modules.get(module) or sys.modules.get(module)
        fn = getattr(mod, state, None) if mod is not None and not state.startswith("_") else None
        if callable(fn) and not is_stateless(fn):
            return state, fn, fns[START][1]
        # A state saved by an older version of the module: start the sender over.
        structlog.get_logger("maildefer.routing").warning(
            "unknown state, using START", module=module, state=state
        )
        return START, *fns[START]

    async def _next_state(self, module: str, sender: str, current: str, result: object) -> None:
        if result is None:
            return  # Lamson: a falsy return keeps the state
        if isinstance(result, str):
            target_module, target = module, result
        elif callable(result) and isinstance(name := getattr(result, "__name__", None), str):
            target_module = getattr(result, "__module__", None) or module
            target = name
        else:
            # The handler's work is done; failing now would only make the caller retry it.
            structlog.get_logger("maildefer.routing").warning(
                "handler returned no state function; state kept",
                module=module,
                state=current,
                returned=type(result).__name__,
            )
            return
        # Lamson sets the state of the module the returned function lives in.
        if target_module == module and target == current:
            return
        await self.state.set(self.state_key(target_module, sender), target)

    async def _call(
        self, qualified: str, fn: Callable[..., Any], chosen: Route, message: MailRequest
    ) -> Any:
        groups = chosen.groups(message.rcpt_to) or {}
        log = structlog.get_logger("maildefer.routing")
        try:
            # @authenticated: refused before the handler runs (maildefer/auth.py).
            check_requirement(fn, message)
            if chosen.module in self._resources:
                # What the module's lifespan yielded, for resources() in its handlers.
                with bind_resources(self._resources[chosen.module]):
                    return await _invoke(fn, message, groups)
            return await _invoke(fn, message, groups)
        except SMTPError as exc:
            log.info("handler refused message", handler=qualified, reply=sanitize(exc.reply))
            raise
        except Exception as exc:
            # The state is left as it was: the sender is not trapped in an error state.
            # No traceback here: the caller (SMTP session, worker) logs it with its outcome.
            log.warning(
                "handler failed, state kept",
                handler=qualified,
                rcpt_to=sanitize(message.rcpt_to),
                error=sanitize(f"{type(exc).__name__}: {exc}"),
            )
            raise
