"""The RabbitMQ backend through broker faults: connection drops, restarts, failover, outages.

Real brokers only. Connection drops happen on the machine's broker (127.0.0.1:5672), but
only to OUR connections: each is named ``maildefer:<queue>:<role>:<pid>`` (the client's
``connection_name``), found with ``rabbitmqctl list_connections pid client_properties``
and closed with ``rabbitmqctl close_connection``; nothing else on that broker is touched.
Whole-broker outages (``stop_app`` / ``start_app``) happen on a private node of this
module (``tests/helpers/rabbit_cluster.py``), never on the machine's broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from helpers.broker import BROKER, needs_broker
from helpers.rabbit_cluster import Node, rabbitmq_missing, start_cluster
from helpers.smtp_server import make_settings

from maildefer.errors import ConfigError, QueueError
from maildefer.queue.amqp import AmqpQueue
from maildefer.queue.amqp.hosts import BrokerHosts
from maildefer.queue.amqp.topology import parse_url
from maildefer.queue.backend import Claim
from maildefer.smtp.server import Server
from maildefer.worker import Worker

PROJECT_ROOT = Path(__file__).resolve().parent.parent

needs_rabbitmqctl = pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None, reason="rabbitmqctl is not installed"
)


def free_port() -> int:
    """A loopback port with nothing listening on it (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def events(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of a capture."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def named(text: str, event: str) -> list[dict[str, Any]]:
    return [e for e in events(text) if e.get("event") == event]


def close_our_connections(label: str) -> int:
    """Close, on the machine's broker, only the connections of queue ``label``."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    pids = [
        line.split("\t", 1)[0]
        for line in listed.splitlines()
        if f'"connection_name","maildefer:{label}:' in line
    ]
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, "test: connection drop"],
            capture_output=True,
            timeout=60,
            check=True,
        )
    return len(pids)


async def wait_for(predicate: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A private single RabbitMQ node for the module (a broker the tests may stop)."""
    missing = rabbitmq_missing()
    if missing:
        pytest.skip(missing)
    try:
        cluster = start_cluster(1, tmp_path_factory.mktemp("rabbit"))
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"a private RabbitMQ node cannot start here: {error}")
    try:
        yield cluster.nodes[0]
    finally:
        cluster.close()


@pytest.fixture
def up(node: Node) -> Iterator[Node]:
    """The private node, running; started again afterwards if a test left it stopped."""
    yield node
    if node.alive() and not accepts(node.port):
        node.start_app()


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def node_url(node: Node, queue: str) -> str:
    return f"{node.url}?queue={queue}"


# -- the URL ------------------------------------------------------------------------------


def test_a_multi_host_url_names_every_node_and_shares_the_rest() -> None:
    name, url = parse_url("amqp://u:p%40ss@10.0.0.1:5672,10.0.0.2,[fd00::3]:5673/vh?queue=posts")
    hosts = BrokerHosts.parse(url)
    assert name == "posts"
    assert [str(a) for a in hosts.addresses] == ["10.0.0.1:5672", "10.0.0.2:5672", "[fd00::3]:5673"]
    assert [hosts.url_for(i) for i in range(3)] == [
        "amqp://u:p%40ss@10.0.0.1:5672/vh",
        "amqp://u:p%40ss@10.0.0.2:5672/vh",
        "amqp://u:p%40ss@[fd00::3]:5673/vh",
    ]
    assert AmqpQueue("amqps://h1,h2/?queue=q")._link.hosts.url_for(1) == "amqps://h2:5671/"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("amqp://guest:secret@h1:5672,,h3/?queue=q", "empty host"),
        ("amqp://guest:secret@h1:56x2/?queue=q", "bad port '56x2'"),
        ("amqp://guest:secret@h1:5672,h2:70000/?queue=q", "bad port '70000'"),
        ("amqp://guest:secret@[fd00::1:5672/?queue=q", "bad IPv6 host"),
    ],
)
def test_a_bad_host_list_is_a_config_error_without_the_password(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        AmqpQueue(url)
    assert "secret" not in str(caught.value)


# -- failover --------------------------------------------------------------------------------


@needs_broker
async def test_push_and_consume_go_through_the_second_host_when_the_first_refuses(
    amqp_url: str,
) -> None:
    name = amqp_url.rsplit("=", 1)[1]
    url = f"amqp://guest:guest@127.0.0.1:{free_port()},127.0.0.1:5672/?queue={name}"
    q = AmqpQueue(url, connect_timeout=2)
    try:
        key = await q.push(b"Subject: through the second\r\n\r\n")
        claims = q.consume()
        claim = await asyncio.wait_for(anext(claims), 10)
        assert (claim.key, claim.message["Subject"]) == (key, "through the second")
        await q.ack(claim)
        await claims.aclose()
    finally:
        await q.close()


@needs_broker
async def test_a_first_host_that_never_answers_costs_one_connect_timeout(amqp_url: str) -> None:
    # A TCP listener that accepts and never speaks AMQP: a hung node, not a refusing one.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    name = amqp_url.rsplit("=", 1)[1]
    port = silent.getsockname()[1]
    q = AmqpQueue(
        f"amqp://guest:guest@127.0.0.1:{port},127.0.0.1:5672/?queue={name}", connect_timeout=0.5
    )
    try:
        started = time.monotonic()
        await q.push(b"Subject: past a hung node\r\n\r\n")
        assert time.monotonic() - started < 3  # 0.5 s on the hung node, then the real one
        only = AmqpQueue(f"amqp://guest:guest@127.0.0.1:{port}/?queue={name}", connect_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(QueueError, match="cannot connect to the broker"):
            await only.push(b"Subject: nowhere\r\n\r\n")
        assert time.monotonic() - started < 3
        await only.close()
    finally:
        await q.close()
        silent.close()


async def test_a_consumer_started_while_no_broker_answers_waits_for_one(log_out: Any) -> None:
    q = AmqpQueue(f"amqp://guest:guest@127.0.0.1:{free_port()}/?queue=later", connect_timeout=1)
    ready = asyncio.Event()
    claims = q.claims(prefetch=1, burst=False, ready=ready)
    waiting = asyncio.create_task(anext(claims))
    try:
        await asyncio.sleep(1.5)  # several attempts, each refused
        assert not waiting.done() and not ready.is_set()
        paused = named(log_out.getvalue(), "amqp_paused")
        assert len(paused) == 1 and "cannot connect to the broker" in paused[0]["reason"]
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await q.close()


@needs_broker
async def test_refused_credentials_at_start_end_the_consumer_with_the_error(
    amqp_url: str,
) -> None:
    q = AmqpQueue(amqp_url.replace("guest:guest@", "guest:wrong@"), connect_timeout=2)
    claims = q.claims(prefetch=1, burst=False, ready=asyncio.Event())
    try:
        with pytest.raises(QueueError, match="cannot connect to the broker"):
            await asyncio.wait_for(anext(claims), 15)
    finally:
        await q.close()


# -- a dropped connection (the machine's broker, our connections only) -----------------------


@needs_broker
@needs_rabbitmqctl
async def test_a_dropped_connection_resubscribes_and_never_acks_on_the_new_channel(
    amqp_url: str, log_out: Any
) -> None:
    name = amqp_url.rsplit("=", 1)[1]
    q = AmqpQueue(amqp_url, connect_timeout=2)
    ready = asyncio.Event()
    claims = q.claims(prefetch=4, burst=False, ready=ready)
    seen: list[Claim] = []

    async def take() -> None:
        async for claim in claims:
            seen.append(claim)

    reader = asyncio.create_task(take())
    try:
        await asyncio.wait_for(ready.wait(), 10)
        first = await q.push(b"Subject: before\r\n\r\n")
        await wait_for(lambda: len(seen) == 1, 10, "the first message")
        held = seen[0]  # not acked: its channel is about to die

        assert await asyncio.to_thread(close_our_connections, name) >= 1
        await wait_for(lambda: len(named(log_out.getvalue(), "amqp_resumed")) == 1, 15, "resume")
        assert ready.is_set()

        # The broker requeued the held message with its channel and redelivers it.
        await wait_for(lambda: len(seen) == 2, 15, "the redelivery")
        assert seen[1].key == first and seen[1].recoveries == 1
        # Its old delivery tag means nothing on the new channel: the ack is skipped,
        # and the new channel stays open (a stale tag there would close it).
        await q.ack(held)
        await q.ack(seen[1])
        second = await q.push(b"Subject: after\r\n\r\n")
        await wait_for(lambda: len(seen) == 3, 10, "a message pushed after the drop")
        assert seen[2].key == second
        await q.ack(seen[2])
        await asyncio.sleep(0.3)
        assert await q.count() == 0
        assert len(named(log_out.getvalue(), "amqp_paused")) == 1
        assert len(named(log_out.getvalue(), "amqp_resumed")) == 1
        assert not named(log_out.getvalue(), "amqp_settle_failed")
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await claims.aclose()
        await q.close()


@needs_broker
async def test_a_consumer_the_broker_cancels_pauses_then_resumes_on_the_queue_again(
    amqp_url: str, log_out: Any
) -> None:
    """Deleting the queue under a consumer makes the broker cancel it on a channel that
    stays open: the worker must pause and consume again once the queue is back, never
    sit alive with no consumer (aiormq only logs a warning)."""
    name = amqp_url.rsplit("=", 1)[1]
    q = AmqpQueue(amqp_url, connect_timeout=2)
    ready = asyncio.Event()
    claims = q.claims(prefetch=4, burst=False, ready=ready)
    seen: list[Claim] = []

    async def take() -> None:
        async for claim in claims:
            seen.append(claim)
            await q.ack(claim)

    reader = asyncio.create_task(take())
    try:
        await asyncio.wait_for(ready.wait(), 10)
        connection = await aio_pika.connect(BROKER, timeout=5)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(name)
        await wait_for(lambda: not ready.is_set(), 10, "paused")
        [paused] = named(log_out.getvalue(), "amqp_paused")
        assert "cancelled by the broker" in paused["reason"]
        # Another queue object declares the topology again and pushes.
        pusher = AmqpQueue(amqp_url, connect_timeout=2)
        try:
            key = await pusher.push(b"Subject: back\r\n\r\n")
        finally:
            await pusher.close()
        await wait_for(lambda: [c.key for c in seen] == [key], 15, "the message after")
        assert ready.is_set() and len(named(log_out.getvalue(), "amqp_resumed")) == 1
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await claims.aclose()
        await q.close()


@needs_broker
@needs_rabbitmqctl
async def test_push_after_a_dropped_connection_reconnects_by_itself(amqp_url: str) -> None:
    name = amqp_url.rsplit("=", 1)[1]
    q = AmqpQueue(amqp_url, connect_timeout=2)
    try:
        await q.push(b"Subject: 1\r\n\r\n")
        assert await asyncio.to_thread(close_our_connections, name) == 1
        await asyncio.sleep(0.2)
        await q.push(b"Subject: 2\r\n\r\n")
        assert await q.count() == 2
    finally:
        await q.close()


# -- a whole broker away (the private node) --------------------------------------------------


@pytest.mark.slow
async def test_push_during_an_outage_fails_promptly_then_works_again(up: Node) -> None:
    q = AmqpQueue(node_url(up, f"out-{uuid.uuid4().hex[:8]}"), connect_timeout=1, publish_timeout=2)
    try:
        await q.push(b"Subject: before\r\n\r\n")
        await asyncio.to_thread(up.stop_app)
        started = time.monotonic()
        with pytest.raises(QueueError):
            await q.push(b"Subject: during\r\n\r\n")
        with pytest.raises(QueueError):
            await asyncio.to_thread(q.push_sync, b"Subject: during, sync\r\n\r\n")
        assert time.monotonic() - started < 8  # both, bounded by the timeouts (1 s, 2 s)
        await asyncio.to_thread(up.start_app)
        await q.push(b"Subject: after\r\n\r\n")  # the same object: nothing restarted
        assert await q.count() == 2
    finally:
        await q.close()
        await asyncio.to_thread(q.close_sync)


@needs_broker
@pytest.mark.slow
async def test_consumer_moves_to_the_next_host_when_its_node_goes(up: Node, log_out: Any) -> None:
    """The private node and the machine's broker as two hosts of one URL."""
    name = f"t-failover-{uuid.uuid4().hex[:8]}"
    q = AmqpQueue(
        f"amqp://guest:guest@127.0.0.1:{up.port},127.0.0.1:5672/?queue={name}", connect_timeout=1
    )
    ready = asyncio.Event()
    claims = q.claims(prefetch=2, burst=False, ready=ready)
    seen: list[str] = []

    async def take() -> None:
        async for claim in claims:
            seen.append(claim.message["Subject"] or "")
            await q.ack(claim)

    reader = asyncio.create_task(take())
    try:
        await asyncio.wait_for(ready.wait(), 10)
        await q.push(b"Subject: on the first\r\n\r\n")
        await wait_for(lambda: seen == ["on the first"], 10, "the first node's message")
        await asyncio.to_thread(up.stop_app)
        # The next node of the URL: the topology is declared there, the consumer follows.
        await wait_for(lambda: len(named(log_out.getvalue(), "amqp_resumed")) == 1, 15, "resume")
        await q.push(b"Subject: on the second\r\n\r\n")
        await wait_for(lambda: seen[-1:] == ["on the second"], 10, "the second node's message")
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await claims.aclose()
        await q.close()
        await asyncio.to_thread(up.start_app)
        connection = await aio_pika.connect(BROKER, timeout=2)
        channel = await connection.channel()
        for queue in (name, f"{name}.undeliverable"):
            await channel.queue_delete(queue)
        await connection.close()


@pytest.mark.slow
async def test_worker_says_paused_while_the_broker_is_away_and_resumes(
    up: Node, log_out: Any
) -> None:
    q = AmqpQueue(node_url(up, f"pause-{uuid.uuid4().hex[:8]}"), connect_timeout=1)
    seen: list[str] = []

    async def deliver(message: Any) -> None:
        seen.append(message["Subject"])

    worker = Worker(q, deliver, concurrency=2, grace_period=1, name="posts")
    serving = asyncio.create_task(worker.serve())
    try:
        await asyncio.wait_for(worker.ready.wait(), 15)
        await asyncio.sleep(0.1)  # serve() has sent READY=1 (the worker is live)
        assert "paused" not in worker.status_line()
        await asyncio.to_thread(up.stop_app)
        await wait_for(lambda: not worker.ready.is_set(), 10, "the pause")
        assert worker.status_line().startswith("posts: paused (no broker reachable), ")
        await asyncio.sleep(3)  # several failed subscription attempts: still one line
        assert not serving.done()
        await asyncio.to_thread(up.start_app)
        await asyncio.wait_for(worker.ready.wait(), 15)
        assert worker.status_line().startswith("posts: 0 handled")
        pusher = AmqpQueue(q.url, connect_timeout=1)
        await pusher.push(b"Subject: after the pause\r\n\r\n")
        await pusher.close()
        await wait_for(lambda: seen == ["after the pause"], 10, "a message after the pause")
        assert len(named(log_out.getvalue(), "amqp_paused")) == 1
        assert len(named(log_out.getvalue(), "amqp_resumed")) == 1
    finally:
        worker.request_shutdown()
        await asyncio.wait_for(serving, 15)


SMTP_HANDLERS = """
from maildefer import Queue, route, stateless

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    await Queue({url!r}).push(message)
"""


def smtp_send(port: int, subject: str) -> tuple[int, str]:
    """One message over SMTP; the reply code to the end of DATA and its text."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("a@example.org")
        client.rcpt("u@example.com")
        code, text = client.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())
        return code, text.decode()


@pytest.mark.slow
async def test_serve_answers_451_while_no_broker_then_250(
    up: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = node_url(up, f"serve-{uuid.uuid4().hex[:8]}")
    module = f"resilience_handlers_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(SMTP_HANDLERS.format(url=url)))
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = make_settings(
        tmp_path, module, queues={"posts": {"path": url, "connect_timeout": 1}}
    )
    server = Server(settings)
    await server.start()
    try:
        assert (await asyncio.to_thread(smtp_send, server.port, "up"))[0] == 250
        await asyncio.to_thread(up.stop_app)
        started = time.monotonic()
        code, text = await asyncio.to_thread(smtp_send, server.port, "down")
        assert code == 451, text
        assert time.monotonic() - started < 10  # far under an SMTP client's timeout
        await asyncio.to_thread(up.start_app)
        assert (await asyncio.to_thread(smtp_send, server.port, "back"))[0] == 250
    finally:
        await server.shutdown()
        sys.modules.pop(module, None)
    q = AmqpQueue(url, connect_timeout=2)
    subjects = []
    while (popped := await q.pop()) is not None:
        subjects.append(popped[1]["Subject"])
    await q.close()
    assert subjects == ["up", "back"]


# -- the acceptance scenario: a broker restart under load -------------------------------------

WORKER = """
import os, sys
from maildefer import logs
from maildefer.queue.amqp import AmqpQueue
from maildefer.worker import Worker

url, record = sys.argv[1], open(sys.argv[2], "a", buffering=1)
logs.configure(level="info", fmt="json")

async def deliver(message):
    record.write(f"{os.getpid()} {message['Subject']}\\n")

Worker(AmqpQueue(url, connect_timeout=1), deliver, concurrency=8, grace_period=2).run()
"""

RATE = 300.0
"""Pushes a second, as in the issue's measurement."""


async def push_at_rate(q: AmqpQueue, stop: asyncio.Event) -> tuple[dict[str, float], list[float]]:
    """Push numbered messages at RATE until ``stop``; what returned (and when), when errors."""
    returned: dict[str, float] = {}
    errors: list[float] = []
    running: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(64)

    async def one(subject: str) -> None:
        try:
            await q.push(f"Subject: {subject}\r\n\r\n".encode())
        except QueueError:
            errors.append(time.monotonic())
        else:
            returned[subject] = time.monotonic()
        finally:
            slots.release()

    number = 0
    while not stop.is_set():
        await slots.acquire()
        task = asyncio.create_task(one(f"m{number}"))
        running.add(task)
        task.add_done_callback(running.discard)
        number += 1
        await asyncio.sleep(1 / RATE)
    await asyncio.gather(*running)
    return returned, errors


def handled(record: Path) -> list[tuple[int, str]]:
    if not record.exists():
        return []
    lines = record.read_text().splitlines()
    return [(int(pid), subject) for pid, subject in (line.split(" ", 1) for line in lines)]


@pytest.mark.slow
async def test_broker_restart_under_load_loses_nothing_and_the_worker_resumes(
    up: Node, tmp_path: Path
) -> None:
    url = node_url(up, f"restart-{uuid.uuid4().hex[:8]}")
    record, log = tmp_path / "handled", tmp_path / "worker.log"
    with log.open("w") as err:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER, url, str(record), cwd=PROJECT_ROOT, stderr=err
        )
    q = AmqpQueue(url, connect_timeout=1, publish_timeout=2)
    try:
        await q.push(b"Subject: probe\r\n\r\n")
        await wait_for(lambda: handled(record), 20, "the worker's first message")

        stop = asyncio.Event()
        pusher = asyncio.create_task(push_at_rate(q, stop))
        await asyncio.sleep(2)
        down_from = time.monotonic()
        await asyncio.to_thread(up.stop_app)
        await asyncio.sleep(6)
        await asyncio.to_thread(up.start_app)
        back_at = time.monotonic()
        await asyncio.sleep(2)
        stop.set()
        returned, errors = await pusher

        wanted = set(returned)
        done = lambda: wanted <= {subject for _, subject in handled(record)}  # noqa: E731
        await wait_for(done, 30 - (time.monotonic() - back_at), "every returned push handled")
        assert {pid for pid, _ in handled(record)} == {worker.pid}  # the same process
        assert len(wanted) > 2 * RATE  # pushes succeeded before and after the outage
        assert errors, "no push failed while the broker was down"
        assert all(down_from <= at <= back_at + 1 for at in errors), "errors outside the outage"
        text = log.read_text()
        assert len(named(text, "amqp_paused")) == 1
        assert len(named(text, "amqp_resumed")) == 1
        assert worker.returncode is None  # alive all along

        # SIGTERM while the broker is away: still a prompt, clean exit.
        await asyncio.to_thread(up.stop_app)
        await wait_for(lambda: len(named(log.read_text(), "amqp_paused")) == 2, 15, "pause")
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 15) == 0
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
        await q.close()
