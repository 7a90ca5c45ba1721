"""Replies deferred to run/outbox and relayed by a worker through [relay]."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from maildefer import MailRequest, Queue, Router
from maildefer.relay import Relay
from maildefer.settings import load_settings
from maildefer.state import MemoryStateStore

ROOT = Path(__file__).resolve().parent.parent


class Sink:
    """An SMTP server's handler that keeps every envelope it is given."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@pytest.fixture
async def sink() -> AsyncIterator[tuple[Sink, int]]:
    handler = Sink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(partial(SMTP, handler), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield handler, port
    server.close()
    await server.wait_closed()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def post(sender: str, extra: str = "") -> MailRequest:
    raw = (
        f"From: {sender}\r\nTo: hello@example.com\r\nSubject: Hi\r\n"
        f"Message-ID: <p1@writers.org>\r\n{extra}\r\nA post.\r\n"
    ).encode()
    return MailRequest(raw, mail_from=sender, rcpt_tos=["hello@example.com"])


async def test_a_post_is_answered_through_the_outbox(project: Path, sink: tuple[Sink, int]) -> None:
    settings = load_settings(ROOT / "config" / "settings.toml")
    defaults = settings.router.defaults
    serve = Router.from_modules(
        settings.server.handlers, defaults=defaults, state=MemoryStateStore()
    )
    outbox = Router.from_modules(settings.queues["outbox"].handlers, defaults=defaults)
    await serve.deliver(post("ann@writers.org"))
    popped = await Queue("run/outbox").pop()
    assert popped is not None
    _, reply = popped
    assert reply.rcpt_tos == ["ann@writers.org"]
    assert reply["Auto-Submitted"] == "auto-replied"
    assert reply["In-Reply-To"] == "<p1@writers.org>"
    handler, port = sink
    with Relay("127.0.0.1", port).active():
        assert await outbox.deliver(reply) == 1
    assert [(f, t) for f, t, _ in handler.received] == [
        ("noreply@example.com", ["ann@writers.org"])
    ]
    assert b"Subject: Re: Hi" in handler.received[0][2]


@pytest.mark.parametrize(
    ("sender", "extra"),
    [
        ("", ""),
        ("bot@writers.org", "Auto-Submitted: auto-generated\r\n"),
        ("list@writers.org", "List-Id: <x.writers.org>\r\n"),
    ],
)
async def test_no_reply_to_null_sender_or_automatic_mail(
    project: Path, sender: str, extra: str
) -> None:
    settings = load_settings(ROOT / "config" / "settings.toml")
    serve = Router.from_modules(
        settings.server.handlers, defaults=settings.router.defaults, state=MemoryStateStore()
    )
    await serve.deliver(post(sender, extra))
    assert await Queue("run/posts").count() == 1
    assert await Queue("run/outbox").count() == 0


async def test_relay_down_fails_the_outbox_handler_so_the_worker_retries(project: Path) -> None:
    outbox = Router.from_modules(["maildefer.outbox"])
    reply = MailRequest(b"Subject: x\r\n\r\n", mail_from="a@x.org", rcpt_tos=["b@y.org"])
    with Relay("127.0.0.1", 1, timeout=2).active(), pytest.raises(OSError):
        await outbox.deliver(reply)
