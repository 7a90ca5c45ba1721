"""Worker handlers in control: key, attempt and queued time, ``Retry``, a permanent 5xx.

Contract §3 (0.2): in a worker ``message.key``/``.attempt``/``.queued_at`` say which claim
a handler runs (``None`` in serve); ``raise Retry(delay=...)`` retries after at least that
delay and still counts as an attempt; ``raise SMTPError(5xx, ...)`` buries at once with the
reply as the error. Real maildirs and an in-process Worker, the CLI in subprocesses, the
SMTP side on a real socket, and the RabbitMQ backend on the real broker (skipped without).
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import smtplib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import structlog
from helpers.broker import BROKER, needs_broker
from helpers.smtp_server import make_settings, queued, running, write_handlers

from maildefer import MailRequest, Retry, Router, SMTPError, logs
from maildefer.ops.metrics import Metrics
from maildefer.queue import QueueOptions
from maildefer.queue.amqp import AmqpQueue
from maildefer.queue.amqp.topology import H_NOT_BEFORE, RETRY_LADDER_MS, Topology
from maildefer.queue.envelope import Envelope, wrap
from maildefer.queue.maildir import MaildirQueue
from maildefer.worker import Deliver, Worker
from tests.conftest import RunCli

MESSAGE = b"From: ann@x.org\r\nTo: post@example.com\r\nSubject: s\r\n\r\nbody\r\n"
SETTINGS = '[queues.posts]\npath = "run/posts"\n\n[undeliverable]\npath = "run/undeliverable"\n'


@pytest.fixture(autouse=True)
def log_lines() -> Iterator[io.StringIO]:
    """The worker's JSON log lines, in a buffer."""
    out = io.StringIO()
    logs.configure(level="info", fmt="json", stream=out)
    yield out
    structlog.reset_defaults()


def message_lines(out: io.StringIO) -> list[dict[str, Any]]:
    """The canonical ``message`` lines logged so far."""
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "message"]


async def until(predicate: Any, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def project(tmp_path: Path, **options: Any) -> tuple[Path, MaildirQueue]:
    """A project (settings for the CLI) and its ``run/posts`` maildir queue."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "settings.toml").write_text(SETTINGS)
    run = tmp_path / "run"
    queue = MaildirQueue(
        run / "posts", options=QueueOptions(**options), undeliverable=run / "undeliverable"
    )
    return tmp_path, queue


class Recorder:
    """A handler that records what it saw of each attempt, then does what it is told.

    ``seen``: (key, attempt, queued_at, monotonic start) per attempt; ``raised``: the
    monotonic time of each raise.
    """

    def __init__(self, *actions: BaseException | None) -> None:
        self.actions = list(actions)  # one per attempt; the last one repeats
        self.seen: list[tuple[str | None, int | None, float | None, float]] = []
        self.raised: list[float] = []

    async def __call__(self, message: MailRequest) -> None:
        self.seen.append((message.key, message.attempt, message.queued_at, time.monotonic()))
        action = self.actions[min(len(self.seen), len(self.actions)) - 1]
        if action is not None:
            self.raised.append(time.monotonic())
            raise action

    def attempts(self) -> list[tuple[str | None, int | None]]:
        return [(key, attempt) for key, attempt, _, _ in self.seen]


async def serve_until(worker: Worker, predicate: Any, limit: float = 15.0) -> None:
    """Run a (non-burst) worker until ``predicate`` holds, then shut it down."""
    run = asyncio.create_task(worker.serve())
    try:
        await until(lambda: predicate() or run.done(), limit)
    finally:
        worker.request_shutdown()
        await run
    assert predicate()


# -- maildir: a permanent 5xx ------------------------------------------------------------------


async def test_smtp_5xx_is_buried_after_one_attempt_with_its_reply(
    tmp_path: Path, run_cli: RunCli, log_lines: io.StringIO
) -> None:
    root, q = project(tmp_path, max_attempts=5, retry_delay=0.0)
    key = await q.push(MESSAGE)
    handler = Recorder(SMTPError(550, "5.7.1 no"))
    metrics = Metrics()
    stats = await Worker(q, handler, burst=True, metrics=metrics, name="posts").serve()

    assert len(handler.seen) == 1  # no second attempt, although 4 were left
    assert (stats.buried, stats.retried, await q.count()) == (1, 0, 0)
    dead = MaildirQueue(root / "run" / "undeliverable")
    record = dead.error_record(key)
    assert record is not None
    assert (record["error"], record["reason"]) == ("550 5.7.1 no", "rejected")
    assert record["queue"] == str(q.path)
    rejected = metrics.undeliverable.labels(queue="posts", reason="rejected")
    assert rejected._value.get() == 1
    [line] = message_lines(log_lines)
    assert (line["outcome"], line["reason"], line["error"]) == (
        "buried",
        "rejected",
        "550 5.7.1 no",
    )

    shown = run_cli("queue", "run/undeliverable", "show", key, cwd=root)
    assert shown.returncode == 0, shown.stderr
    assert '"reason": "rejected"' in shown.stdout.decode()
    assert '"error": "550 5.7.1 no"' in shown.stdout.decode()
    status = run_cli("status", "--json", cwd=root)
    queues = {entry["name"]: entry for entry in json.loads(status.stdout)["queues"]}
    assert queues["posts"]["undeliverable"] == 1


@pytest.mark.parametrize(
    "failure",
    [SMTPError(451, "4.3.0 try later"), RuntimeError("db down")],
    ids=["smtp-451", "crash"],
)
async def test_smtp_4xx_is_retried_like_a_crash(tmp_path: Path, failure: Exception) -> None:
    _, q = project(tmp_path, max_attempts=5, retry_delay=60.0)
    key = await q.push(MESSAGE)
    handler = Recorder(failure)
    stats = await Worker(q, handler, burst=True).serve()

    assert len(handler.seen) == 1
    assert (stats.retried, stats.buried) == (1, 0)
    assert q.locate(key) is not None and q.locate(key)[0] == "later"  # type: ignore[index]
    record = q.error_record(key)
    assert record is not None and record["reason"] == "retry" and record["attempts"] == 1
    assert str(failure) in record["error"] and "Traceback" in record["error"]
    assert await MaildirQueue(q.undeliverable).count() == 0


# -- maildir: Retry ----------------------------------------------------------------------------


async def test_retry_waits_at_least_its_delay(tmp_path: Path, log_lines: io.StringIO) -> None:
    # No backoff of its own: a retry that ignored the delay would come back at once.
    _, q = project(tmp_path, max_attempts=5, retry_delay=0.0)
    key = await q.push(MESSAGE)
    handler = Recorder(Retry(delay=1.5, reason="thumbnails not ready"), None)
    await serve_until(Worker(q, handler), lambda: len(handler.seen) == 2)

    waited = handler.seen[1][3] - handler.raised[0]
    assert 1.5 <= waited < 1.5 + 10  # at least the delay; the upper bound only proves a wake-up
    assert handler.attempts() == [(key, 1), (key, 2)]
    assert await q.count() == 0
    first = message_lines(log_lines)[0]
    assert first["outcome"] == "retry"
    assert first["error"] == "retry requested by the handler in 1.5 s: thumbnails not ready"
    assert q.error_record(key) is None  # acked at the second attempt: the record went too


async def test_retry_counts_as_an_attempt_and_buries_at_max_attempts(tmp_path: Path) -> None:
    root, q = project(tmp_path, max_attempts=3, retry_delay=3600.0)
    key = await q.push(MESSAGE)
    handler = Recorder(Retry(delay=0.2))
    dead = MaildirQueue(root / "run" / "undeliverable")
    buried_after: list[int] = []

    async def watch() -> None:
        while not buried_after:
            if dead.locate(key) is not None:
                buried_after.append(len(handler.seen))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    worker = Worker(q, handler)
    await serve_until(worker, lambda: bool(buried_after))
    await watcher

    # The third Retry buried it, not the first or the second (and no fourth ran).
    assert buried_after == [3] and len(handler.seen) == 3
    assert handler.attempts() == [(key, 1), (key, 2), (key, 3)]
    assert worker.stats.retried == 2 and worker.stats.buried == 1
    record = dead.error_record(key)
    assert record is not None and record["reason"] == "failed" and record["attempts"] == 3
    assert record["error"] == "retry requested by the handler in 0.2 s"


def test_retry_refuses_a_delay_that_is_no_time() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="expected a finite number >= 0"):
            Retry(delay=bad)


# -- maildir: what handlers see ----------------------------------------------------------------

HANDLER_MODULE = """
from maildefer import route, stateless

SEEN = []

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    SEEN.append((message.key, message.attempt, message.queued_at))
    if len(SEEN) == 1:
        raise RuntimeError("fails once")
"""


@pytest.fixture
def handler_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.syspath_prepend(str(tmp_path))
    return write_handlers(tmp_path, HANDLER_MODULE)


async def test_handlers_see_the_key_the_attempt_and_when_it_was_queued(
    tmp_path: Path, handler_module: str
) -> None:
    _, q = project(tmp_path, max_attempts=5, retry_delay=0.0)
    before = time.time()
    key = await q.push(MailRequest(MESSAGE, mail_from="ann@x.org", rcpt_tos=["post@example.com"]))
    after = time.time()
    router = Router.from_modules([handler_module], defaults={"host": r"example\.com"})
    seen = sys.modules[handler_module].SEEN
    deliver: Deliver = router.deliver  # what `maildefer worker` runs
    await serve_until(Worker(q, deliver), lambda: len(seen) == 2)

    assert [(k, attempt) for k, attempt, _ in seen] == [(key, 1), (key, 2)]
    for _, _, queued_at in seen:  # the first push's time, on the retry too
        assert queued_at is not None and before - 0.01 <= queued_at <= after + 0.01


HANDLER_IN_SERVE = """
from maildefer import Queue, Retry, route, stateless

SEEN = []

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    SEEN.append((message.key, message.attempt, message.queued_at))
    if name == "later":
        raise Retry(delay=5)
    await Queue("run/posts").push(message)
"""


async def test_in_serve_no_claim_is_seen_and_retry_is_a_temporary_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = write_handlers(tmp_path, HANDLER_IN_SERVE)

    def send(port: int, rcpt: str) -> tuple[int, bytes] | None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            try:
                client.sendmail("ann@x.org", [rcpt], MESSAGE)
            except smtplib.SMTPDataError as exc:
                return exc.smtp_code, exc.smtp_error
        return None

    async with running(make_settings(tmp_path, module)) as server:
        assert server.port
        accepted = await asyncio.to_thread(send, server.port, "post@example.com")
        refused = await asyncio.to_thread(send, server.port, "later@example.com")

    assert accepted is None
    assert refused is not None and refused[0] == 451 and refused[1].startswith(b"4.3.0")
    assert sys.modules[module].SEEN == [(None, None, None), (None, None, None)]
    assert len(queued(tmp_path / "run" / "posts")) == 1  # only the accepted one


# -- RabbitMQ ----------------------------------------------------------------------------------


def test_the_retry_ladder_is_bounded_and_rounds_up() -> None:
    topology = Topology("q", "q.dead", QueueOptions())
    rng = random.Random(13)
    delays = [rng.uniform(0, 200_000) for _ in range(2_000)] + [0.001, 1.0, 1.5, 65536.0]
    rungs = {d: topology.retry_rung_ms(d) for d in delays}
    assert set(rungs.values()) <= set(RETRY_LADDER_MS) and len(RETRY_LADDER_MS) == 17
    for delay, rung in rungs.items():
        # At least the delay (below the top), under twice it (or 1 s); past the top: laps.
        assert rung == RETRY_LADDER_MS[-1] or delay * 1000 <= rung < max(2 * delay * 1000, 1001)


@pytest.fixture
async def broker() -> AsyncIterator[tuple[aio_pika.abc.AbstractConnection, str]]:
    """A plain connection and a fresh queue name; its queues are deleted afterwards."""
    connection = await aio_pika.connect(BROKER, timeout=2)
    name = f"t-{uuid.uuid4().hex[:12]}"
    yield connection, name
    channel = await connection.channel()
    delays = [f"{name}.delay.{rung}" for rung in RETRY_LADDER_MS]  # no test backs off
    for queue_name in [name, f"{name}.undeliverable", *delays]:
        await channel.queue_delete(queue_name)
    await channel.close()
    await connection.close()


def amqp_queue(name: str, **options: Any) -> AmqpQueue:
    return AmqpQueue(f"{BROKER}?queue={name}", options=QueueOptions(**options), connect_timeout=2)


@needs_broker
async def test_amqp_smtp_5xx_is_dead_lettered_at_once_with_its_reply(
    broker: tuple[aio_pika.abc.AbstractConnection, str],
) -> None:
    raw, name = broker
    q = amqp_queue(name, max_attempts=5, retry_delay=0.0)
    key = await q.push(MESSAGE)
    handler = Recorder(SMTPError(554, "5.7.1 no"))
    worker = Worker(q, handler)
    await serve_until(worker, lambda: worker.stats.buried == 1)
    await q.close()

    assert len(handler.seen) == 1 and worker.stats.retried == 0
    channel = await raw.channel()
    dead = await (await channel.get_queue(f"{name}.undeliverable")).get(no_ack=True)
    main = await channel.declare_queue(name, passive=True)
    await channel.close()
    headers = dead.headers or {}
    assert dead.message_id == key
    assert (headers["x-maildefer-reason"], headers["x-maildefer-error"]) == (
        "rejected",
        "554 5.7.1 no",
    )
    assert main.declaration_result.message_count == 0


@needs_broker
async def test_amqp_retry_waits_its_delay_and_handlers_see_key_and_attempt(
    broker: tuple[aio_pika.abc.AbstractConnection, str],
) -> None:
    _, name = broker
    q = amqp_queue(name, max_attempts=5, retry_delay=0.0)
    before = time.time()
    key = await q.push(MESSAGE)
    after = time.time()
    handler = Recorder(Retry(delay=1.5), None)
    worker = Worker(q, handler)
    await serve_until(worker, lambda: worker.stats.handled == 1)
    await q.close()

    assert handler.attempts() == [(key, 1), (key, 2)]
    waited = handler.seen[1][3] - handler.raised[0]
    assert 1.5 <= waited < 1.5 + 10  # the 2 s rung: at least the delay
    for _, _, queued_at, _ in handler.seen:  # header ms: within a millisecond of the push
        assert queued_at is not None and before - 0.01 <= queued_at <= after + 0.01


@needs_broker
async def test_amqp_a_retry_not_yet_due_takes_another_lap_uncounted(
    broker: tuple[aio_pika.abc.AbstractConnection, str],
) -> None:
    # What comes back from the top rung of a Retry longer than the ladder: a copy in the
    # queue whose not-before is still ahead (here 1.5 s ahead, so the lap is the 2 s rung).
    raw, name = broker
    q = amqp_queue(name, max_attempts=5)
    await q.count()  # declares the queue
    due = time.time() + 1.5
    headers = {
        "x-maildefer-attempts": 2,
        "x-maildefer-recoveries": 0,
        "x-maildefer-queued-at-ms": int(time.time() * 1000),
        H_NOT_BEFORE: int(due * 1000),
    }
    channel = await raw.channel()
    body = wrap(MESSAGE, Envelope("ann@x.org", ["post@example.com"]))
    await channel.default_exchange.publish(
        aio_pika.Message(body, headers=headers, message_id="k1"), routing_key=name
    )
    await channel.close()
    handler = Recorder(None)
    started: list[float] = []

    async def deliver(message: MailRequest) -> None:
        started.append(time.time())
        await handler(message)

    worker = Worker(q, deliver)
    await serve_until(worker, lambda: worker.stats.handled == 1)
    await q.close()

    assert started[0] >= due
    assert handler.attempts() == [("k1", 3)]  # the lap counted no attempt
