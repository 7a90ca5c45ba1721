"""The worker in-process: outcomes, backpressure, burst, a lossy or failing watcher."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from watchfiles import Change, awatch

from maildefer import logs
from maildefer.errors import NoRouteError, QueueError
from maildefer.mail import MailRequest
from maildefer.queue import QueueOptions
from maildefer.queue.config import QueueRegistry
from maildefer.queue.envelope import Envelope, wrap
from maildefer.queue.maildir import MaildirQueue
from maildefer.queue.maildir.feed import MaildirFeed
from maildefer.worker import Worker


def message(i: int) -> bytes:
    return f"From: a@x\r\nTo: u@example.com\r\nSubject: m{i}\r\n\r\nbody {i}\r\n".encode()


def drop_raw(queue: MaildirQueue, n: int, start: int = 0) -> None:
    """Drop ``n`` files into new/ fast (no fsync), with the envelope ``push`` writes."""
    queue.ensure()
    tmp, new = queue.dir("tmp"), queue.dir("new")
    envelope = Envelope("a@x", ["u@example.com"], "", time.time(), "u@example.com")
    for i in range(start, start + n):
        name = f"{int(time.time())}.M{i}P{os.getpid()}Q{i}.test"
        (tmp / name).write_bytes(wrap(message(i), envelope))
        os.rename(tmp / name, new / name)


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[io.StringIO]:
    """Log lines go to a buffer (rendering 20k lines into pytest's capture is slow)."""
    out = io.StringIO()
    logs.configure(level="info", fmt="json", stream=out)
    yield out
    structlog.reset_defaults()


async def until(predicate: Any, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def subjects_of(seen: list[MailRequest]) -> list[str]:
    return [m["Subject"] or "" for m in seen]


async def test_burst_handles_what_is_queued_and_returns(tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q")
    for i in range(50):
        await q.push(message(i))
    seen: list[MailRequest] = []

    async def deliver(m: MailRequest) -> None:
        seen.append(m)

    stats = await Worker(q, deliver, burst=True, concurrency=4).serve()
    assert stats.handled == 50
    assert sorted(subjects_of(seen)) == sorted(f"m{i}" for i in range(50))
    assert await q.count() == 0


@pytest.mark.parametrize("n", [5_000, pytest.param(20_000, marks=pytest.mark.slow)])
async def test_burst_of_files_dropped_at_once_none_missed(fast_dir: Path, n: int) -> None:
    q = MaildirQueue(fast_dir / "q")
    drop_raw(q, n)
    seen: set[str] = set()

    async def deliver(m: MailRequest) -> None:
        seen.add(m["Subject"] or "")

    stats = await Worker(q, deliver, burst=True, concurrency=16).serve()
    assert stats.handled == n
    assert len(seen) == n
    assert not list(q.scan_new())


async def test_live_worker_picks_up_a_burst_dropped_at_once(fast_dir: Path) -> None:
    q = MaildirQueue(fast_dir / "q", options=QueueOptions(rescan_interval=60.0))
    seen: set[str] = set()

    async def deliver(m: MailRequest) -> None:
        seen.add(m["Subject"] or "")

    worker = Worker(q, deliver, concurrency=8)
    run = asyncio.create_task(worker.serve())
    await worker.ready.wait()
    await asyncio.to_thread(drop_raw, q, 2000)
    await until(lambda: len(seen) == 2000, limit=30)
    worker.request_shutdown()
    stats = await run
    assert stats.handled == 2000


async def test_never_claims_more_than_its_slots(tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q")
    for i in range(20):
        await q.push(message(i))
    gate = asyncio.Event()
    running = 0

    async def deliver(m: MailRequest) -> None:
        nonlocal running
        running += 1
        await gate.wait()

    worker = Worker(q, deliver, concurrency=3)
    run = asyncio.create_task(worker.serve())
    await until(lambda: running == 3)
    await asyncio.sleep(0.1)  # time for a fourth claim, if the worker wrongly took one
    # Exactly three claimed (in cur/), the other seventeen untouched in new/.
    assert len(os.listdir(q.dir("cur"))) == 3
    assert sum(len(b) for b in q.scan_new()) == 17
    gate.set()
    await until(lambda: running == 20)
    worker.request_shutdown()
    assert (await run).handled == 20


async def lossy_awatch(*paths: Any, **kwargs: Any) -> AsyncIterator[set[tuple[Change, str]]]:
    """awatch that loses every other arrival in new/, as an inotify overflow would."""
    n = 0
    async for changes in awatch(*paths, **kwargs):
        kept = set()
        for change in sorted(changes, key=lambda c: c[1]):
            if change[0] == Change.added and os.path.basename(os.path.dirname(change[1])) == "new":
                n += 1
                if n % 2 == 0:
                    continue
            kept.add(change)
        yield kept


async def test_lost_events_are_caught_by_the_rescan(tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q", options=QueueOptions(rescan_interval=0.5), watch=lossy_awatch)
    seen: set[str] = set()

    async def deliver(m: MailRequest) -> None:
        seen.add(m["Subject"] or "")

    worker = Worker(q, deliver, concurrency=4)
    run = asyncio.create_task(worker.serve())
    await worker.ready.wait()
    for i in range(200):
        await q.push(message(i))
        if i % 20 == 0:
            await asyncio.sleep(0.05)  # separate batches, so the loss is per event
    await until(lambda: len(seen) == 200, limit=15)
    worker.request_shutdown()
    assert (await run).handled == 200


async def test_lossy_watcher_without_rescan_would_miss(tmp_path: Path) -> None:
    """The control for the test above: the rescan is what saves the lost events."""
    q = MaildirQueue(
        tmp_path / "q", options=QueueOptions(rescan_interval=3600.0), watch=lossy_awatch
    )
    seen: set[str] = set()

    async def deliver(m: MailRequest) -> None:
        seen.add(m["Subject"] or "")

    worker = Worker(q, deliver, concurrency=4)
    run = asyncio.create_task(worker.serve())
    await worker.ready.wait()
    for i in range(40):
        await q.push(message(i))
        await asyncio.sleep(0.02)  # separate batches, so the loss is per event
    await asyncio.sleep(0.5)  # time for the kept events to be handled before the stop
    worker.request_shutdown()
    await run
    assert 0 < len(seen) < 40


async def test_a_failing_watcher_is_rebuilt_and_the_queue_rescanned(tmp_path: Path) -> None:
    calls = 0

    async def flaky(*paths: Any, **kwargs: Any) -> AsyncIterator[set[tuple[Change, str]]]:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("watcher broke")
        async for changes in awatch(*paths, **kwargs):
            yield changes

    q = MaildirQueue(tmp_path / "q", options=QueueOptions(rescan_interval=3600.0), watch=flaky)
    seen: set[str] = set()

    async def deliver(m: MailRequest) -> None:
        seen.add(m["Subject"] or "")

    worker = Worker(q, deliver)
    run = asyncio.create_task(worker.serve())
    await until(lambda: calls >= 3)
    # Not worker.ready: that was set at the first failure already. This waits for the
    # rebuilt (third) watcher to arm, so the pushes below reach it.
    await asyncio.sleep(0.1)
    for i in range(10):
        await q.push(message(i))
    await until(lambda: len(seen) == 10)
    worker.request_shutdown()
    assert (await run).handled == 10


async def test_replaced_new_dir_gets_a_new_watcher(tmp_path: Path, quiet_logs: io.StringIO) -> None:
    q = MaildirQueue(tmp_path / "q", options=QueueOptions(rescan_interval=0.3))
    seen: set[str] = set()

    async def deliver(m: MailRequest) -> None:
        seen.add(m["Subject"] or "")

    worker = Worker(q, deliver)
    run = asyncio.create_task(worker.serve())
    await worker.ready.wait()
    # Replaced (a restore, an admin's mv): a new inode, which the old watch never sees.
    os.rename(q.dir("new"), tmp_path / "old-new")
    os.mkdir(q.dir("new"))
    os.rmdir(tmp_path / "old-new")
    await until(lambda: "watcher_stale" in quiet_logs.getvalue())
    await q.push(message(1))
    await until(lambda: "m1" in seen)
    worker.request_shutdown()
    assert (await run).handled == 1


async def test_raising_handler_is_retried_then_buried_with_the_traceback(tmp_path: Path) -> None:
    opts = QueueOptions(max_attempts=3, retry_delay=0.05, retry_max_delay=0.1)
    q = MaildirQueue(tmp_path / "q", options=opts, undeliverable=tmp_path / "dead")
    key = await q.push(message(1))
    attempts: list[float] = []

    async def deliver(m: MailRequest) -> None:
        attempts.append(time.monotonic())
        raise ValueError("handler exploded")

    worker = Worker(q, deliver)
    run = asyncio.create_task(worker.serve())
    dead = MaildirQueue(tmp_path / "dead")
    await until(lambda: dead.locate(key) is not None)
    worker.request_shutdown()
    stats = await run
    assert len(attempts) == 3
    assert all(b - a >= 0.035 for a, b in itertools.pairwise(attempts))
    assert (stats.failed, stats.retried, stats.buried) == (3, 2, 1)
    record = dead.error_record(key)
    assert record is not None
    assert record["reason"] == "failed" and record["attempts"] == 3
    assert "ValueError: handler exploded" in record["error"]
    assert "Traceback" in record["error"]


async def test_no_route_is_buried_at_once(tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q", undeliverable=tmp_path / "dead")
    key = await q.push(message(1))

    async def deliver(m: MailRequest) -> None:
        raise NoRouteError(f"no route matches {m.rcpt_to!r}")

    stats = await Worker(q, deliver, burst=True).serve()
    assert (stats.buried, stats.retried) == (1, 0)
    record = MaildirQueue(tmp_path / "dead").error_record(key)
    assert record is not None and "no route matches" in record["error"]


async def test_handler_timeout_counts_as_a_failure(tmp_path: Path) -> None:
    opts = QueueOptions(max_attempts=1)
    q = MaildirQueue(tmp_path / "q", options=opts, undeliverable=tmp_path / "dead")
    key = await q.push(message(1))

    async def deliver(m: MailRequest) -> None:
        await asyncio.sleep(10)

    stats = await Worker(q, deliver, burst=True, handler_timeout=0.1).serve()
    assert stats.buried == 1
    record = MaildirQueue(tmp_path / "dead").error_record(key)
    assert record is not None and "timed out after 0.1 s" in record["error"]


async def test_handler_timeout_never_cuts_the_ack(tmp_path: Path) -> None:
    """The timeout covers the handlers only: a slow ack after them still completes."""

    class SlowAck(MaildirQueue):
        async def ack(self, claim: Any) -> None:
            await asyncio.sleep(0.3)  # past the handler's deadline
            await super().ack(claim)

    q = SlowAck(tmp_path / "q", undeliverable=tmp_path / "dead")
    await q.push(message(1))

    async def deliver(m: MailRequest) -> None:
        await asyncio.sleep(0.05)

    stats = await Worker(q, deliver, burst=True, handler_timeout=0.1).serve()
    assert (stats.handled, stats.failed, stats.released) == (1, 0, 0)
    assert await q.count() == 0


async def test_handler_that_swallows_the_timeout_is_still_a_timeout(tmp_path: Path) -> None:
    opts = QueueOptions(max_attempts=1)
    q = MaildirQueue(tmp_path / "q", options=opts, undeliverable=tmp_path / "dead")
    key = await q.push(message(1))

    async def deliver(m: MailRequest) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    started = time.monotonic()
    stats = await Worker(q, deliver, burst=True, handler_timeout=0.1).serve()
    assert time.monotonic() - started < 5  # cancelled at its deadline, not after 10 s
    assert stats.buried == 1
    record = MaildirQueue(tmp_path / "dead").error_record(key)
    assert record is not None and "timed out after 0.1 s" in record["error"]


async def test_each_handler_gets_its_own_deadline(tmp_path: Path) -> None:
    """Handlers started later are not cut by an earlier handler's deadline."""
    q = MaildirQueue(tmp_path / "q", undeliverable=tmp_path / "dead")
    for i in range(6):
        await q.push(message(i))
    done: list[float] = []

    async def deliver(m: MailRequest) -> None:
        await asyncio.sleep(0.12)  # each under the 0.2 s timeout; 6 in a row are not
        done.append(time.monotonic())

    stats = await Worker(q, deliver, burst=True, concurrency=1, handler_timeout=0.2).serve()
    assert (stats.handled, stats.failed) == (6, 0)
    assert len(done) == 6


async def test_stop_finishes_in_flight_and_releases_past_the_grace(tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q")
    fast = await q.push(message(1))
    await asyncio.sleep(0.01)  # two distinct push times
    slow = await q.push(message(2))
    started: list[str] = []
    finished: list[str] = []

    async def deliver(m: MailRequest) -> None:
        subject = m["Subject"] or ""
        started.append(subject)
        await asyncio.sleep(0.3 if subject == "m1" else 30)
        finished.append(subject)

    worker = Worker(q, deliver, grace_period=0.6)
    run = asyncio.create_task(worker.serve())
    await until(lambda: len(started) == 2)
    worker.request_shutdown()
    stats = await run
    assert finished == ["m1"]
    assert (stats.handled, stats.released) == (1, 1)
    # The slow one is back in new/ with no attempt counted; the fast one is gone.
    assert q.locate(slow) == ("new", slow)
    assert q.locate(fast) is None


async def test_due_retry_is_promoted_by_the_timer(tmp_path: Path) -> None:
    opts = QueueOptions(retry_delay=0.3, retry_max_delay=0.3, rescan_interval=3600.0)
    q = MaildirQueue(tmp_path / "q", options=opts)
    await q.push(message(1))
    calls: list[float] = []

    async def deliver(m: MailRequest) -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("once")

    worker = Worker(q, deliver)
    run = asyncio.create_task(worker.serve())
    await until(lambda: len(calls) == 2, limit=5)
    worker.request_shutdown()
    stats = await run
    assert stats.handled == 1 and stats.retried == 1
    assert 0.2 <= calls[1] - calls[0] < 1.0  # due time (x0.8-1.2 jitter), not the rescan


async def test_handlers_share_the_registry_backends(tmp_path: Path) -> None:
    registry = QueueRegistry()
    q = registry.get(tmp_path / "q")
    assert isinstance(q, MaildirQueue)
    await q.push(message(1))
    backends: list[object] = []

    async def deliver(m: MailRequest) -> None:
        from maildefer.queue import Queue

        backends.append(Queue(tmp_path / "out").backend)
        backends.append(Queue(tmp_path / "out").backend)

    await Worker(q, deliver, burst=True, registry=registry).serve()
    assert backends[0] is backends[1]


async def test_feed_skips_dot_files_and_keeps_odd_names(tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q")
    q.ensure()
    for name in ("a.swp", "b~", ".hidden"):
        (q.dir("new") / name).write_bytes(message(0))
    names = [c.key async for c in MaildirFeed(q, burst=True).claims()]
    assert sorted(names) == ["a.swp", "b~"]


async def test_polling_mode_runs_no_watcher(tmp_path: Path) -> None:
    opts = QueueOptions(shared_fs=True, poll_interval=0.1)

    async def no_watch(*paths: Any, **kwargs: Any) -> AsyncIterator[set[tuple[Change, str]]]:
        raise AssertionError("no watcher in polling mode")
        yield set()  # pragma: no cover

    q = MaildirQueue(tmp_path / "q", options=opts, watch=no_watch)

    seen: set[str] = set()

    async def deliver(m: MailRequest) -> None:
        seen.add(m["Subject"] or "")

    worker = Worker(q, deliver)
    run = asyncio.create_task(worker.serve())
    await worker.ready.wait()
    await q.push(message(7))
    await until(lambda: "m7" in seen, limit=2)
    worker.request_shutdown()
    assert (await run).handled == 1


async def test_one_canonical_log_line_per_message(tmp_path: Path, quiet_logs: io.StringIO) -> None:
    q = MaildirQueue(tmp_path / "q", options=QueueOptions(max_attempts=1))
    ok = await q.push(message(1))
    bad = await q.push(message(2))

    async def deliver(m: MailRequest) -> None:
        if m["Subject"] == "m2":
            raise ValueError("nope")

    await Worker(q, deliver, burst=True, handlers=["app.handlers.index"]).serve()
    lines = [json.loads(line) for line in quiet_logs.getvalue().splitlines()]
    per_message = {line["key"]: line for line in lines if line["event"] == "message"}
    assert set(per_message) == {ok, bad}
    good = per_message[ok]
    assert good["outcome"] == "ok" and good["attempt"] == 1
    assert good["queue"] == q.url and good["handlers"] == ["app.handlers.index"]
    assert good["duration_ms"] >= 0 and good["latency_ms"] >= 0
    assert per_message[bad]["outcome"] == "buried"
    assert "ValueError: nope" in per_message[bad]["error"]
    summary = [line for line in lines if line["event"] == "worker_stopped"]
    assert len(summary) == 1 and summary[0]["handled"] == 1 and summary[0]["buried"] == 1


async def test_shared_fs_heartbeat_renews_in_flight_leases(tmp_path: Path) -> None:
    opts = QueueOptions(shared_fs=True, poll_interval=0.05, lease=0.3)
    q = MaildirQueue(tmp_path / "q", options=opts)
    await q.push(message(1))
    gate = asyncio.Event()
    started = asyncio.Event()

    async def deliver(m: MailRequest) -> None:
        started.set()
        await gate.wait()

    worker = Worker(q, deliver)
    run = asyncio.create_task(worker.serve())
    await started.wait()
    (claimed,) = os.listdir(q.dir("cur"))
    old = time.time() - 3600
    os.utime(q.dir("cur") / claimed, (old, old))
    # Within a lease/3 beat the claim looks fresh again, so no peer recovers it.
    await until(lambda: os.stat(q.dir("cur") / claimed).st_mtime > old + 3000, limit=2)
    gate.set()
    worker.request_shutdown()
    assert (await run).handled == 1


async def test_a_claim_whose_bury_failed_goes_back_to_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = QueueOptions(max_attempts=1)
    q = MaildirQueue(tmp_path / "q", options=opts, undeliverable=tmp_path / "dead")
    key = await q.push(message(1))
    calls: list[int] = []

    async def failing_bury(*args: object) -> None:
        calls.append(1)
        raise QueueError("undeliverable disk full")

    monkeypatch.setattr(q, "bury", failing_bury)
    monkeypatch.setattr(q, "retry", lambda claim, error: q.bury(claim, error, "failed"))

    async def deliver(m: MailRequest) -> None:
        raise ValueError("handler exploded")

    worker = Worker(q, deliver)
    worker.release_delay = 0.1
    run = asyncio.create_task(worker.serve())
    await until(lambda: len(calls) >= 2)  # given back to new/, claimed and failed again
    worker.request_shutdown()
    await run
    # Whatever happened last, the message is back in new/, not stranded in cur/.
    assert q.locate(key) is not None and q.locate(key)[0] == "new"  # type: ignore[index]
