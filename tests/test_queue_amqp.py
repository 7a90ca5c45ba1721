"""The RabbitMQ backend against the real broker on 127.0.0.1:5672 (skipped without one).

Every test uses queues of its own (a uuid in the name) and deletes them afterwards.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from helpers.broker import BROKER, needs_broker

from maildefer.errors import ConfigError, QueueError
from maildefer.mail import MailRequest
from maildefer.queue import Queue, QueueOptions
from maildefer.queue.amqp import AmqpQueue
from maildefer.queue.backend import Claim, QueueBackend
from maildefer.queue.config import open_backend
from maildefer.queue.envelope import Envelope, unwrap, wrap

PROJECT_ROOT = Path(__file__).resolve().parent.parent


MakeQueue = Callable[..., AmqpQueue]


@pytest.fixture
async def raw() -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A plain connection to the broker, to look at queues behind the backend's back."""
    connection = await aio_pika.connect(BROKER, timeout=2)
    yield connection
    await connection.close()


@pytest.fixture
async def make_queue(raw: aio_pika.abc.AbstractConnection) -> AsyncIterator[MakeQueue]:
    """Factory of AmqpQueues on one fresh queue name; everything is deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    made: list[AmqpQueue] = []

    def make(**options: Any) -> AmqpQueue:
        opts = QueueOptions(**options)
        queue = AmqpQueue(f"{BROKER}?queue={name}", options=opts, connect_timeout=2)
        made.append(queue)
        return queue

    yield make
    for queue in made:
        await queue.close()
    channel = await raw.channel()
    delays = {q.delay_name(b) for q in made for b in q.delay_bases()}
    for queue_name in [name, f"{name}.undeliverable", *delays]:
        await channel.queue_delete(queue_name)
    await channel.close()


async def ready_count(raw: aio_pika.abc.AbstractConnection, name: str) -> int:
    channel = await raw.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await channel.close()


async def raw_get(
    raw: aio_pika.abc.AbstractConnection, name: str, within: float = 5.0
) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message of a queue (acked), polling until ``timeout``."""
    channel = await raw.channel()
    try:
        queue = await channel.get_queue(name, ensure=False)
        deadline = time.monotonic() + within
        while True:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                return message
            assert time.monotonic() < deadline, f"nothing arrived in {name} within {within}s"
            await asyncio.sleep(0.05)
    finally:
        await channel.close()


async def next_claim(claims: AsyncIterator[Claim], within: float = 5.0) -> Claim:
    return await asyncio.wait_for(anext(claims), within)


def corpus_message() -> bytes:
    paths = sorted((Path(__file__).resolve().parent / "corpus").glob("*.eml"))
    if paths:
        return paths[0].read_bytes()
    return b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


# -- without a broker ----------------------------------------------------------------------


def test_url_needs_a_queue_name() -> None:
    with pytest.raises(ConfigError, match=r"\?queue=NAME"):
        AmqpQueue("amqp://guest:guest@127.0.0.1:5672/")
    with pytest.raises(ConfigError, match="amqp"):
        AmqpQueue("http://127.0.0.1/?queue=x")


def test_open_backend_picks_amqp_without_connecting() -> None:
    backend = open_backend(
        "amqps://u:p@127.0.0.1:1/vh?queue=posts&heartbeat=5",
        options=QueueOptions(max_recoveries=4),
        undeliverable="run/undeliverable",
    )
    assert isinstance(backend, AmqpQueue)
    assert isinstance(backend, QueueBackend)
    assert (backend.name, backend.dead_name) == ("posts", "posts.undeliverable")
    assert backend.connection_url == "amqps://u:p@127.0.0.1:1/vh?heartbeat=5"
    assert backend.options.max_recoveries == 4
    named = AmqpQueue("amqp://h/?queue=a", undeliverable="amqp://h/?queue=dead.letters")
    assert named.dead_name == "dead.letters"


async def test_browsing_is_refused_honestly() -> None:
    q = AmqpQueue("amqp://127.0.0.1:1/?queue=x")
    for call in (q.keys(), q.get("k"), q.remove("k")):
        with pytest.raises(QueueError, match="not supported on amqp queues"):
            await call


async def test_unreachable_broker_is_a_queue_error() -> None:
    q = AmqpQueue("amqp://guest:guest@127.0.0.1:1/?queue=x", connect_timeout=2)
    with pytest.raises(QueueError, match="cannot connect"):
        await q.push(b"Subject: x\r\n\r\n")


# -- with the broker -----------------------------------------------------------------------


@needs_broker
async def test_push_count_pop_round_trip_is_byte_exact(make_queue: MakeQueue) -> None:
    q = make_queue()
    raw_bytes = corpus_message()
    request = MailRequest(
        raw_bytes,
        mail_from="sender@example.org",
        rcpt_tos=["a@example.org", "bcc@example.net"],
        peer="127.0.0.1:4444",
        received_at=1700000000.5,
        rcpt_to="bcc@example.net",
    )
    key = await q.push(request)
    assert await q.count() == 1
    popped = await q.pop()
    assert popped is not None
    got_key, message = popped
    assert got_key == key
    assert message.raw == raw_bytes
    assert (message.mail_from, message.rcpt_tos, message.rcpt_to) == (
        "sender@example.org",
        ["a@example.org", "bcc@example.net"],
        "bcc@example.net",
    )
    assert await q.count() == 0
    assert await q.pop() is None


@needs_broker
async def test_push_returns_after_the_broker_has_the_message(
    make_queue: MakeQueue, raw: aio_pika.abc.AbstractConnection
) -> None:
    q = make_queue()
    keys = await asyncio.gather(*(q.push(b"Subject: %d\r\n\r\n" % i) for i in range(20)))
    # Another connection sees every confirmed message at once: no sleep, no poll.
    assert await ready_count(raw, q.name) == 20
    message = await raw_get(raw, q.name)
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id in keys
    envelope, original = unwrap(message.body)
    assert envelope is not None and original.startswith(b"Subject: ")


@needs_broker
async def test_push_to_a_vanished_queue_raises_instead_of_losing(
    make_queue: MakeQueue, raw: aio_pika.abc.AbstractConnection
) -> None:
    q = make_queue()
    await q.push(b"Subject: first\r\n\r\n")
    channel = await raw.channel()
    await channel.queue_delete(q.name)
    await channel.close()
    with pytest.raises(QueueError, match="publish"):
        await q.push(b"Subject: second\r\n\r\n")


@needs_broker
async def test_consume_and_ack(make_queue: MakeQueue) -> None:
    q = make_queue()
    q.set_prefetch(2)
    keys = {await q.push(b"Subject: %d\r\n\r\n" % i) for i in range(3)}
    claims = q.consume()
    seen = set()
    for _ in range(3):
        claim = await next_claim(claims)
        assert (claim.attempts, claim.recoveries) == (0, 0)
        assert claim.queued_at is not None and abs(claim.queued_at - time.time()) < 60
        seen.add(claim.key)
        await q.ack(claim)
    await claims.aclose()  # type: ignore[attr-defined]
    assert seen == keys
    await q.close()
    # Acked means gone: a fresh connection finds nothing.
    assert await make_queue().count() == 0


@needs_broker
async def test_two_consumers_get_distinct_messages(make_queue: MakeQueue) -> None:
    a, b = make_queue(), make_queue()
    a.set_prefetch(1)
    b.set_prefetch(1)
    keys = {await a.push(b"Subject: %d\r\n\r\n" % i) for i in range(6)}
    claims_a, claims_b = a.consume(), b.consume()
    # Each holds one unacked message: with prefetch 1 the broker must give B another.
    first_a = await next_claim(claims_a)
    first_b = await next_claim(claims_b)
    assert first_a.key != first_b.key
    got = {first_a.key: "a", first_b.key: "b"}
    await a.ack(first_a)
    await b.ack(first_b)

    async def drain(q: AmqpQueue, claims: AsyncIterator[Claim], label: str) -> None:
        while len(got) < len(keys):
            try:
                claim = await next_claim(claims, within=0.5)
            except TimeoutError:
                continue
            assert claim.key not in got, "a message was handed to two consumers"
            got[claim.key] = label
            await q.ack(claim)

    await asyncio.wait_for(
        asyncio.gather(drain(a, claims_a, "a"), drain(b, claims_b, "b")), timeout=10
    )
    assert set(got) == keys
    for claims in (claims_a, claims_b):
        await claims.aclose()  # type: ignore[attr-defined]


@needs_broker
async def test_unacked_message_of_a_closed_consumer_goes_to_another(
    make_queue: MakeQueue,
) -> None:
    dying, survivor = make_queue(), make_queue()
    key = await dying.push(b"Subject: at least once\r\n\r\n")
    claims = dying.consume()
    claim = await next_claim(claims)
    assert claim.key == key
    await dying.close()  # the connection goes without an ack
    await claims.aclose()  # type: ignore[attr-defined]
    again = await next_claim(survivor.consume())
    assert again.key == key
    assert again.message.raw == b"Subject: at least once\r\n\r\n"
    # One death: counted as a recovery and as an attempt, like maildir's recover.
    assert (again.recoveries, again.attempts) == (1, 1)
    await survivor.ack(again)
    assert await survivor.count() == 0


@needs_broker
async def test_release_gives_back_without_counting(make_queue: MakeQueue) -> None:
    q = make_queue()
    q.set_prefetch(3)
    keys = {await q.push(b"Subject: %d\r\n\r\n" % i) for i in range(3)}
    claims = q.consume()
    released = await next_claim(claims)
    await q.release(released)
    seen = {}
    for _ in range(3):
        c = await next_claim(claims)
        seen[c.key] = (c.attempts, c.recoveries)
        await q.ack(c)
    await claims.aclose()  # type: ignore[attr-defined]
    assert set(seen) == keys
    # A nack-requeue would have counted a delivery (and toward the poison limit).
    assert seen[released.key] == (0, 0)
    assert set(seen.values()) == {(0, 0)}


@needs_broker
async def test_closing_the_iterator_hands_back_buffered_messages(make_queue: MakeQueue) -> None:
    q = make_queue()
    q.set_prefetch(3)
    keys = {await q.push(b"Subject: %d\r\n\r\n" % i) for i in range(3)}
    claims = q.consume()
    first = await next_claim(claims)
    await q.ack(first)
    # Wait until the broker has handed the other two to this consumer (none ready).
    for _ in range(250):
        if await q.count() == 0:
            break
        await asyncio.sleep(0.02)
    await claims.aclose()  # type: ignore[attr-defined]
    assert await q.count() == 2
    claims = q.consume()
    rest = [await next_claim(claims) for _ in range(2)]
    await claims.aclose()  # type: ignore[attr-defined]
    assert {c.key for c in rest} == keys - {first.key}
    assert [(c.attempts, c.recoveries) for c in rest] == [(0, 0), (0, 0)]


@needs_broker
async def test_retry_comes_back_later_with_one_more_attempt(make_queue: MakeQueue) -> None:
    q = make_queue(retry_delay=0.3, retry_max_delay=0.5, max_attempts=5)
    key = await q.push(b"Subject: flaky\r\n\r\n")
    claims = q.consume()
    claim = await next_claim(claims)
    failed_at = time.monotonic()
    assert await q.retry(claim, "boom 1") is True
    assert await q.count() == 1  # waiting in its delay queue
    claim = await next_claim(claims)
    first_wait = time.monotonic() - failed_at
    assert (claim.key, claim.attempts, claim.recoveries) == (key, 1, 0)
    assert claim.message.raw == b"Subject: flaky\r\n\r\n"
    assert 0.8 * 0.3 - 0.05 <= first_wait < 3.0
    failed_at = time.monotonic()
    assert await q.retry(claim, "boom 2") is True
    claim = await next_claim(claims)
    # Doubled, but capped by retry_max_delay (0.6 > 0.5): at least 0.8 * 0.5.
    assert time.monotonic() - failed_at >= 0.8 * 0.5 - 0.05
    assert claim.attempts == 2
    await q.ack(claim)
    await claims.aclose()  # type: ignore[attr-defined]
    assert await q.count() == 0


@needs_broker
async def test_max_attempts_buries_with_the_error(
    make_queue: MakeQueue, raw: aio_pika.abc.AbstractConnection
) -> None:
    q = make_queue(retry_delay=0.05, retry_max_delay=0.05, max_attempts=2)
    key = await q.push(b"Subject: doomed\r\n\r\n")
    claims = q.consume()
    assert await q.retry(await next_claim(claims), "boom 1") is True
    claim = await next_claim(claims)
    assert claim.attempts == 1
    assert await q.retry(claim, "Traceback: boom 2") is False
    await claims.aclose()  # type: ignore[attr-defined]
    dead = await raw_get(raw, q.dead_name)
    headers = dead.headers
    assert dead.message_id == key
    assert headers["x-maildefer-error"] == "Traceback: boom 2"
    assert headers["x-maildefer-reason"] == "failed"
    assert headers["x-maildefer-attempts"] == 2
    assert headers["x-maildefer-queue"] == q.name
    assert unwrap(dead.body)[1] == b"Subject: doomed\r\n\r\n"
    assert await q.count() == 0


@needs_broker
async def test_corrupt_message_is_buried_and_others_flow(
    make_queue: MakeQueue, raw: aio_pika.abc.AbstractConnection
) -> None:
    q = make_queue()
    await q.count()  # declares the queues
    good = wrap(b"Subject: fine\r\n\r\n", Envelope("a@x", ["b@y"]))
    bad = wrap(b"Subject: fine\r\n\r\n", Envelope("a@x", ["b@y"])).replace(b"fine", b"f1ne")
    channel = await raw.channel()
    for body in (bad, good):
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=q.name)
    await channel.close()
    claims = q.consume()
    claim = await next_claim(claims)
    assert claim.message.raw == b"Subject: fine\r\n\r\n"
    await q.ack(claim)
    await claims.aclose()  # type: ignore[attr-defined]
    dead = await raw_get(raw, q.dead_name)
    assert dead.headers["x-maildefer-reason"] == "corrupt"
    assert dead.body == bad


POISON_CONSUMER = textwrap.dedent(
    """
    import asyncio, os, sys
    from maildefer.queue import QueueOptions
    from maildefer.queue.amqp import AmqpQueue

    async def main():
        q = AmqpQueue(sys.argv[1], options=QueueOptions(max_recoveries=3))
        claims = q.consume()
        try:
            claim = await asyncio.wait_for(anext(claims), 3)
        except TimeoutError:
            print("nothing", flush=True)
            os._exit(0)
        print(claim.key, claim.recoveries, flush=True)
        os._exit(1)  # dies holding the message, as a handler crashing the process would

    asyncio.run(main())
    """
)


@needs_broker
async def test_poison_is_dead_lettered_after_three_deaths(
    make_queue: MakeQueue, raw: aio_pika.abc.AbstractConnection
) -> None:
    q = make_queue(max_recoveries=3)
    key = await q.push(b"Subject: kills workers\r\n\r\n")

    async def crash_once() -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            POISON_CONSUMER,
            q.url,
            stdout=subprocess.PIPE,
            cwd=PROJECT_ROOT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
        return out.decode().strip()

    outputs = [await crash_once() for _ in range(3)]
    assert outputs == [f"{key} 0", f"{key} 1", f"{key} 2"]
    dead = await raw_get(raw, q.dead_name)
    assert dead.message_id == key
    assert dead.headers["x-first-death-reason"] == "delivery_limit"
    assert await q.count() == 0
    # Other messages still flow.
    other = await q.push(b"Subject: ok\r\n\r\n")
    claims = q.consume()
    claim = await next_claim(claims)
    assert claim.key == other
    await q.ack(claim)
    await claims.aclose()  # type: ignore[attr-defined]


@needs_broker
async def test_clear_purges_waiting_and_delayed(make_queue: MakeQueue) -> None:
    q = make_queue(retry_delay=30)
    for i in range(3):
        await q.push(b"Subject: %d\r\n\r\n" % i)
    claims = q.consume()
    assert await q.retry(await next_claim(claims), "later") is True
    await claims.aclose()  # type: ignore[attr-defined]
    assert await q.count() == 3
    assert await q.clear() == 3
    assert await q.count() == 0
    assert await q.pop() is None


@needs_broker
async def test_queue_facade_on_a_url(make_queue: MakeQueue) -> None:
    name = make_queue().name
    queue = Queue(f"{BROKER}?queue={name}")
    try:
        key = await queue.push(b"Subject: facade\r\n\r\n")
        assert await queue.count() == 1
        popped = await queue.pop()
        assert popped is not None and popped[0] == key
    finally:
        await queue.backend.close()


@needs_broker
async def test_deaths_carried_by_a_retried_copy_still_make_poison(
    make_queue: MakeQueue, raw: aio_pika.abc.AbstractConnection
) -> None:
    # The broker's delivery limit counts per copy; the header carries earlier deaths.
    q = make_queue(max_recoveries=3)
    await q.count()  # declares the queues
    body = wrap(b"Subject: crashed twice\r\n\r\n", Envelope("a@x", ["b@y"]))
    channel = await raw.channel()
    for recoveries, key in ((3, "poisoned"), (0, "fine")):
        message = aio_pika.Message(
            body, message_id=key, headers={"x-maildefer-recoveries": recoveries}
        )
        await channel.default_exchange.publish(message, routing_key=q.name)
    await channel.close()
    claims = q.consume()
    claim = await next_claim(claims)
    assert claim.key == "fine"
    await q.ack(claim)
    await claims.aclose()  # type: ignore[attr-defined]
    dead = await raw_get(raw, q.dead_name)
    assert dead.message_id == "poisoned"
    assert dead.headers["x-maildefer-reason"] == "poison"
