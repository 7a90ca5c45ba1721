"""The chaos suite: nothing acknowledged is ever lost while processes are killed at random.

``make test`` runs the short profile; ``make chaos`` (``CHAOS_PROFILE=long``) the long one.
A failing run prints its seed: ``CHAOS_SEED=<seed> make chaos`` replays it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from helpers.rabbit_cluster import Cluster as Brokers
from helpers.rabbit_cluster import Node

from tests.chaos.broker import LONG as BROKER_LONG
from tests.chaos.broker import SHORT as BROKER_SHORT
from tests.chaos.broker import AmqpProbe, BrokerFaults
from tests.chaos.harness import LONG, SHORT, run_chaos
from tests.chaos.project import make_project

pytestmark = pytest.mark.chaos


@pytest.mark.timeout(1200)
def test_nothing_acknowledged_is_lost_under_kills(tmp_path: Path) -> None:
    profile = LONG if os.environ.get("CHAOS_PROFILE") == "long" else SHORT
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1 << 31))
    project = make_project(tmp_path / "project")
    result = run_chaos(project, profile, seed)
    print(result.summary())
    assert sum(result.kills.values()) >= profile.min_kills, result.summary()
    # Every number that got 250 was handled or set aside with a recorded reason.
    assert result.lost == [], result.summary()
    # Almost every message got through despite the faults (a 5xx would be a bug).
    assert result.acked >= profile.messages * 0.95, result.summary()
    assert not result.leftovers, result.summary()
    # Each message set aside has its reason recorded beside it.
    assert sum(result.reasons.values()) == result.undeliverable, result.summary()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_nothing_acknowledged_is_lost_under_broker_faults(
    tmp_path: Path, rabbit_node: Node
) -> None:
    """An amqp run on a private broker whose connections are dropped and which restarts.

    The same serve and workers throughout: each must pause and resume by itself.
    """
    profile = BROKER_LONG if os.environ.get("CHAOS_PROFILE") == "long" else BROKER_SHORT
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1 << 31))
    queue = f"chaos-{seed}"
    brokers = Brokers(nodes=[rabbit_node], base=rabbit_node.base)
    project = make_project(tmp_path / "project", queue=f"{rabbit_node.url}?queue={queue}")
    result = run_chaos(
        project,
        profile,
        seed,
        faults=BrokerFaults(rabbit_node),
        probe=AmqpProbe(brokers, queue),
    )
    print(result.summary())
    assert result.kills["drop-connections"] >= 1, result.summary()
    assert result.kills["restart-broker"] >= 1, result.summary()
    assert result.lost == [], result.summary()
    # The broker being away is a 4xx (the sender retries), never a 5xx.
    assert result.refused == {}, result.summary()
    assert result.acked == profile.messages, result.summary()
    assert not result.leftovers, result.summary()
    # Workers pause and resume by themselves; none exits because the broker went away.
    assert result.self_exits == 0, result.summary()
