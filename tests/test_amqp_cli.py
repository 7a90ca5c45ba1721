"""``maildefer queue URL count|requeue`` and ``maildefer status`` on amqp queues, against
the machine's RabbitMQ, through the real command line."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from helpers.broker import BROKER, needs_broker

from maildefer import MailRequest, logs
from maildefer.cli import main
from maildefer.queue import QueueOptions
from maildefer.queue.amqp import AmqpQueue
from maildefer.queue.amqp.topology import parse_url
from maildefer.worker import Worker
from tests.conftest import RunCli

MESSAGE = b"From: ann@x.org\r\nTo: post@example.com\r\nSubject: s\r\n\r\nbody\r\n"
UNREACHABLE = "amqp://guest:guest@127.0.0.1:1/?queue=nowhere"


def project(tmp_path: Path, url: str) -> Path:
    """A project whose queue ``posts`` is ``url``; returns its root."""
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "config" / "settings.toml").write_text(
        f'[queues.posts]\npath = "{url}"\nmax_attempts = 5\nretry_delay = 0.0\n\n'
        '[undeliverable]\npath = "run/undeliverable"\n'
    )
    return tmp_path


@pytest.fixture
async def raw() -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A plain connection to look at queues behind maildefer's back."""
    connection = await aio_pika.connect(BROKER, timeout=2)
    yield connection
    await connection.close()


async def depth(raw: aio_pika.abc.AbstractConnection, name: str) -> int | None:
    """Ready messages of a queue, ``None`` when it does not exist."""
    channel = await raw.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return None
    count = queue.declaration_result.message_count or 0
    await channel.close()
    return count


class Handler:
    """Records each attempt; fails (``failure``) on the subject ``doomed`` while it is set."""

    def __init__(self, failure: BaseException | None) -> None:
        self.failure = failure
        self.seen: list[tuple[str | None, int | None, str | None]] = []

    async def __call__(self, message: MailRequest) -> None:
        self.seen.append((message.key, message.attempt, message["Subject"]))
        if self.failure is not None and message["Subject"] == "doomed":
            raise self.failure


async def serve_until(worker: Worker, predicate: Any, limit: float = 15.0) -> None:
    """Run a worker until ``predicate`` holds, then shut it down."""
    run = asyncio.create_task(worker.serve())
    deadline = time.monotonic() + limit
    try:
        while not (predicate() or run.done()):
            assert time.monotonic() < deadline, "condition not met in time"
            await asyncio.sleep(0.01)
    finally:
        worker.request_shutdown()
        await run
    assert predicate()


def out(result: Any) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return str(result.stdout.decode()).strip()


@needs_broker
@pytest.mark.slow
async def test_buried_message_is_requeued_and_handled_with_attempts_reset(
    tmp_path: Path, run_cli: RunCli, amqp_url: str, raw: Any, log_out: io.StringIO
) -> None:
    root = project(tmp_path, amqp_url)
    name = parse_url(amqp_url)[0]
    # Two failed attempts (retried at once: no delay queue), then buried at max_attempts.
    q = AmqpQueue(amqp_url, options=QueueOptions(max_attempts=2, retry_delay=0.0))
    doomed = await q.push(MESSAGE.replace(b"Subject: s", b"Subject: doomed"))
    handler = Handler(RuntimeError("boom"))
    worker = Worker(q, handler)
    await serve_until(worker, lambda: worker.stats.buried == 1)
    assert handler.seen == [(doomed, 1, "doomed"), (doomed, 2, "doomed")]
    for subject in (b"one", b"two"):
        await q.push(MESSAGE.replace(b"Subject: s", b"Subject: " + subject))
    await q.close()
    assert await depth(raw, f"{name}.undeliverable") == 1

    assert out(run_cli("queue", "posts", "count", cwd=root)) == "2"
    assert out(run_cli("queue", amqp_url, "requeue", cwd=root)) == "requeued 1 messages"
    assert out(run_cli("queue", "posts", "count", cwd=root)) == "3"
    assert await depth(raw, f"{name}.undeliverable") == 0
    # Nothing more to move: a second requeue is a no-op.
    assert out(run_cli("queue", "posts", "requeue", cwd=root)) == "requeued 0 messages"

    handler = Handler(None)
    q = AmqpQueue(amqp_url, options=QueueOptions(max_attempts=2, retry_delay=0.0))
    worker = Worker(q, handler)
    await serve_until(worker, lambda: worker.stats.handled == 3)
    await q.close()
    again = [seen for seen in handler.seen if seen[2] == "doomed"]
    assert again == [(doomed, 1, "doomed")]  # the same key, its attempts from zero again
    assert out(run_cli("queue", "posts", "count", cwd=root)) == "0"


@needs_broker
async def test_requeue_on_the_undeliverable_queue_itself_sends_each_home(
    tmp_path: Path, run_cli: RunCli, amqp_url: str, raw: Any
) -> None:
    root = project(tmp_path, amqp_url)
    name = parse_url(amqp_url)[0]
    q = AmqpQueue(amqp_url)
    await q.push(MESSAGE)
    claims = q.consume()
    claim = await asyncio.wait_for(anext(claims), 5)
    await q.bury(claim, "boom", "failed")
    await claims.aclose()  # type: ignore[attr-defined]
    await q.close()
    # A message of unknown origin (dropped in by another program) stays where it is.
    channel = await raw.channel()
    await channel.default_exchange.publish(
        aio_pika.Message(b"stray"), routing_key=f"{name}.undeliverable"
    )
    await channel.close()

    dead_url = amqp_url.replace(f"queue={name}", f"queue={name}.undeliverable")
    assert out(run_cli("queue", dead_url, "requeue", cwd=root)) == "requeued 1 messages"
    assert await depth(raw, name) == 1
    assert await depth(raw, f"{name}.undeliverable") == 1  # the stray one


@needs_broker
async def test_requeue_to_a_vanished_queue_keeps_the_dead_letter(
    tmp_path: Path, run_cli: RunCli, amqp_url: str, raw: Any
) -> None:
    root = project(tmp_path, amqp_url)
    name = parse_url(amqp_url)[0]
    q = AmqpQueue(amqp_url)
    await q.push(MESSAGE)
    claims = q.consume()
    await q.bury(await asyncio.wait_for(anext(claims), 5), "boom", "failed")
    await claims.aclose()  # type: ignore[attr-defined]
    await q.close()
    channel = await raw.channel()
    await channel.queue_delete(name)  # the copy cannot be confirmed now
    await channel.close()

    result = run_cli("queue", "posts", "requeue", cwd=root)
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    assert await depth(raw, f"{name}.undeliverable") == 1  # not acked without a confirm


@needs_broker
def test_count_of_a_missing_queue_is_zero_and_creates_nothing(
    tmp_path: Path, run_cli: RunCli, amqp_url: str
) -> None:
    assert out(run_cli("queue", amqp_url, "count")) == "0"

    async def exists() -> bool:
        connection = await aio_pika.connect(BROKER, timeout=2)
        try:
            return await depth(connection, parse_url(amqp_url)[0]) is not None
        finally:
            await connection.close()

    assert asyncio.run(exists()) is False


@needs_broker
async def test_pop_and_clear_go_through_the_backend(
    tmp_path: Path, run_cli: RunCli, amqp_url: str, raw: Any
) -> None:
    q = AmqpQueue(amqp_url)
    first = await q.push(MESSAGE.replace(b"Subject: s", b"Subject: first"))
    await q.push(MESSAGE)
    await q.close()
    popped = run_cli("queue", amqp_url, "pop")
    assert popped.returncode == 0, popped.stderr
    assert popped.stdout.startswith(f"key: {first}\n".encode())
    assert b"Subject: first" in popped.stdout
    assert out(run_cli("queue", amqp_url, "clear")) == "removed 1 messages"
    assert await depth(raw, parse_url(amqp_url)[0]) == 0


@pytest.fixture
def in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run ``maildefer.cli.main`` here (no settings file); its logging is undone after."""
    monkeypatch.chdir(tmp_path)
    yield
    logs.reset()


@pytest.mark.parametrize("action", ["keys", "show", "remove"])
def test_browsing_actions_are_refused_in_one_line(
    in_process: None, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    extra = ["KEY"] if action != "keys" else []
    assert main(["queue", UNREACHABLE, action, *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not supported on amqp queues" in lines[0], lines


def test_unreachable_broker_is_one_log_line_and_exit_one(run_cli: RunCli) -> None:
    result = run_cli("queue", UNREACHABLE, "count", env={"MAILDEFER_LOGGING__FORMAT": "json"})
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    assert b"cannot connect to the broker" in result.stderr


# -- status --------------------------------------------------------------------------------


@needs_broker
async def test_status_shows_depth_and_undeliverable_from_the_broker(
    tmp_path: Path, run_cli: RunCli, amqp_url: str
) -> None:
    root = project(tmp_path, amqp_url)
    q = AmqpQueue(amqp_url)
    await q.push(MESSAGE)
    claims = q.consume()
    await q.bury(await asyncio.wait_for(anext(claims), 5), "boom", "failed")
    await claims.aclose()  # type: ignore[attr-defined]
    for _ in range(2):
        await q.push(MESSAGE)
    await q.close()

    row = next(
        line.split()
        for line in out(run_cli("status", cwd=root)).splitlines()
        if line.startswith("posts")
    )
    assert row == ["posts", "2", "0", "-", "-", "1"]
    result = run_cli("status", "--json", "--max-depth", "1", "--max-undeliverable", "0", cwd=root)
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert document["exceeded"] == [
        "posts: 2 messages waiting > --max-depth 1",
        "posts: 1 messages undeliverable > --max-undeliverable 0",
    ]
    posts = next(q for q in document["queues"] if q["name"] == "posts")
    assert (posts["new"], posts["undeliverable"], posts["error"]) == (2, 1, None)
    assert "guest:guest" not in posts["path"]  # the password is not printed


def test_status_shows_an_unreachable_broker_in_its_row(tmp_path: Path, run_cli: RunCli) -> None:
    root = project(tmp_path, UNREACHABLE)
    result = run_cli("status", cwd=root)
    assert result.returncode == 0  # a report without thresholds never fails
    assert b"Traceback" not in result.stderr
    row = next(line for line in result.stdout.decode().splitlines() if line.startswith("posts"))
    assert "unreachable" in row
    checked = run_cli("status", "--max-depth", "10", cwd=root)
    assert checked.returncode == 1  # a check that cannot read its figures fails
    assert "FAILED posts: cannot reach the broker" in checked.stdout.decode()


@needs_broker
async def test_an_amqp_undeliverable_url_in_settings_names_the_dead_queue(
    tmp_path: Path, amqp_url: str, raw: Any
) -> None:
    """``[undeliverable] path = "amqp://…?queue=D"``: buried mail goes to D, not NAME.undeliverable
    (the URL was once folded into a path, and the broker backend fell back to the default)."""
    from maildefer.errors import SMTPError
    from maildefer.queue.config import backend_for
    from maildefer.settings import Settings

    name = parse_url(amqp_url)[0]
    dead = f"{name}-dead"
    settings = Settings(
        root=tmp_path,
        queues={"posts": {"path": amqp_url, "max_attempts": 5}},
        undeliverable={"path": f"{BROKER}?queue={dead}"},
    )
    q = backend_for(settings, "posts")
    try:
        await q.push(MESSAGE.replace(b"Subject: s", b"Subject: doomed"))
        worker = Worker(q, Handler(SMTPError(550, "5.7.1 no")))
        await serve_until(worker, lambda: worker.stats.buried == 1)
        assert await depth(raw, dead) == 1
        assert await depth(raw, f"{name}.undeliverable") is None
    finally:
        await q.close()
        channel = await raw.channel()
        await channel.queue_delete(dead)
        await channel.close()
