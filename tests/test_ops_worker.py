"""``maildefer worker`` as a systemd service: sd_notify and metrics, as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers.broker import BROKER, broker_up
from helpers.ops import Notify, wait_for
from prometheus_client.parser import text_string_to_metric_families

from maildefer.queue.maildir import MaildirQueue

ROOT = Path(__file__).resolve().parent.parent

# The subject decides: "slow" marks that it started, then takes a while; "fail" raises.
HANDLERS = """
import asyncio
import os
from pathlib import Path
from maildefer import route, stateless

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    subject = message["Subject"]
    if subject == "slow":
        Path("slow-started").write_text("x")
        await asyncio.sleep(1.5)
    if subject == "fail":
        raise RuntimeError("failing on purpose")
    fd = os.open("handled", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, f"{subject}\\n".encode())
    os.close(fd)
"""


def message(subject: str) -> bytes:
    return f"From: a@b.org\r\nTo: u@example.com\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()


def make_project(root: Path, *, metrics: bool = False) -> MaildirQueue:
    """A project in ``root`` with queue ``posts``; returns the queue (created)."""
    (root / "ops_worker_handlers.py").write_text(HANDLERS)
    lines = [
        "[queues.posts]",
        'path = "run/posts"',
        'handlers = ["ops_worker_handlers"]',
        # A rescan once a minute: anything picked up sooner came through the watcher.
        "rescan_interval = 60.0",
        "retry_delay = 60.0",
        "grace_period = 10.0",
        "[undeliverable]",
        'path = "run/undeliverable"',
    ]
    if metrics:
        lines += ["[metrics]", "port = 0"]
    (root / "config").mkdir(exist_ok=True)
    (root / "config" / "settings.toml").write_text("\n".join(lines) + "\n")
    queue = MaildirQueue(root / "run" / "posts")
    queue.ensure()
    return queue


def push(queue: MaildirQueue, *subjects: str) -> None:
    async def main() -> None:
        for subject in subjects:
            await queue.push(message(subject))

    asyncio.run(main())


class WorkerProcess:
    """``maildefer worker --queue posts`` in ``root``; its JSON log in a file."""

    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self.log = root / "worker.log"
        environ = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MAILDEFER_", "NOTIFY_", "WATCHDOG_", "LISTEN_"))
        }
        environ.update(PYTHONPATH=str(ROOT), MAILDEFER_LOGGING__FORMAT="json", **env)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "maildefer", "worker", "--queue", "posts"],
                cwd=root,
                env=environ,
                stdout=subprocess.DEVNULL,
                stderr=out,
            )

    def events(self, name: str) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    out.append(event)
        return out

    def event(self, name: str) -> dict[str, object]:
        wait_for(
            lambda: self.events(name) or self.proc.poll() is not None, what=f"log event {name}"
        )
        found = self.events(name)
        assert found, f"worker exited ({self.proc.returncode}):\n{self.log.read_text()}"
        return found[0]

    def handled(self) -> list[str]:
        try:
            return (self.root / "handled").read_text().splitlines()
        except FileNotFoundError:
            return []

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def test_worker_notifies_ready_once_armed_watchdog_status_and_stopping(
    tmp_path: Path, notify: Notify
) -> None:
    queue = make_project(tmp_path)
    push(queue, "before")
    worker = WorkerProcess(tmp_path, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="200000")
    with contextlib.ExitStack() as stack:
        stack.callback(worker.kill)
        notify.wait("READY=1")
        # READY=1 comes after recovery and the first scan, not at process start.
        assert worker.events("worker_started")
        # A message landing right after READY=1 is picked up by the watcher: the next
        # rescan is a minute away.
        push(queue, "after")
        pushed = time.monotonic()
        wait_for(lambda: "after" in worker.handled(), timeout=10, what="the message after READY")
        assert time.monotonic() - pushed < 10
        assert "before" in worker.handled()
        notify.wait("WATCHDOG=1", count=2, timeout=5)
        assert "handled" in notify.wait("STATUS=", count=2)

        # SIGTERM with a handler running: STOPPING=1 at once, the handler then finishes.
        push(queue, "slow")
        wait_for((tmp_path / "slow-started").exists, what="the slow handler")
        worker.proc.send_signal(signal.SIGTERM)
        stopping = notify.wait("STOPPING=1", timeout=5)
        assert "slow" not in worker.handled()  # still draining
        pings = notify.count("WATCHDOG=1")
        notify.wait("WATCHDOG=1", count=pings + 1, timeout=5)  # still pinging in the drain
        assert worker.proc.wait(timeout=30) == 0
        assert "1 in flight" in stopping
        assert worker.handled() == ["before", "after", "slow"]
        order = [f.split("\n", 1)[0].split("=", 1)[0] for f in notify.fields]
        assert order.index("READY") < order.index("STOPPING")


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of a metrics endpoint: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_worker_metrics_endpoint_counts_handled_retried_and_pickup(tmp_path: Path) -> None:
    queue = make_project(tmp_path, metrics=True)
    push(queue, "one", "two", "fail")
    worker = WorkerProcess(tmp_path)
    with contextlib.ExitStack() as stack:
        stack.callback(worker.kill)
        port = int(worker.event("metrics_listening")["port"])  # type: ignore[call-overload]
        handler = {"side": "worker", "queue": "posts"}
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}

        def settled() -> bool:
            samples.clear()
            samples.update(scrape(port))
            return (
                value(samples, "maildefer_handler_duration_seconds_count", **handler) == 4
                and value(samples, "maildefer_retries_total", queue="posts") == 1
            )

        push(queue, "three")  # while the worker runs: through the watcher
        wait_for(settled, timeout=15, what="the worker's counters")
        assert sorted(worker.handled()) == ["one", "three", "two"]
        # Pickup latency: one observation per first attempt, push to claim.
        assert value(samples, "maildefer_pickup_latency_seconds_count", queue="posts") == 4
        assert value(samples, "maildefer_pickup_latency_seconds_sum", queue="posts") > 0
        assert value(samples, "maildefer_handler_duration_seconds_sum", **handler) > 0
        assert value(samples, "maildefer_in_flight", **handler) == 0
        # The failed message waits out its backoff in later/; nothing was buried.
        assert value(samples, "maildefer_queue_depth", queue="posts", state="later") == 1
        assert value(samples, "maildefer_queue_depth", queue="posts", state="new") == 0
        assert value(samples, "maildefer_undeliverable_total", queue="posts", reason="failed") == 0
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=30) == 0


@pytest.mark.skipif(
    not broker_up(), reason="no RabbitMQ on 127.0.0.1:5672 (rabbitmq-server -detached)"
)
async def test_worker_on_a_broker_queue_holds_only_as_many_messages_as_it_runs() -> None:
    import aio_pika

    from maildefer.queue.amqp import AmqpQueue
    from maildefer.worker import Worker

    name = f"t-ops-{os.getpid()}-{time.monotonic_ns()}"
    queue = AmqpQueue(f"{BROKER}?queue={name}", connect_timeout=2)
    raw = await aio_pika.connect(BROKER, timeout=2)
    release, two_running = asyncio.Event(), asyncio.Event()
    running: list[str] = []

    async def deliver(msg: object) -> None:
        running.append(str(msg))
        if len(running) >= 2:
            two_running.set()
        await release.wait()

    worker = Worker(queue, deliver, concurrency=2, grace_period=5)
    try:
        for i in range(6):
            await queue.push(message(str(i)))
        task = asyncio.create_task(worker.serve())
        await asyncio.wait_for(two_running.wait(), 10)
        await asyncio.wait_for(worker.ready.wait(), 1)
        channel = await raw.channel()
        declared = await channel.declare_queue(name, passive=True)
        # Prefetch = concurrency: the broker handed over 2, the other 4 wait for any
        # consumer (the default prefetch would have moved all 6 here).
        assert declared.declaration_result.message_count == 4
        await channel.close()
        release.set()
        worker.request_shutdown()
        stats = await asyncio.wait_for(task, 15)
        assert stats.handled >= 2
    finally:
        release.set()
        await queue.close()
        channel = await raw.channel()
        for queue_name in (
            name,
            f"{name}.undeliverable",
            *(queue.delay_name(b) for b in queue.delay_bases()),
        ):
            await channel.queue_delete(queue_name)
        await raw.close()
