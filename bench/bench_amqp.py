"""RabbitMQ backend figures beside the maildir ones, measured in the same run.

On the machine's broker (``amqp://guest:guest@127.0.0.1:5672/``, a quorum queue: Raft
log fsync'd before the publisher confirm), with fresh queue names deleted afterwards;
the maildir queues live in a temporary directory on the same disk as ``/tmp``. Each
figure is the best of a few rounds, amqp and maildir alternating (the machine is shared:
noise only ever slows a run down).

- **push** with publisher confirms, 4 KiB: 1 pusher (each ``push`` awaited before the
  next) and 10 concurrent pushers (``asyncio.gather`` on one ``Queue``), as a ratio to
  ``MaildirQueue.push`` (file and ``new/`` fsync'd) measured the same way.
- **pickup latency** p50/p99, from just before ``push`` is called to the start of the
  handler (``time.time()`` in it), messages 20 ms apart, an in-process ``Worker``
  (concurrency 8) on each backend; ratio to maildir's.
- **drain** msg/s: N messages already queued, an in-process ``Worker`` with a no-op
  handler (concurrency 8) from its start until it has handled all N; ratio to maildir.

Usage: ``python bench/bench_amqp.py [--quick]``; one JSON object per figure on stdout,
progress on stderr. Without a broker it prints one ``"figure": "skipped"`` line and
exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402

from maildefer import MailRequest, logs  # noqa: E402
from maildefer.queue import QueueOptions  # noqa: E402
from maildefer.queue.amqp import AmqpQueue  # noqa: E402
from maildefer.queue.backend import QueueBackend  # noqa: E402
from maildefer.queue.maildir import MaildirQueue  # noqa: E402
from maildefer.worker import Worker  # noqa: E402

BROKER = "amqp://guest:guest@127.0.0.1:5672/"
KIB = 1024
CONCURRENCY = 8


def note(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(
    figure: str,
    value: float,
    unit: str,
    baseline: str | None = None,
    base_value: float | None = None,
    goal: str | None = None,
) -> None:
    record = {
        "bench": "amqp",
        "figure": figure,
        "value": round(value, 3),
        "unit": unit,
        "baseline": baseline,
        "ratio": round(value / base_value, 3) if base_value else None,
        "goal": goal,
    }
    print(json.dumps(record), flush=True)


def message(size: int, subject: str = "bench") -> bytes:
    head = f"From: a@example.com\r\nTo: b@example.com\r\nSubject: {subject}\r\n\r\n".encode()
    return head + b"x" * max(0, size - len(head))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def broker_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


class Queues:
    """Fresh queues of both backends; every one made is removed at the end."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="maildefer-bench-amqp-"))
        self.names: list[str] = []
        self.opened: list[QueueBackend] = []

    def maildir(self) -> MaildirQueue:
        q = MaildirQueue(self.base / uuid.uuid4().hex[:8], undeliverable=self.base / "dead")
        self.opened.append(q)
        return q

    def amqp(self) -> AmqpQueue:
        name = f"bench-amqp-{uuid.uuid4().hex[:10]}"
        self.names += [name, f"{name}.undeliverable"]
        q = AmqpQueue(f"{BROKER}?queue={name}", options=QueueOptions(retry_delay=0.0))
        self.opened.append(q)
        return q

    async def close(self) -> None:
        import aio_pika

        for q in self.opened:
            await q.close()
        connection = await aio_pika.connect(BROKER, timeout=5)
        channel = await connection.channel()
        for name in self.names:
            await channel.queue_delete(name)
        await connection.close()
        shutil.rmtree(self.base, ignore_errors=True)


async def push_rate(q: QueueBackend, n: int, pushers: int) -> float:
    """msg/s of ``n`` pushes by ``pushers`` concurrent loops on one queue object."""
    body = message(4 * KIB)
    await q.push(body)  # connect (and declare) outside the timing
    per = n // pushers

    async def loop() -> None:
        for _ in range(per):
            await q.push(body)

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(pushers)))
    return per * pushers / (time.perf_counter() - start)


async def run_worker_until(worker: Worker, done: Callable[[], bool], limit: float) -> None:
    task = asyncio.create_task(worker.serve())
    deadline = time.monotonic() + limit
    try:
        while not done() and not task.done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not done within {limit} s")
            await asyncio.sleep(0.005)
    finally:
        worker.request_shutdown()
        await task


async def pickup(q: QueueBackend, n: int) -> list[float]:
    """Latencies (ms) from just before push to handler start, messages 20 ms apart."""
    started: dict[str, float] = {}
    all_started = asyncio.Event()

    async def handler(msg: MailRequest) -> None:
        started[str(msg["Subject"])] = time.time()
        if len(started) >= n:
            all_started.set()

    worker = Worker(q, handler, concurrency=CONCURRENCY)
    task = asyncio.create_task(worker.serve())
    await asyncio.sleep(0.5)  # consuming / watching
    pushed: dict[str, float] = {}
    try:
        for i in range(n):
            subject = f"m{i}"
            pushed[subject] = time.time()
            await q.push(message(4 * KIB, subject))
            await asyncio.sleep(0.02)
        with contextlib.suppress(TimeoutError):  # a lost one shows as fewer samples
            await asyncio.wait_for(all_started.wait(), 30)
    finally:
        worker.request_shutdown()
        await task
    return [(started[s] - pushed[s]) * 1000 for s in pushed if s in started]


async def drain_rate(q: QueueBackend, n: int) -> float:
    """msg/s of a worker (no-op handler) over ``n`` messages already queued."""
    body = message(4 * KIB)
    await asyncio.gather(*(_push_many(q, body, n // 10) for _ in range(10)))
    handled = 0

    async def handler(msg: MailRequest) -> None:
        nonlocal handled
        handled += 1

    worker = Worker(q, handler, concurrency=CONCURRENCY)
    start = time.perf_counter()
    await run_worker_until(worker, lambda: handled >= n // 10 * 10, limit=120)
    return handled / (time.perf_counter() - start)


async def _push_many(q: QueueBackend, body: bytes, n: int) -> None:
    for _ in range(n):
        await q.push(body)


async def main_async(quick: bool) -> None:
    queues = Queues()
    rounds = 2 if quick else 3
    try:
        n1 = 200 if quick else 500
        n10 = 500 if quick else 1000
        results: dict[str, list[float]] = {}
        for _ in range(rounds):  # alternating rounds, best of each
            for label, make in (("maildir", queues.maildir), ("amqp", queues.amqp)):
                results.setdefault(f"{label}_push_1", []).append(await push_rate(make(), n1, 1))
                results.setdefault(f"{label}_push_10", []).append(await push_rate(make(), n10, 10))
        for pushers in (1, 10):
            base = max(results[f"maildir_push_{pushers}"])
            emit(f"maildir_push_{pushers}_pushers_4k", base, "msg/s")
            emit(
                f"amqp_push_confirmed_{pushers}_pushers_4k",
                max(results[f"amqp_push_{pushers}"]),
                "msg/s",
                baseline=f"maildir_push_{pushers}_pushers_4k",
                base_value=base,
            )
        note("# push done")

        n_lat = 100 if quick else 200
        md_lat = await pickup(queues.maildir(), n_lat)
        amqp_lat = await pickup(queues.amqp(), n_lat)
        for p in (50, 99):
            base = percentile(md_lat, p)
            emit(f"maildir_pickup_p{p}", base, "ms")
            emit(
                f"amqp_pickup_p{p}",
                percentile(amqp_lat, p),
                "ms",
                baseline=f"maildir_pickup_p{p}",
                base_value=base,
            )
        note(f"# pickup done ({len(md_lat)} maildir, {len(amqp_lat)} amqp samples)")

        n_drain = 1000 if quick else 2000
        drains: dict[str, list[float]] = {"maildir": [], "amqp": []}
        for _ in range(2):
            drains["maildir"].append(await drain_rate(queues.maildir(), n_drain))
            drains["amqp"].append(await drain_rate(queues.amqp(), n_drain))
        base = max(drains["maildir"])
        emit(f"maildir_worker_drain_{n_drain}", base, "msg/s")
        emit(
            f"amqp_worker_drain_{n_drain}",
            max(drains["amqp"]),
            "msg/s",
            baseline=f"maildir_worker_drain_{n_drain}",
            base_value=base,
        )
        note("# drain done")
    finally:
        await queues.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer messages and rounds")
    args = parser.parse_args()
    if not broker_up():
        print(
            json.dumps(
                {
                    "bench": "amqp",
                    "figure": "skipped",
                    "value": 0,
                    "unit": "-",
                    "baseline": None,
                    "ratio": None,
                    "goal": "no RabbitMQ on 127.0.0.1:5672",
                }
            )
        )
        return 0
    logs.configure(level="error", fmt="json")  # the worker's info lines would be noise
    try:
        asyncio.run(main_async(args.quick))
    finally:
        structlog.reset_defaults()
    return 0


if __name__ == "__main__":
    sys.exit(main())
