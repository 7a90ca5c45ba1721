"""maildefer.ops.metrics: counters move, and the endpoint serves them over real HTTP."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from maildefer.ops.metrics import Metrics
from maildefer.queue.maildir import MaildirQueue


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_endpoint_on_port_zero_shows_counters_moving(tmp_path: Path) -> None:
    metrics = Metrics()
    port = await metrics.start_http("127.0.0.1", 0)
    try:
        assert port > 0 and metrics.port == port
        status, content_type, before = await asyncio.to_thread(scrape, port)
        assert status == 200 and content_type.startswith("text/plain")
        assert samples(before)[("maildefer_messages_received_total", ())] == 0

        for _ in range(3):
            metrics.message_received()
        metrics.message_accepted()
        metrics.message_refused(550)
        metrics.message_refused(451)
        metrics.message_refused(451)
        with metrics.handling("worker", "posts"):
            during = samples((await asyncio.to_thread(scrape, port))[2])
        with pytest.raises(RuntimeError), metrics.handling("serve"):
            raise RuntimeError("a handler failed: still timed, no longer in flight")
        metrics.instruments("worker", "posts").picked_up(queued_at=time.time() - 2.0)
        metrics.retried("posts")
        metrics.buried("posts", "poison")

        after = samples((await asyncio.to_thread(scrape, port))[2])
    finally:
        await metrics.stop_http()

    assert during[("maildefer_in_flight", (("queue", "posts"), ("side", "worker")))] == 1
    assert after[("maildefer_in_flight", (("queue", "posts"), ("side", "worker")))] == 0
    assert after[("maildefer_in_flight", (("queue", ""), ("side", "serve")))] == 0
    assert after[("maildefer_messages_received_total", ())] == 3
    assert after[("maildefer_messages_accepted_total", ())] == 1
    assert after[("maildefer_messages_refused_total", (("code", "550"),))] == 1
    assert after[("maildefer_messages_refused_total", (("code", "451"),))] == 2
    assert (
        after[("maildefer_handler_duration_seconds_count", (("queue", ""), ("side", "serve")))] == 1
    )
    assert (
        after[
            ("maildefer_handler_duration_seconds_count", (("queue", "posts"), ("side", "worker")))
        ]
        == 1
    )
    assert after[("maildefer_pickup_latency_seconds_sum", (("queue", "posts"),))] >= 2.0
    assert (
        after[("maildefer_pickup_latency_seconds_bucket", (("le", "1.0"), ("queue", "posts")))] == 0
    )
    assert after[("maildefer_retries_total", (("queue", "posts"),))] == 1
    assert after[("maildefer_undeliverable_total", (("queue", "posts"), ("reason", "poison")))] == 1


async def test_tracked_maildir_depth_is_counted_at_scrape(tmp_path: Path) -> None:
    queue = MaildirQueue(tmp_path / "posts", undeliverable=tmp_path / "dead")
    metrics = Metrics()
    metrics.track_queue("posts", queue)
    metrics.set_depth("broker", "new", 7)
    port = await metrics.start_http("127.0.0.1", 0)
    try:
        empty = samples((await asyncio.to_thread(scrape, port))[2])
        keys = [await queue.push(b"Subject: n\r\n\r\nbody\r\n") for _ in range(3)]
        claim = await queue.claim(keys[0])
        assert claim is not None
        full = samples((await asyncio.to_thread(scrape, port))[2])
    finally:
        await metrics.stop_http()
    assert empty[("maildefer_queue_depth", (("queue", "posts"), ("state", "new")))] == 0
    assert empty[("maildefer_queue_oldest_age_seconds", (("queue", "posts"),))] == 0
    assert full[("maildefer_queue_depth", (("queue", "posts"), ("state", "new")))] == 2
    assert full[("maildefer_queue_depth", (("queue", "posts"), ("state", "cur")))] == 1
    assert full[("maildefer_queue_depth", (("queue", "broker"), ("state", "new")))] == 7
    assert 0 <= full[("maildefer_queue_oldest_age_seconds", (("queue", "posts"),))] < 60


async def test_endpoint_answers_other_paths_and_methods_and_stops() -> None:
    metrics = Metrics()
    port = await metrics.start_http("127.0.0.1", 0)
    with pytest.raises(urllib.error.HTTPError) as missing:
        await asyncio.to_thread(scrape, port, "/nope")
    assert missing.value.code == 404
    missing.value.close()  # an HTTPError holds the response and its socket
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as post:
        await asyncio.to_thread(urllib.request.urlopen, request, None, 10)
    assert post.value.code == 405
    post.value.close()
    # A client that sends junk and hangs up does not take the endpoint down.
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x00garbage")
    writer.close()
    await writer.wait_closed()
    assert (await asyncio.to_thread(scrape, port, "/"))[0] == 200

    await metrics.stop_http()
    await metrics.stop_http()  # idempotent
    assert metrics.port is None
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_each_metrics_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.message_received()
    assert b"maildefer_messages_received_total 1.0" in a.exposition()[0]
    assert b"maildefer_messages_received_total 0.0" in b.exposition()[0]


async def test_openmetrics_is_negotiated() -> None:
    body, content_type = Metrics().exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


async def test_one_bundle_per_side_and_queue_records_on_the_same_children() -> None:
    metrics = Metrics()
    worker = metrics.instruments("worker", "posts")
    assert metrics.instruments("worker", "posts") is worker
    with metrics.handling("worker", "posts"):
        assert worker.in_flight._value.get() == 1
    worker.seconds.observe(0.5)  # what the worker does per message, on the bundle
    worker.picked_up(queued_at=10.0, now=10.5)
    with metrics.handling("serve"):
        pass
    after = samples(metrics.exposition()[0].decode())
    worker_labels = (("queue", "posts"), ("side", "worker"))
    assert after[("maildefer_handler_duration_seconds_count", worker_labels)] == 2
    assert after[("maildefer_in_flight", worker_labels)] == 0
    assert after[("maildefer_pickup_latency_seconds_count", (("queue", "posts"),))] == 1
    # serve never picks up: no empty pickup series for it on a scrape.
    assert ("maildefer_pickup_latency_seconds_count", (("queue", ""),)) not in after
