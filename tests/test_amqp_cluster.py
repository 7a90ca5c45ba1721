"""A private 3-node RabbitMQ cluster on loopback: it forms, and losing a node loses nothing.

The cluster (:mod:`helpers.rabbit_cluster`) is started once for the module (18 s on an idle host).
The node-loss run is the acceptance test of issue 14: serve and two workers on the
multi-host URL, numbered mail over SMTP with MTA-like retries, SIGKILL of the node leading
the quorum queue mid-run, then the checker of the chaos suite (lost = 0).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import aio_pika
import pytest
from helpers.broker import broker_up
from helpers.rabbit_cluster import Cluster as Brokers
from helpers.rabbit_cluster import (
    Node,
    accepts,
    rabbitmq_missing,
    running_members,
    start_cluster,
)

from tests.chaos.broker import AmqpProbe
from tests.chaos.harness import Cluster, Profile, handled_counts, run_chaos
from tests.chaos.project import ChaosProject, make_project

# The module's cluster forms within the first test's timeout: ~20 s alone, a minute or more
# when other tests load the machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NODE_LOSS = Profile(
    messages=300,
    min_kills=1,
    sessions=4,
    workers=2,
    fail_rate=0.0,
    hang_rate=0.0,
    deadline=60.0,
    # ~8 s of traffic: the kill comes after a sixth of it is handled, the rest flows after.
    send_interval=0.1,
)


def test_a_private_node_runs_apart_and_leaves_nothing_behind(tmp_path: Path) -> None:
    if rabbitmq_missing():
        pytest.skip(str(rabbitmq_missing()))
    machine_broker_was_up = broker_up()
    brokers = start_cluster(1, tmp_path / "rabbit")
    node = brokers.nodes[0]
    try:
        assert node.port != 5672 and node.alive()
        assert running_members(node) == [node.name]
        assert accepts(node.port)
    finally:
        brokers.close()
        brokers.close()  # idempotent
    assert not Path(f"/proc/{node.pid}").exists()
    assert not (tmp_path / "rabbit").exists()
    # The machine's broker was not touched.
    assert broker_up() == machine_broker_was_up


def test_three_nodes_form_one_cluster(rabbit_cluster: Brokers) -> None:
    names = sorted(node.name for node in rabbit_cluster.nodes)
    assert len(set(names)) == 3
    for node in rabbit_cluster.nodes:
        assert sorted(running_members(node)) == names
    # None of them is the machine's broker.
    assert all(node.port != 5672 for node in rabbit_cluster.nodes)


async def test_a_quorum_queue_gets_a_leader_on_one_node(rabbit_cluster: Brokers) -> None:
    name = f"t-cluster-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(rabbit_cluster.nodes[1].url, timeout=10)
    try:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        info = rabbit_cluster.queue_info(name)
        assert info["type"] == "quorum"
        # Replicated on every node, led by one of them.
        assert sorted(info["members"]) == sorted(n.name for n in rabbit_cluster.nodes)  # type: ignore[call-overload]
        assert rabbit_cluster.leader_of(name) in rabbit_cluster.nodes
        await channel.queue_delete(name)
    finally:
        await connection.close()


class LeaderKill:
    """Once the flow is established, SIGKILL the node leading the work queue (once)."""

    kinds: tuple[str, ...] = ("kill-leader",)

    def __init__(self, brokers: Brokers, queue: str, project: ChaosProject) -> None:
        self.brokers = brokers
        self.queue = queue
        self.project = project
        self.killed: Node | None = None
        self.killed_at = 0.0
        self.handled_at_kill = 0

    def run(
        self, cluster: Cluster, rng: random.Random, stop: threading.Event, kills: Counter[str]
    ) -> None:
        """Wait for a sixth of the messages to be handled, then kill the leader."""
        while not stop.wait(0.1):
            handled = len(handled_counts(self.project))
            if handled >= cluster.profile.messages // 6:
                break
        else:
            return
        self.killed = self.brokers.leader_of(self.queue)
        self.handled_at_kill = handled
        self.killed_at = time.monotonic()
        self.killed.kill()
        kills["kill-leader"] += 1


@pytest.mark.chaos
def test_losing_the_leader_node_loses_nothing(rabbit_cluster: Brokers, tmp_path: Path) -> None:
    queue = f"node-loss-{uuid.uuid4().hex[:8]}"
    project = make_project(tmp_path / "project", queue=rabbit_cluster.url(queue))
    faults = LeaderKill(rabbit_cluster, queue, project)
    result = run_chaos(
        project,
        NODE_LOSS,
        random.randrange(1 << 31),
        faults=faults,
        probe=AmqpProbe(rabbit_cluster, queue),
    )
    print(result.summary(), "killed:", faults.killed)
    assert faults.killed is not None and not faults.killed.alive(), result.summary()
    # Every number that got 250 was handled (nothing is set aside in this run).
    assert result.lost == [], result.summary()
    assert result.undeliverable == 0, result.summary()
    # A lost node is a 4xx at worst (the sender retries), never a 5xx.
    assert result.refused == {}, result.summary()
    assert result.acked == NODE_LOSS.messages, result.summary()
    # The flow resumed by itself: 250s and handled messages after the kill, with the
    # same processes (none exited on its own).
    assert any(t > faults.killed_at for t in result.acked_at.values()), result.summary()
    assert result.handled > faults.handled_at_kill, result.summary()
    assert result.self_exits == 0, result.summary()
    assert not result.leftovers, result.summary()
