"""The chaos suite: nothing acknowledged is ever lost while processes are killed at random.

``make test`` runs the short profile; ``make chaos`` (``CHAOS_PROFILE=long``) the long one.
A failing run prints its seed: ``CHAOS_SEED=<seed> make chaos`` replays it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

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
