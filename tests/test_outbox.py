"""Replies deferred to run/outbox and relayed by a worker through [relay]."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from helpers.smarthost import PASSWORD, USER, Cert, Smarthost, start_smarthost

from maildefer import MailRequest, Queue, Router
from maildefer.queue import QueueOptions
from maildefer.queue.maildir import MaildirQueue
from maildefer.relay import Relay, RelayError
from maildefer.settings import Settings, load_settings
from maildefer.state import MemoryStateStore
from maildefer.worker import Worker

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
    with Relay("127.0.0.1", 1, timeout=2).active(), pytest.raises(RelayError) as caught:
        await outbox.deliver(reply)
    assert caught.value.temporary and isinstance(caught.value.__cause__, OSError)


# -- through a worker, against a real smarthost ---------------------------------------------


def free_port() -> int:
    """A port nothing listens on now (the smarthost starts on it later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def outbox_worker(root: Path, **options: Any) -> tuple[MaildirQueue, Worker]:
    queue = MaildirQueue(
        root / "run" / "outbox",
        options=QueueOptions(**options),
        undeliverable=root / "run" / "undeliverable",
    )
    router = Router.from_modules(["maildefer.handlers.outbox"])
    worker = Worker(queue, router.deliver, lifespan=router.lifespan(Settings(root=root)))
    return queue, worker


REPLY = MailRequest(
    b"From: noreply@example.com\r\nTo: ann@writers.org\r\nSubject: Re: hi\r\n\r\nThanks.\r\n",
    mail_from="noreply@example.com",
    rcpt_tos=["ann@writers.org"],
)


async def until(predicate: Any, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_smarthost_down_is_retried_until_it_comes_back(
    tmp_path: Path, cert: Cert, log_out: io.StringIO
) -> None:
    port = free_port()
    queue, worker = outbox_worker(tmp_path, max_attempts=20, retry_delay=0.1, retry_max_delay=0.3)
    key = await queue.push(REPLY)
    host = Smarthost()
    relay = Relay("127.0.0.1", port, 5.0, starttls=True, username=USER, password=PASSWORD,
                  ca_file=str(cert.cert))  # fmt: skip
    server = None
    with relay.active():
        run = asyncio.create_task(worker.serve())
        try:
            # The first attempt fails (nothing listens), and is recorded as a retry.
            await until(lambda: queue.error_record(key) is not None)
            assert "Connect call failed" in str(queue.error_record(key))
            server = await start_smarthost(host, cert=cert, mode="starttls", port=port)
            await until(lambda: host.received != [])
            await until(lambda: worker.stats.handled >= 1)
        finally:
            worker.request_shutdown()
            await run
            if server is not None:
                server.close()
                await server.wait_closed()
    [got] = host.received
    assert (got.rcpt_tos, got.tls, got.login) == (["ann@writers.org"], True, USER.encode())
    assert await queue.count() == 0
    assert MaildirQueue(tmp_path / "run" / "undeliverable").error_record(key) is None
    lines = [json.loads(x) for x in log_out.getvalue().splitlines() if x.startswith("{")]
    outcomes = [x["outcome"] for x in lines if x.get("event") == "message"]
    assert outcomes[0] == "retry" and outcomes[-1] == "ok"
    assert PASSWORD not in log_out.getvalue()


async def test_smarthost_550_is_undeliverable_at_once_with_its_reply(
    tmp_path: Path, cert: Cert, log_out: io.StringIO
) -> None:
    host = Smarthost(replies={"RCPT": "550 5.1.1 <ann@writers.org>: no such user"})
    server = await start_smarthost(host, cert=cert, mode="starttls")
    queue, _ = outbox_worker(tmp_path, max_attempts=5, retry_delay=0.0)
    router = Router.from_modules(["maildefer.handlers.outbox"])
    worker = Worker(queue, router.deliver, burst=True,
                    lifespan=router.lifespan(Settings(root=tmp_path)))  # fmt: skip
    key = await queue.push(REPLY)
    relay = Relay("127.0.0.1", host.port, 5.0, starttls=True, username=USER,
                  password=PASSWORD, ca_file=str(cert.cert))  # fmt: skip
    try:
        with relay.active():
            stats = await worker.serve()
    finally:
        server.close()
        await server.wait_closed()
    assert (stats.buried, stats.retried, await queue.count()) == (1, 0, 0)
    assert host.mails == 1  # one attempt, although four were left
    record = MaildirQueue(tmp_path / "run" / "undeliverable").error_record(key)
    assert record is not None
    assert (record["reason"], record["error"]) == (
        "rejected",
        "550 5.1.1 <ann@writers.org>: no such user",
    )
    assert PASSWORD not in log_out.getvalue() + json.dumps(record)


async def test_one_connection_serves_the_whole_queue(tmp_path: Path, cert: Cert) -> None:
    host = Smarthost()
    server = await start_smarthost(host, cert=cert, mode="starttls")
    queue = MaildirQueue(tmp_path / "run" / "outbox")
    router = Router.from_modules(["maildefer.handlers.outbox"])
    worker = Worker(queue, router.deliver, burst=True, concurrency=1,
                    lifespan=router.lifespan(Settings(root=tmp_path)))  # fmt: skip
    for _ in range(10):
        await queue.push(REPLY)
    relay = Relay("127.0.0.1", host.port, 5.0, starttls=True, username=USER,
                  password=PASSWORD, ca_file=str(cert.cert))  # fmt: skip
    try:
        with relay.active():
            await worker.serve()
    finally:
        server.close()
        await server.wait_closed()
    # The outbox's lifespan kept the connection: one TLS handshake and AUTH for ten.
    assert (len(host.received), host.connections, len(host.auth_attempts)) == (10, 1, 1)
