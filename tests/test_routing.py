"""The router: patterns, groups, state functions, locks, errors; handler modules are real files."""

from __future__ import annotations

import asyncio
import itertools
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import structlog
import structlog.testing

from maildefer import MailRequest, Router, SMTPError, route, route_like, stateless
from maildefer.errors import NoRouteError, RoutingError
from maildefer.state import MemoryStateStore

_COUNTER = itertools.count()

MakeModule = Callable[[str], str]


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeModule]:
    """Write a handler module to a file under tmp_path; returns its importable name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def make(source: str) -> str:
        name = f"handlers_{next(_COUNTER)}"
        header = "from maildefer import route, route_like, stateless, SMTPError\nCALLS = []\n"
        (tmp_path / f"{name}.py").write_text(header + textwrap.dedent(source))
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


def calls(name: str) -> list[object]:
    module: ModuleType = sys.modules[name]
    result: list[object] = module.CALLS
    return result


def mail(rcpt: str, sender: str = "ann@writers.org", subject: str = "hi") -> MailRequest:
    raw = f"From: {sender}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()
    return MailRequest(raw, mail_from=sender, rcpt_tos=[rcpt])


BLOG = """
@route("post-(name)@(host)")
async def START(message, name, host):
    CALLS.append(("START", name, host, message.mail_from))
    return POSTING

@route_like(START)
async def POSTING(message, name, host):
    CALLS.append(("POSTING", name, host, message.mail_from))
    return POSTING
"""


async def test_groups_become_keyword_arguments(make_module: MakeModule) -> None:
    name = make_module(BLOG)
    router = Router.from_modules([name])
    assert await router.deliver(mail("post-news@example.com")) == 1
    assert calls(name) == [("START", "news", "example.com", "ann@writers.org")]


async def test_defaults_give_group_regexes(make_module: MakeModule) -> None:
    name = make_module(BLOG)
    strict = Router.from_modules([name], defaults={"host": r"example\.com"})
    loose = Router.from_modules([name])
    assert strict.match("post-a@example.com")
    assert strict.match("post-a@example.org") == []
    assert strict.match("post-a@sub.example.com") == []  # anchored on the whole address
    assert loose.match("post-a@example.org")  # no default: ".+"
    assert strict.routes()[0].regex.pattern == r"post-(?P<name>.+)@(?P<host>example\.com)"


async def test_route_group_regex_overrides_defaults(make_module: MakeModule) -> None:
    name = make_module(
        """
        @route("(user)@(host)", user="[a-z]+", host="lists\\\\.org")
        @stateless
        def START(message, user, host):
            CALLS.append(user)
        """
    )
    router = Router.from_modules([name], defaults={"user": ".+", "host": r"example\.com"})
    assert router.match("abc@lists.org")
    assert router.match("abc1@lists.org") == []
    assert router.match("abc@example.com") == []


async def test_matching_is_case_insensitive_and_keeps_case(make_module: MakeModule) -> None:
    name = make_module(BLOG)
    router = Router.from_modules([name], defaults={"host": r"example\.com"})
    assert await router.deliver(mail("POST-News@EXAMPLE.com")) == 1
    assert calls(name)[0][1:3] == ("News", "EXAMPLE.com")


async def test_no_match_is_empty_and_deliver_raises(make_module: MakeModule) -> None:
    name = make_module(BLOG)
    router = Router.from_modules([name])
    assert router.match("someone@example.com") == []
    with pytest.raises(NoRouteError) as info:
        await router.deliver(mail("someone@example.com"))
    assert isinstance(info.value, RoutingError)
    assert calls(name) == []


async def test_state_moves_from_start_to_posting(make_module: MakeModule) -> None:
    name = make_module(BLOG)
    store = MemoryStateStore()
    router = Router.from_modules([name], state=store)
    for _ in range(3):
        await router.deliver(mail("post-a@example.com"))
    assert [c[0] for c in calls(name)] == ["START", "POSTING", "POSTING"]
    assert store.states == {f"{name}:ann@writers.org": "POSTING"}


async def test_state_is_per_sender(make_module: MakeModule) -> None:
    name = make_module(BLOG)
    router = Router.from_modules([name])
    await router.deliver(mail("post-a@example.com", sender="ann@x.org"))
    await router.deliver(mail("post-a@example.com", sender="bob@x.org"))
    await router.deliver(mail("post-a@example.com", sender="ANN@x.org"))  # same sender
    assert [(c[0], c[3]) for c in calls(name)] == [
        ("START", "ann@x.org"),
        ("START", "bob@x.org"),
        ("POSTING", "ANN@x.org"),
    ]


async def test_stateless_handler_runs_every_time_beside_the_state(
    make_module: MakeModule,
) -> None:
    name = make_module(
        BLOG
        + """
@route_like(START)
@stateless
async def ARCHIVE(message, name, host):
    CALLS.append(("ARCHIVE",))
    return START  # ignored: stateless handlers have no state
"""
    )
    store = MemoryStateStore()
    router = Router.from_modules([name], state=store)
    assert [await router.deliver(mail("post-a@example.com")) for _ in range(3)] == [2, 2, 2]
    assert [c[0] for c in calls(name)] == [
        "ARCHIVE",
        "START",
        "ARCHIVE",
        "POSTING",
        "ARCHIVE",
        "POSTING",
    ]
    assert store.states == {f"{name}:ann@writers.org": "POSTING"}


async def test_a_raising_handler_does_not_trap_the_sender(make_module: MakeModule) -> None:
    name = make_module(
        """
        FAIL = [True]

        @route("(name)@(host)")
        async def START(message, name, host):
            CALLS.append("START")
            if FAIL.pop() if FAIL else False:
                raise RuntimeError("disk on fire")
            return POSTING

        @route_like(START)
        async def POSTING(message, name, host):
            CALLS.append("POSTING")
        """
    )
    store = MemoryStateStore()
    router = Router.from_modules([name], state=store)
    # capture_logs keeps the configured wrapper class: a level filter left by an earlier
    # test (a doctest configures "error") would drop the warning before it is captured.
    saved = structlog.get_config()
    structlog.reset_defaults()
    try:
        with (
            structlog.testing.capture_logs() as logs,
            pytest.raises(RuntimeError, match="on fire"),
        ):
            await router.deliver(mail("a@example.com"))
    finally:
        structlog.configure(**saved)
    assert store.states == {}  # still START, no ERROR state
    assert any(e["event"] == "handler failed, state kept" for e in logs)
    await router.deliver(mail("a@example.com"))
    await router.deliver(mail("a@example.com"))
    assert calls(name) == ["START", "START", "POSTING"]


async def test_smtp_error_propagates_unchanged(make_module: MakeModule) -> None:
    name = make_module(
        """
        @route("(name)@(host)")
        async def START(message, name, host):
            raise SMTPError(550, "5.7.1 no thanks")
        """
    )
    router = Router.from_modules([name])
    with pytest.raises(SMTPError) as info:
        await router.deliver(mail("a@example.com"))
    assert info.value.reply == "550 5.7.1 no thanks"


async def test_sync_handlers_are_called(make_module: MakeModule) -> None:
    name = make_module(
        """
        @route("(name)@(host)")
        def START(message, name, host):
            CALLS.append("START")
            return POSTING

        @route_like(START)
        def POSTING(message, name, host):
            CALLS.append("POSTING")
        """
    )
    router = Router.from_modules([name])
    for _ in range(3):
        await router.deliver(mail("a@example.com"))
    assert calls(name) == ["START", "POSTING", "POSTING"]


async def test_returning_none_keeps_the_state(make_module: MakeModule) -> None:
    name = make_module(
        """
        @route("(name)@(host)")
        async def START(message, name, host):
            CALLS.append("START")
            if name == "go":
                return CONFIRMED

        @route_like(START)
        async def CONFIRMED(message, name, host):
            CALLS.append("CONFIRMED")
        """
    )
    router = Router.from_modules([name])
    for rcpt in ("wait@x.org", "wait@x.org", "go@x.org", "wait@x.org", "wait@x.org"):
        await router.deliver(mail(rcpt))
    assert calls(name) == ["START", "START", "START", "CONFIRMED", "CONFIRMED"]


async def test_state_function_without_route_uses_the_route_of_start(
    make_module: MakeModule,
) -> None:
    name = make_module(
        """
        @route("(name)@(host)")
        async def START(message, name, host):
            CALLS.append(("START", name))
            return POSTING

        async def POSTING(message, name, host):
            CALLS.append(("POSTING", name))
        """
    )
    router = Router.from_modules([name])
    assert [r.handler_names for r in router.routes()] == [("START",)]
    await router.deliver(mail("a@example.com"))
    await router.deliver(mail("b@example.com"))
    assert calls(name) == [("START", "a"), ("POSTING", "b")]


async def test_state_whose_route_does_not_match_is_no_route(make_module: MakeModule) -> None:
    name = make_module(
        """
        @route("(list)@(host)")
        async def START(message, list, host):
            CALLS.append("START")
            return CONFIRMING

        @route("(list)-confirm-(id)@(host)", id="[0-9]+")
        async def CONFIRMING(message, list, id, host):
            CALLS.append(("CONFIRMING", id))
            return START
        """
    )
    router = Router.from_modules([name])
    await router.deliver(mail("news@x.org"))
    # Waiting for the confirmation: nothing handles it, so it is not "delivered".
    with pytest.raises(NoRouteError, match="in the state of sender"):
        await router.deliver(mail("news@x.org"))
    assert await router.deliver(mail("news-confirm-42@x.org")) == 1
    assert await router.deliver(mail("news@x.org")) == 1
    assert calls(name) == ["START", ("CONFIRMING", "42"), "START"]


async def test_unknown_stored_state_falls_back_to_start(make_module: MakeModule) -> None:
    name = make_module(BLOG)
    store = MemoryStateStore()
    store.states[f"{name}:ann@writers.org"] = "REMOVED_IN_V2"
    router = Router.from_modules([name], state=store)
    await router.deliver(mail("post-a@example.com"))
    assert [c[0] for c in calls(name)] == ["START"]
    assert store.states[f"{name}:ann@writers.org"] == "POSTING"


SLOW = """
import asyncio
GATE = asyncio.Event()
ENTERED = []

@route("(name)@(host)", name="[a-z]+")
async def START(message, name, host):
    ENTERED.append(("START", message.mail_from))
    await GATE.wait()
    return POSTING

@route_like(START)
async def POSTING(message, name, host):
    ENTERED.append(("POSTING", message.mail_from))

@route("log-(name)@(host)")
@stateless
async def LOG(message, name, host):
    ENTERED.append(("LOG", message.mail_from))
    await GATE.wait()
"""


async def _until(predicate: Callable[[], bool], turns: int = 10_000) -> None:
    """Let other tasks run until ``predicate()`` holds (bounded: fails instead of hanging)."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def test_stateful_handlers_of_one_sender_run_one_at_a_time(
    make_module: MakeModule,
) -> None:
    name = make_module(SLOW)
    router = Router.from_modules([name])
    module = sys.modules[name]
    first = asyncio.create_task(router.deliver(mail("a@x.org", sender="ann@x.org")))
    second = asyncio.create_task(router.deliver(mail("a@x.org", sender="ann@x.org")))
    other = asyncio.create_task(router.deliver(mail("a@x.org", sender="bob@x.org")))
    # Bob is not held up by Ann's lock; Ann's second message waits for her first.
    await _until(lambda: len(module.ENTERED) == 2)
    for _ in range(20):
        await asyncio.sleep(0)
    assert sorted(module.ENTERED) == [("START", "ann@x.org"), ("START", "bob@x.org")]
    module.GATE.set()
    await asyncio.gather(first, second, other)
    # The second message saw the state the first one set.
    assert module.ENTERED[-1] == ("POSTING", "ann@x.org")
    assert len(router._locks) == 0  # no lock left behind per sender


async def test_stateless_handlers_run_concurrently(make_module: MakeModule) -> None:
    name = make_module(SLOW)
    router = Router.from_modules([name])
    module = sys.modules[name]
    tasks = [
        asyncio.create_task(router.deliver(mail("log-a@x.org", sender="ann@x.org")))
        for _ in range(3)
    ]
    await _until(lambda: len(module.ENTERED) == 3)  # all inside the handler at once
    module.GATE.set()
    assert await asyncio.gather(*tasks) == [1, 1, 1]


async def test_two_routers_do_not_interfere(make_module: MakeModule) -> None:
    blog = make_module(BLOG)
    other = make_module(
        """
        @route("(name)@other\\\\.org")
        @stateless
        async def START(message, name):
            CALLS.append(name)
        """
    )
    one = Router.from_modules([blog])
    two = Router.from_modules([blog, other])
    await one.deliver(mail("post-a@x.org"))
    await two.deliver(mail("post-a@x.org"))  # its own state: START again
    assert [c[0] for c in calls(blog)] == ["START", "START"]
    assert one.match("z@other.org") == []
    assert two.match("z@other.org")
    assert [r.module for r in one.routes()] == [blog]


async def test_decorators_only_attach_metadata() -> None:
    async def handler(message: MailRequest, name: str) -> None: ...

    assert route("(name)@x")(handler) is handler
    assert stateless(handler) is handler
    assert route_like(handler)(handler) is handler
    assert handler._maildefer_routes == (("(name)@x", {}), ("(name)@x", {}))  # type: ignore[attr-defined]
    with pytest.raises(RoutingError):
        route_like(mail)


async def test_bad_module_name_is_a_routing_error() -> None:
    with pytest.raises(RoutingError, match="no_such_handlers_module"):
        Router.from_modules(["no_such_handlers_module"])


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ('@route("(name@(host)")\ndef START(m, name, host): pass\n', "not a valid regex"),
        ('@route("(a)@x", b="y")\ndef START(m, a): pass\n', "no group named 'b'"),
        ('@route("(a)@(host)")\ndef START(m, a): pass\n', "cannot take the groups"),
        ('@route("(a)@x")\ndef POSTING(m, a): pass\n', "no START"),
        ("def START(m): pass\n", "defines no @route"),
        ("raise ImportError('broken dependency')\n", "broken dependency"),
    ],
)
async def test_bad_handler_module_is_a_routing_error(
    make_module: MakeModule, source: str, message: str
) -> None:
    name = make_module(source)
    with pytest.raises(RoutingError, match=message):
        Router.from_modules([name])


async def test_imported_handlers_belong_to_their_own_module(make_module: MakeModule) -> None:
    blog = make_module(BLOG)
    user = make_module(
        f"""
        from {blog} import START as BLOG_START

        @route("(name)@(host)")
        @stateless
        async def START(message, name, host):
            CALLS.append(name)
        """
    )
    router = Router.from_modules([user])
    assert [(r.module, r.handler_names) for r in router.routes()] == [(user, ("START",))]


async def test_testing_conversation_follows_the_state(make_module: MakeModule) -> None:
    from maildefer.testing import Conversation

    name = make_module(BLOG)
    router = Router.from_modules([name])
    ann, bob = Conversation(router, "ann@x.org"), Conversation(router, "bob@x.org")
    assert await ann.say("post-a@example.com", subject="one", X_Tag="t") == 1
    assert await ann.state(name) == "POSTING"
    assert await bob.state(name) == "START"
    assert ann.sent[0]["Subject"] == "one"
    assert ann.sent[0]["Message-ID"] is not None
    with pytest.raises(NoRouteError):
        await bob.say("nobody@example.com")
