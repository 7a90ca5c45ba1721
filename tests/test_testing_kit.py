"""The test kit: maildefer.testing as a pytest plugin (contract §7).

The plugin is loaded here through its pytest11 entry point (maildefer is installed in the
venv), and the project is this repository's example (config/settings.toml at the root).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from maildefer.mail import MailResponse
from maildefer.routing import Router
from maildefer.settings import Settings
from maildefer.testing import RouterConversation, plugin
from maildefer.testing.kit import CapturedRelay, TestQueues, TestServer

Conversations = Callable[[str], RouterConversation]
ROOT = Path(__file__).resolve().parent.parent


def test_the_plugin_is_registered_and_loaded(request: pytest.FixtureRequest) -> None:
    points = [e for e in importlib.metadata.entry_points(group="pytest11") if e.name == "maildefer"]
    assert [e.value for e in points] == ["maildefer.testing.plugin"]
    assert request.config.pluginmanager.get_plugin("maildefer") is plugin


def test_every_fixture_is_prefixed() -> None:
    # pytest's FixtureFunctionDefinition (8.4+) or the marked function: either way the
    # module's fixtures are what the plugin manager collected from it.
    names = {n for n, v in vars(plugin).items() if type(v).__name__.startswith("Fixture")}
    names |= {n for n, v in vars(plugin).items() if hasattr(v, "_pytestfixturefunction")}
    assert names >= {
        "maildefer_settings",
        "maildefer_router",
        "maildefer_conversation",
        "maildefer_relay",
        "maildefer_queues",
        "maildefer_serve",
    }
    assert all(n.startswith("maildefer_") for n in names), sorted(names)


def test_importing_the_plugin_loads_nothing_heavy() -> None:
    code = (
        "import sys, maildefer; before = set(sys.modules)\n"
        "import maildefer.testing.plugin\n"
        "print(sorted(m for m in set(sys.modules) - before if m.startswith('maildefer')))\n"
        "print(any(m.startswith('aiosmtpd') for m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split("\n")[:2] == [
        "['maildefer.testing', 'maildefer.testing.plugin']",
        "False",
    ]


def test_settings_move_the_queues_into_tmp_path(
    maildefer_settings: Settings, tmp_path: Path
) -> None:
    assert maildefer_settings.root == ROOT
    assert maildefer_settings.server.handlers == ["app.handlers.posting"]
    assert maildefer_settings.server.port == 0
    assert maildefer_settings.queues["posts"].path == str(tmp_path / "run/posts")
    assert maildefer_settings.undeliverable.path == str(tmp_path / "run/undeliverable")
    assert Path.cwd() == tmp_path


async def test_a_conversation_pushes_and_moves_state(
    maildefer_conversation: Conversations,
    maildefer_queues: TestQueues,
    maildefer_router: Router,
    tmp_path: Path,
) -> None:
    assert maildefer_router.state.__class__.__name__ == "MemoryStateStore"
    ann = maildefer_conversation("ann@writers.org")
    assert await ann.say("hello@example.com", "First", "one\n") == 1
    await ann.say("hello@example.com", "Second", "two\n")
    posts = await maildefer_queues.pushed("posts")
    assert [m["Subject"] for m in posts] == ["First", "Second"]
    assert posts[0].body().strip() == "one"
    assert [m.raw for m in await maildefer_queues.pushed("run/posts")] == [m.raw for m in posts]
    assert len(await maildefer_queues.pushed("outbox")) == 2
    assert await ann.state("app.handlers.posting") == "POSTING"
    # Pushed into this test's directory, not the project's.
    assert any((tmp_path / "run/posts/new").iterdir())


async def test_the_relay_captures_with_the_envelope(maildefer_relay: CapturedRelay) -> None:
    from maildefer import relay

    await relay.deliver(
        MailResponse(To="a@x.org", From="me@y.org", Subject="One", Bcc="hidden@z.org")
    )
    await relay.deliver(MailResponse(To="b@x.org", From="me@y.org", Subject="Two"))
    assert [m["Subject"] for m in maildefer_relay.delivered(to="A@x.org")] == ["One"]
    assert [m["Subject"] for m in maildefer_relay.delivered(to="hidden@z.org")] == ["One"]
    assert maildefer_relay.delivered(to="b@x.org", subject="One") == []
    assert len(maildefer_relay.delivered()) == 2
    assert maildefer_relay.messages[0].mail_from == "me@y.org"


async def test_run_drains_a_queue_with_its_handlers(
    maildefer_conversation: Conversations, maildefer_queues: TestQueues, tmp_path: Path
) -> None:
    await maildefer_conversation("ann@writers.org").say("hello@example.com", "Indexed")
    stats = await maildefer_queues.run("run/posts")  # by path, as the handler names it
    assert (stats.handled, stats.failed, stats.buried) == (1, 0, 0)
    assert (tmp_path / "run/posts.index").read_text().endswith("\tann@writers.org\tIndexed\n")
    assert await maildefer_queues.pushed("posts") == []


async def test_run_retries_at_once_then_buries(
    maildefer_conversation: Conversations,
    maildefer_queues: TestQueues,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.handlers import index

    calls: list[str] = []

    def broken(path: Path, line: str) -> None:
        calls.append(line)
        raise OSError("disk full")

    monkeypatch.setattr(index, "_append", broken)
    await maildefer_conversation("ann@writers.org").say("hello@example.com", "Doomed")
    stats = await maildefer_queues.run("posts")
    # [queues.posts] max_attempts = 5 and retry_delay = 30 s: all five ran in this call.
    assert (stats.failed, stats.retried, stats.buried, stats.handled) == (5, 4, 1, 0)
    assert len(calls) == 5
    assert await maildefer_queues.buried() == 1
    assert await maildefer_queues.pushed("posts") == []


async def test_the_outbox_relays_through_the_captured_relay(
    maildefer_conversation: Conversations,
    maildefer_queues: TestQueues,
    maildefer_relay: CapturedRelay,
) -> None:
    await maildefer_conversation("ann@writers.org").say("hello@example.com", "Hi there")
    assert (await maildefer_queues.run("outbox")).handled == 1
    [sent] = maildefer_relay.delivered(to="ann@writers.org", subject="Re: Hi there")
    assert sent.mail_from == "noreply@example.com"


async def test_serve_answers_over_real_smtp(
    maildefer_serve: TestServer, maildefer_queues: TestQueues
) -> None:
    assert maildefer_serve.port > 0
    assert await maildefer_serve.send("hello@example.com", "By SMTP") == 250
    assert await maildefer_serve.send("hello@elsewhere.org") == 550
    assert [m["Subject"] for m in await maildefer_queues.pushed("posts")] == ["By SMTP"]


async def test_a_handler_exception_gives_451(
    maildefer_serve: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.handlers import posting

    async def broken(*args: object) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(posting, "defer", broken)
    assert await maildefer_serve.send("hello@example.com") == 451


def test_router_conversation_says_the_subject_first() -> None:
    params = list(inspect.signature(RouterConversation.say).parameters)
    assert params[:4] == ["self", "to", "subject", "body"]
