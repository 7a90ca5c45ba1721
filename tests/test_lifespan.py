"""Handler modules' ``lifespan`` hooks in process: ``Server``/``Worker.serve()``, order,
failures, ``resources()`` and the checks on the hook itself.

The same through real ``serve``/``worker`` processes: test_lifespan_daemons.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiosmtplib
import pytest
from helpers.smtp_server import make_settings

from maildefer import MailRequest, resources
from maildefer.errors import ConfigError, LifespanError, RoutingError
from maildefer.lifespan import LifespanHook, Lifespans
from maildefer.queue.maildir import MaildirQueue
from maildefer.routing import Router
from maildefer.settings import Settings
from maildefer.smtp.server import Server
from maildefer.worker import Worker

MSG = b"From: a@b.org\r\nTo: u@example.com\r\nSubject: one\r\n\r\nbody\r\n"

MakeModule = Callable[[str], str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeModule]:
    """Write a handler module under tmp_path; returns its importable name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def make(source: str) -> str:
        name = f"lifespan_mod_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


# EVENTS is the module's own record of what happened, in order.
TRACKED = """
import asyncio
from contextlib import asynccontextmanager
from maildefer import resources, route, stateless

EVENTS = []
FAIL = {}

@asynccontextmanager
async def lifespan(settings):
    EVENTS.append(("startup", settings.root.name, id(asyncio.current_task())))
    if FAIL.get("startup"):
        raise OSError(FAIL["startup"])
    resource = {"open": True}
    try:
        yield resource
    finally:
        resource["open"] = False
        EVENTS.append(("shutdown", id(asyncio.current_task())))
        if FAIL.get("shutdown"):
            raise RuntimeError(FAIL["shutdown"])

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    EVENTS.append(("handled", name, resources()["open"]))
"""


async def test_server_in_process_runs_lifespans_around_serving(
    tmp_path: Path, make_module: MakeModule
) -> None:
    name = make_module(TRACKED)
    server = Server(make_settings(tmp_path, name))
    await server.start()
    events = sys.modules[name].EVENTS
    assert [e[0] for e in events] == ["startup"]
    assert events[0][1] == tmp_path.name  # called with the settings
    await aiosmtplib.send(
        MSG, sender="a@b.org", hostname="127.0.0.1", port=server.port, recipients=["u@example.com"]
    )
    assert events[-1] == ("handled", "u", True)
    # Shut down from another task than the one that started it (a test, a signal handler).
    await asyncio.create_task(server.shutdown())
    assert [e[0] for e in events] == ["startup", "handled", "shutdown"]
    # Entered and left in one task (a task group or cancel scope opened there stays valid).
    assert events[0][2] == events[2][1]


async def test_server_in_process_startup_failure_raises_and_binds_nothing(
    tmp_path: Path, make_module: MakeModule
) -> None:
    name = make_module(TRACKED)
    port = free_port()
    __import__(name)
    sys.modules[name].FAIL["startup"] = "no database"
    server = Server(make_settings(tmp_path, name, port=port))
    with pytest.raises(LifespanError, match=f"lifespan of {name} failed: OSError: no database"):
        await server.serve()
    assert server.port is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_worker_in_process_runs_the_lifespan_before_the_first_and_after_the_last(
    tmp_path: Path, make_module: MakeModule
) -> None:
    name = make_module(TRACKED)
    router = Router.from_modules([name])
    queue = MaildirQueue(tmp_path / "q")
    for _ in range(3):
        await queue.push(MailRequest(MSG, mail_from="a@b.org", rcpt_tos=["u@example.com"]))
    events = sys.modules[name].EVENTS
    worker = Worker(queue, router.deliver, burst=True, lifespan=router.lifespan(Settings()))
    stats = await worker.serve()
    assert stats.handled == 3
    assert [e[0] for e in events] == ["startup", "handled", "handled", "handled", "shutdown"]
    assert all(e[2] is True for e in events if e[0] == "handled")


async def test_worker_in_process_startup_failure_claims_nothing(
    tmp_path: Path, make_module: MakeModule
) -> None:
    name = make_module(TRACKED)
    router = Router.from_modules([name])
    sys.modules[name].FAIL["startup"] = "no database"
    queue = MaildirQueue(tmp_path / "q")
    await queue.push(MailRequest(MSG, mail_from="a@b.org", rcpt_tos=["u@example.com"]))
    worker = Worker(queue, router.deliver, burst=True, lifespan=router.lifespan(Settings()))
    with pytest.raises(LifespanError, match="OSError: no database"):
        await worker.serve()
    assert len(list(queue.dir("new").iterdir())) == 1
    assert not worker.ready.is_set()


async def test_a_failed_start_shuts_down_the_modules_already_started(
    make_module: MakeModule,
) -> None:
    first, second, third = (make_module(TRACKED) for _ in range(3))
    router = Router.from_modules([first, second, third])
    events = {n: sys.modules[n].EVENTS for n in (first, second, third)}
    sys.modules[third].FAIL["startup"] = "down"
    with pytest.raises(LifespanError) as caught:
        async with router.lifespan(Settings()):
            raise AssertionError("the body must not run")
    assert caught.value.module == third
    assert [e[0] for e in events[first]] == ["startup", "shutdown"]
    assert [e[0] for e in events[second]] == ["startup", "shutdown"]
    assert [e[0] for e in events[third]] == ["startup"]


async def test_shutdown_runs_in_reverse_order_and_past_a_failure() -> None:
    order: list[str] = []

    def hook(name: str, fail: bool = False) -> LifespanHook:
        @contextlib.asynccontextmanager
        async def lifespan(settings: Settings) -> AsyncIterator[str]:
            order.append(f"start {name}")
            yield name
            order.append(f"stop {name}")
            if fail:
                raise RuntimeError(f"{name} did not close")

        return lifespan

    lifespans = Lifespans(
        [("a", hook("a")), ("b", hook("b", fail=True)), ("c", hook("c"))], Settings()
    )
    async with lifespans as found:
        assert dict(found) == {"a": "a", "b": "b", "c": "c"}
    assert order == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]
    assert dict(lifespans.resources) == {}  # nothing left to reach once shut down


async def test_a_handler_without_a_running_lifespan_cannot_reach_resources(
    make_module: MakeModule,
) -> None:
    with pytest.raises(LookupError):
        resources()
    name = make_module(TRACKED)
    router = Router.from_modules([name])
    # The lifespan is not entered: the handler's resources() raises, the message fails.
    with pytest.raises(LookupError, match="lifespan is running"):
        await router.deliver(MailRequest(b"\n", rcpt_tos=["u@example.com"]))
    plain = make_module(
        """
        from maildefer import resources, route, stateless
        SEEN = []
        @route("(name)@(host)")
        @stateless
        async def START(message, name, host):
            try:
                SEEN.append(resources())
            except LookupError as exc:
                SEEN.append(str(exc))
        """
    )
    both = Router.from_modules([name, plain])
    async with both.lifespan(Settings()):
        await both.deliver(MailRequest(b"\n", rcpt_tos=["u@example.com"]))
    # The module without a lifespan does not see the other module's resources.
    assert sys.modules[plain].SEEN == [
        "resources() is for the handlers of a module whose lifespan is running"
    ]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("lifespan = 30", "is not callable: int"),
        ("async def lifespan(settings):\n    yield", "is an async generator function"),
        ("async def lifespan(settings):\n    return None", "is a coroutine function"),
        (
            "from contextlib import asynccontextmanager\n"
            "@asynccontextmanager\nasync def lifespan():\n    yield",
            "must take the settings as its one argument",
        ),
    ],
)
def test_a_lifespan_that_is_not_a_hook_is_refused_at_load(
    make_module: MakeModule, tmp_path: Path, source: str, message: str
) -> None:
    handler = '\nfrom maildefer import route\n@route("(a)@x")\nasync def START(message, a): ...\n'
    name = make_module(source + "\n" + handler)
    with pytest.raises(RoutingError, match=message):
        Router.from_modules([name])
    with pytest.raises(ConfigError, match=f"server.handlers: {name}.lifespan"):
        asyncio.run(Server(make_settings(tmp_path, name)).start())


async def test_a_lifespan_returning_no_context_manager_fails_the_start(
    make_module: MakeModule,
) -> None:
    name = make_module(
        'def lifespan(settings):\n    return "a pool"\n'
        'from maildefer import route\n@route("(a)@x")\nasync def START(message, a): ...\n'
    )
    router = Router.from_modules([name])
    with pytest.raises(LifespanError, match="returned str, not an async context manager"):
        async with router.lifespan(Settings()):
            pass


def test_an_imported_lifespan_belongs_to_its_own_module(make_module: MakeModule) -> None:
    owner = make_module(TRACKED)
    importer = make_module(
        f"from {owner} import lifespan\n"
        'from maildefer import route\n@route("(a)@y")\nasync def START(message, a): ...\n'
    )
    events = __import__(owner).EVENTS

    async def run(modules: list[str]) -> list[str]:
        events.clear()
        async with Router.from_modules(modules).lifespan(Settings()) as found:
            started = sorted(found)
        return started

    assert asyncio.run(run([importer])) == []
    assert asyncio.run(run([owner, importer])) == [owner]
    assert [e[0] for e in events] == ["startup", "shutdown"]  # once, for its owner
