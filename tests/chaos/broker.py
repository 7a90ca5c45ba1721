"""Broker faults for the chaos suite: the amqp work queue on a private RabbitMQ node.

The maildir runs kill processes; these runs also cut the broker out from under them:
``rabbitmqctl close_all_connections`` (every client's TCP connection dropped at once, as a
load balancer or a broker-side kill would) and ``stop_app``/``start_app`` (a broker
restart: no broker at all for a second or three). Always on a private node started by the
test (:mod:`helpers.rabbit_cluster`), never on the machine's broker.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter

import aio_pika
from helpers.rabbit_cluster import Cluster as Brokers
from helpers.rabbit_cluster import Node

from tests.chaos.harness import Cluster, Profile

# Traffic over ~12 s (short) or ~2 min (long), so that the faults land while mail flows.
SHORT = Profile(
    messages=300,
    min_kills=4,
    workers=2,
    fault_interval=(1.5, 3.0),
    hang_rate=0.0,
    deadline=100.0,
    send_interval=0.15,
)
LONG = Profile(
    messages=3000,
    min_kills=30,
    sessions=8,
    workers=3,
    fault_interval=(1.5, 4.0),
    hang_rate=0.0,
    deadline=600.0,
    send_interval=0.3,
)


def seq_in(body: bytes) -> int | None:
    """The ``X-Chaos-Seq`` number in a queued body (envelope + message), if any."""
    for line in body.split(b"\n"):
        if line.startswith(b"X-Chaos-Seq:"):
            return int(line.split(b":", 1)[1].strip())
    return None


class BrokerFaults:
    """Drop every broker connection or restart the broker, at random moments.

    No process is killed: a restarted worker subscribes afresh and would hide the failure
    this run looks for (a worker that outlives a broker fault but never consumes again).
    """

    kinds: tuple[str, ...] = ("drop-connections", "restart-broker")

    def __init__(self, node: Node) -> None:
        self.node = node

    def run(
        self, cluster: Cluster, rng: random.Random, stop: threading.Event, kills: Counter[str]
    ) -> None:
        """Until ``stop`` is set; each fault is counted once the broker is back."""
        lo, hi = cluster.profile.fault_interval
        # Both broker faults early on, in a random order, so even a short run has each.
        first = rng.sample(["drop-connections", "restart-broker"], 2)
        while not stop.wait(rng.uniform(lo, hi)):
            action = rng.choice(["drop-connections", "drop-connections", "restart-broker"])
            if first:
                action = first.pop()
            if action == "drop-connections":
                self.node.ctl("close_all_connections", "chaos: connection drop")
            else:
                self.node.stop_app()
                # Down for a moment: serve must answer 451 meanwhile, workers pause.
                stop.wait(rng.uniform(0.5, 3.0))
                self.node.start_app()
            kills[action] += 1


class AmqpProbe:
    """The work queue on the broker: its depth (ready + unacked) and its dead letters."""

    def __init__(self, brokers: Brokers, queue: str) -> None:
        self.brokers = brokers
        self.queue = queue

    def depths(self) -> dict[str, int]:
        """Messages (ready + unacked) in the work queue and each of its delay queues.

        From the broker's statistics (``list_queues``), which lag by up to
        ``collect_statistics_interval`` (250 ms on the private nodes).
        """
        for node in self.brokers.running():
            done = node.ctl("list_queues", "--quiet", "name", "messages", check=False)
            if done.returncode != 0:
                continue
            depths = {}
            for line in done.stdout.splitlines():
                name, _, count = line.rpartition("\t")
                if name == self.queue or name.startswith(f"{self.queue}.delay."):
                    depths[name] = int(count)
            return depths
        raise RuntimeError("no broker node answered list_queues")

    def pending(self) -> bool:
        """Whether the broker still holds work (queued, delayed or with a consumer).

        Ready messages are counted exactly (a passive declare); unacked ones only appear
        in the lagging statistics, so "empty" must hold twice, a second apart (a retry
        also moves a message between queues).
        """
        for _ in range(2):
            depths = self.depths()
            if sum(depths.values()) or sum(asyncio.run(self._ready(list(depths))).values()):
                return True
            time.sleep(1.0)
        return False

    def settle(self) -> tuple[set[int], Counter[str], list[str]]:
        """Take every dead letter (numbers and reasons); name the queues left non-empty.

        The daemons are gone by then, so nothing is unacked: the exact ready counts are
        everything left in each queue.
        """
        dead, reasons = asyncio.run(self._dead_letters())
        ready = asyncio.run(self._ready(list(self.depths())))
        return dead, reasons, [f"{name}: {n}" for name, n in ready.items() if n]

    async def _ready(self, names: list[str]) -> dict[str, int]:
        connection = await aio_pika.connect(self.brokers.running()[0].url, timeout=10)
        try:
            channel = await connection.channel()
            counts = {}
            for name in names:
                queue = await channel.declare_queue(name, passive=True)
                counts[name] = int(queue.declaration_result.message_count or 0)
            return counts
        finally:
            await connection.close()

    async def _dead_letters(self) -> tuple[set[int], Counter[str]]:
        node = self.brokers.running()[0]
        connection = await aio_pika.connect(node.url, timeout=10)
        dead: set[int] = set()
        reasons: Counter[str] = Counter()
        try:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(f"{self.queue}.undeliverable", passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return dead, reasons  # nothing was ever set aside: the queue was never made
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                seq = seq_in(message.body)
                if seq is not None:
                    dead.add(seq)
                headers = message.headers or {}
                deaths = headers.get("x-death")
                first = deaths[0] if isinstance(deaths, list) and deaths else None
                reason = headers.get("x-maildefer-reason") or (
                    first.get("reason") if isinstance(first, dict) else "?"
                )
                reasons[str(reason)] += 1
        finally:
            await connection.close()
        return dead, reasons
