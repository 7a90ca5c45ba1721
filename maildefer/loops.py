"""The event loop a daemon runs on: stdlib asyncio, uvloop, or uvloop when installed.

Also the few task chores both daemons' shutdowns share (:func:`cancel_and_wait`,
:func:`task_failure`, :func:`aclose`).

``serve`` and ``worker`` run their coroutine through :func:`run`, which picks the loop named by
``[runtime] loop`` (or ``--loop``), as uvicorn's ``--loop auto|asyncio|uvloop``:

- ``"asyncio"``: the stdlib loop, exactly what ``asyncio.run`` gives;
- ``"uvloop"``: uvloop (libuv); a :class:`~maildefer.errors.ConfigError` when it is not
  installed (``pip install 'maildefer[uvloop]'``);
- ``"auto"`` (the default): uvloop when it can be imported, else the stdlib loop.

uvloop is imported only when chosen, at run time: importing this module (or running
``maildefer --help``) never loads it and never changes the process's event loop policy.

Example:
    >>> async def main() -> str:
    ...     return "done"
    >>> run(main(), "asyncio")
    'done'
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Literal, TypeVar, get_args

from maildefer.errors import ConfigError

LoopName = Literal["auto", "asyncio", "uvloop"]
"""The values of ``[runtime] loop`` and ``--loop``."""

LOOP_NAMES: tuple[str, ...] = get_args(LoopName)
"""``("auto", "asyncio", "uvloop")``, the choices of ``--loop`` (:mod:`maildefer.cli.options`)."""

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

_T = TypeVar("_T")

_MISSING = (
    "runtime.loop = 'uvloop' (or --loop uvloop): uvloop is not installed "
    "(pip install 'maildefer[uvloop]', or set loop = \"asyncio\")"
)


def running_loop_name() -> str:
    """Which loop runs the calling coroutine: ``"uvloop"`` or ``"asyncio"`` (for the logs).

    Example:
        >>> async def main() -> str:
        ...     return running_loop_name()
        >>> run(main(), "asyncio")
        'asyncio'
    """
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def loop_factory(name: str) -> LoopFactory | None:
    """The factory of the event loop ``name`` chooses; ``None`` is the stdlib default.

    ``None`` (rather than ``asyncio.new_event_loop``) keeps ``"asyncio"`` identical to
    ``asyncio.run``: the runner then also installs the loop as the thread's current loop.

    Args:
        name: ``"auto"``, ``"asyncio"`` or ``"uvloop"``.

    Raises:
        ConfigError: ``"uvloop"`` without uvloop installed, or an unknown name (one line,
            naming the setting).

    Example:
        >>> loop_factory("asyncio") is None
        True
        >>> loop_factory("tokio")
        Traceback (most recent call last):
        ...
        maildefer.errors.ConfigError: runtime.loop = 'tokio': expected one of auto, asyncio, uvloop
    """
    if name == "asyncio":
        return None
    if name not in LOOP_NAMES:
        raise ConfigError(f"runtime.loop = {name!r}: expected one of {', '.join(LOOP_NAMES)}")
    try:
        # importlib, not `import uvloop`: the module is optional and untyped for mypy.
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if name == "auto":
            return None
        raise ConfigError(_MISSING) from None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, _T], loop: str = "asyncio") -> _T:
    """Run ``main`` to completion on a new event loop of the kind ``loop`` names.

    Like ``asyncio.run`` (``asyncio.Runner``): the loop is closed afterwards, after its
    async generators and default executor are shut down.

    Args:
        main: the coroutine to run.
        loop: ``"auto"``, ``"asyncio"`` or ``"uvloop"``.

    Returns:
        What ``main`` returns.

    Raises:
        ConfigError: the loop cannot be had (see :func:`loop_factory`); ``main`` is closed
            unstarted, so no "never awaited" warning follows.

    Example:
        >>> async def kind() -> str:
        ...     return type(asyncio.get_running_loop()).__module__
        >>> run(kind(), "asyncio").startswith("asyncio")
        True
    """
    try:
        factory = loop_factory(loop)
    except ConfigError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a task (unless it is done) and wait until it is; its outcome is not raised.

    Example:
        >>> async def main() -> bool:
        ...     task = asyncio.get_running_loop().create_task(asyncio.sleep(60))
        ...     await cancel_and_wait(task)
        ...     return task.cancelled()
        >>> run(main())
        True
    """
    if not task.done():
        task.cancel()
    await asyncio.wait([task])


def task_failure(task: asyncio.Task[Any]) -> BaseException | None:
    """The exception a finished task ended with (``None`` if cancelled, fine or not done).

    Example:
        >>> async def main() -> str:
        ...     async def fail() -> None:
        ...         raise OSError("disk")
        ...     task = asyncio.get_running_loop().create_task(fail())
        ...     await asyncio.wait([task])
        ...     return repr(task_failure(task))
        >>> run(main())
        "OSError('disk')"
    """
    if not task.done() or task.cancelled():
        return None
    return task.exception()


async def aclose(iterator: AsyncIterator[Any]) -> None:
    """Close an async iterator that can be closed (an async generator); others are left.

    Example:
        >>> async def main() -> list[int]:
        ...     async def numbers():
        ...         yield 1
        ...         yield 2
        ...     it = numbers()
        ...     first = await anext(it)
        ...     await aclose(it)
        ...     return [first, *[n async for n in it]]
        >>> run(main())
        [1]
    """
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()
