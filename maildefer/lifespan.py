"""Lifespan: what a handler module opens once per process and closes at shutdown.

A handler module may define ``lifespan``: a function that takes the process's
:class:`~maildefer.settings.Settings` and returns an async context manager, in practice
an ``async def`` with one ``yield`` decorated with :func:`contextlib.asynccontextmanager`
(FastAPI's ``lifespan``, arq's ``on_startup``/``on_shutdown`` in one function). What it
yields is that module's *resources*, which its handlers read with :func:`resources`::

    from contextlib import asynccontextmanager

    import httpx
    from maildefer import resources, route

    @asynccontextmanager
    async def lifespan(settings):
        async with httpx.AsyncClient(timeout=10) as http:  # opened once per process
            yield {"http": http}                            # this module's resources()
        # closed here, after the last handler of the process returned

    @route("(name)@(host)")
    async def START(message, name, host):
        await resources()["http"].post("https://example.com/hook", content=message.raw)

The rules, the same for ``serve`` and ``worker``:

- ``serve`` runs the lifespans of the ``[server] handlers`` modules, a worker those of its
  queue's ``[queues.NAME] handlers``. A module listed for both runs its lifespan in each
  process (they are separate processes, each with its own resources).
- Code before ``yield`` runs once per process, module by module in the order of the
  setting, before anything is bound (serve) or claimed (worker) and before ``READY=1``.
  If it raises, the modules already started are shut down, one error line
  ``lifespan_failed`` names the module and the exception, and the process exits 1.
- Code after ``yield`` runs once the daemon has drained (after SIGTERM, the last handler
  in flight has finished; a burst worker, once drained), in the reverse order of the
  modules. One that raises is logged (``lifespan_shutdown_failed``); the others still run
  and the exit status stays what it was.
- Every lifespan of a process is entered and left in one task of its own (as uvicorn
  runs an app's lifespan), so a task group or a cancel scope opened in it stays valid.
  That task starts in the daemon's context (a ``Queue(...)`` made in a lifespan shares
  the process's backends), but a context variable set in a lifespan is not seen by the
  handlers, which run in other tasks: hand them what they need through the yield.
- A ``lifespan`` imported from another module belongs to that module (as handlers do).

In-process, :meth:`maildefer.routing.Router.lifespan` gives the same
:class:`Lifespans` that ``Server`` enters by itself and that a ``Worker`` takes as its
``lifespan`` argument; a test may also enter it around a ``Conversation``.

Example:
    >>> import asyncio, io, sys, types
    >>> from maildefer import logs; logs.configure(stream=io.StringIO())
    >>> from maildefer.settings import Settings
    >>> app = sys.modules["doc_lifespan"] = types.ModuleType("doc_lifespan")
    >>> exec('''
    ... from contextlib import asynccontextmanager
    ... @asynccontextmanager
    ... async def lifespan(settings):
    ...     print("open")
    ...     yield {"pool": "a pool"}
    ...     print("close")
    ... ''', app.__dict__)
    >>> async def demo():
    ...     async with Lifespans([("doc_lifespan", module_lifespan(app))], Settings()) as found:
    ...         print(found["doc_lifespan"]["pool"])
    >>> asyncio.run(demo())
    open
    a pool
    close
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from types import ModuleType, TracebackType
from typing import Any

import structlog

from maildefer.errors import LifespanError, RoutingError
from maildefer.logs import sanitize
from maildefer.settings import Settings

__all__ = ["LifespanHook", "Lifespans", "bind_resources", "module_lifespan", "resources"]

LifespanHook = Callable[[Settings], AbstractAsyncContextManager[Any]]
"""A module's ``lifespan``: the settings in, an async context manager out."""

LIFESPAN_ATTR = "lifespan"
"""The name a handler module gives its lifespan hook."""

_UNSET = object()
# The resources of the module whose handler runs now: a context variable, not a global,
# since many handlers of several modules run at once, each in its own task.
_CURRENT: contextvars.ContextVar[object] = contextvars.ContextVar(
    "maildefer_resources", default=_UNSET
)


def resources() -> Any:
    """What the running handler's module yielded from its ``lifespan``.

    Returns:
        The object the module's lifespan yielded (a dict, a pool, ``None``...).

    Raises:
        LookupError: not called from a handler (or a task it started) of a module with a
            lifespan, or its lifespan is not running (a router used outside serve, a
            worker or :meth:`~maildefer.routing.Router.lifespan`).

    Example:
        >>> with bind_resources({"pool": "a pool"}):
        ...     resources()["pool"]
        'a pool'
        >>> resources()
        Traceback (most recent call last):
        ...
        LookupError: resources() is for the handlers of a module whose lifespan is running
    """
    value = _CURRENT.get()
    if value is _UNSET:
        raise LookupError("resources() is for the handlers of a module whose lifespan is running")
    return value


@contextmanager
def bind_resources(value: object) -> Iterator[None]:
    """Make ``value`` what :func:`resources` returns in this context (the router does it).

    Example:
        >>> with bind_resources(42):
        ...     resources()
        42
    """
    token = _CURRENT.set(value)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def module_lifespan(module: ModuleType) -> LifespanHook | None:
    """A handler module's own ``lifespan``, checked; ``None`` if it has none.

    Raises:
        RoutingError: ``lifespan`` is not callable, is a bare async generator (not
            decorated with ``@asynccontextmanager``), or cannot take the settings as its
            one argument.

    Example:
        >>> import types
        >>> app = types.ModuleType("doc_hook")
        >>> module_lifespan(app) is None
        True
        >>> exec("async def lifespan(settings):\\n    yield", app.__dict__)
        >>> module_lifespan(app)
        Traceback (most recent call last):
        ...
        maildefer.errors.RoutingError: doc_hook.lifespan is an async generator function: ...
    """
    name = module.__name__
    hook = vars(module).get(LIFESPAN_ATTR)
    if hook is None or isinstance(hook, ModuleType):
        return None
    if not callable(hook):
        raise RoutingError(f"{name}.lifespan is not callable: {type(hook).__name__}")
    # Imported from another module: it belongs to that one (as a handler does), so a module
    # listed once runs its lifespan once.
    if getattr(hook, "__module__", name) != name:
        return None
    if inspect.isasyncgenfunction(hook) or inspect.iscoroutinefunction(hook):
        kind = "an async generator" if inspect.isasyncgenfunction(hook) else "a coroutine"
        raise RoutingError(
            f"{name}.lifespan is {kind} function: it must return an async context manager"
            " (decorate an async def with one yield with @contextlib.asynccontextmanager)"
        )
    try:
        inspect.signature(hook).bind(None)
    except TypeError as exc:
        raise RoutingError(
            f"{name}.lifespan must take the settings as its one argument: {exc}"
        ) from None
    except ValueError:
        pass  # no signature to read (a builtin): called as documented all the same
    checked: LifespanHook = hook
    return checked


class Lifespans:
    """The lifespans of some handler modules: entered in order, left in reverse, in one task.

    ``async with`` it: the body runs once every lifespan has started, with the resources
    of each module by name. Entering raises :class:`~maildefer.errors.LifespanError`
    (after logging ``lifespan_failed`` and shutting down the modules already started)
    when one fails; leaving never raises for a lifespan's shutdown (each failure is
    logged as ``lifespan_shutdown_failed``, and the others still run). With no hooks,
    it costs nothing.

    Args:
        hooks: ``(module name, lifespan)`` pairs, in the order of the setting.
        settings: what each lifespan is called with.
        resources: the mapping to fill with each module's resources while running (the
            router reads it per message); a new dict by default.

    Example:
        >>> import asyncio
        >>> from contextlib import asynccontextmanager
        >>> from maildefer.settings import Settings
        >>> def hook(name):
        ...     @asynccontextmanager
        ...     async def lifespan(settings):
        ...         print("start", name)
        ...         yield name.upper()
        ...         print("stop", name)
        ...     return lifespan
        >>> async def demo():
        ...     async with Lifespans([("a", hook("a")), ("b", hook("b"))], Settings()) as found:
        ...         print(dict(found))
        >>> asyncio.run(demo())
        start a
        start b
        {'a': 'A', 'b': 'B'}
        stop b
        stop a
    """

    def __init__(
        self,
        hooks: Sequence[tuple[str, LifespanHook]],
        settings: Settings,
        *,
        resources: dict[str, Any] | None = None,
    ) -> None:
        self.hooks = list(hooks)
        self.settings = settings
        self.resources: dict[str, Any] = {} if resources is None else resources
        self._log = structlog.get_logger("maildefer.lifespan")
        self._task: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()
        self._stop = asyncio.Event()
        self._failure: LifespanError | None = None
        self._serving = False

    @property
    def modules(self) -> list[str]:
        """The modules whose lifespans these are, in start order.

        Example:
            >>> from contextlib import nullcontext
            >>> from maildefer.settings import Settings
            >>> Lifespans([("app.handlers.db", lambda settings: nullcontext())], Settings()).modules
            ['app.handlers.db']
        """
        return [name for name, _ in self.hooks]

    async def __aenter__(self) -> Mapping[str, Any]:
        if not self.hooks:
            return self.resources
        self._settled, self._stop = asyncio.Event(), asyncio.Event()
        self._serving, self._failure = False, None
        task = asyncio.get_running_loop().create_task(self._run())
        self._task = task
        try:
            await self._settled.wait()
        except BaseException:
            # Cancelled while starting (serve() itself was): stop what started, then go.
            task.cancel()
            await asyncio.wait([task])
            self._task = None
            raise
        if not self._serving:
            # A startup failed: wait for the modules already started to shut down.
            await asyncio.wait([task])
            self._task = None
            if self._failure is not None:
                raise self._failure
            task.result()  # a cancellation or SystemExit raised in a hook: re-raised
        return self.resources

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        await asyncio.wait([task])

    async def _run(self) -> None:
        """Start each lifespan, wait for the stop, shut them down in reverse order."""
        started: list[tuple[str, AbstractAsyncContextManager[Any]]] = []
        try:
            for name, hook in self.hooks:
                try:
                    manager = _manager(name, hook(self.settings))
                    value = await manager.__aenter__()
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    # The one line a failed start leaves (the CLI then exits 1 quietly).
                    self._log.error("lifespan_failed", module=name, error=sanitize(error, 500))
                    self._failure = LifespanError(name, error)
                    return
                started.append((name, manager))
                self.resources[name] = value
            self._serving = True
            self._settled.set()
            await self._stop.wait()
        finally:
            self._settled.set()
            for name, manager in reversed(started):
                self.resources.pop(name, None)
                try:
                    await manager.__aexit__(None, None, None)
                except Exception as exc:
                    # Logged, not raised: the other modules still close theirs, and the
                    # exit status says how serving went, not how a close did.
                    self._log.error(
                        "lifespan_shutdown_failed",
                        module=name,
                        error=sanitize(f"{type(exc).__name__}: {exc}", 500),
                    )


def _manager(module: str, made: object) -> AbstractAsyncContextManager[Any]:
    """What a lifespan returned, if it is an async context manager."""
    # The ABC's subclass hook accepts anything with __aenter__ and __aexit__.
    if isinstance(made, AbstractAsyncContextManager):
        return made
    close = getattr(made, "close", None)
    if inspect.iscoroutine(made) and close is not None:
        close()  # never awaited: no "coroutine was never awaited" warning on top
    raise TypeError(
        f"{module}.lifespan(settings) returned {type(made).__name__}, not an async context manager"
    )
