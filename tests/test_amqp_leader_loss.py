"""Pushing through the loss of a quorum queue's leader node, on a private 3-node cluster.

The cluster (``rabbit_cluster``, :mod:`helpers.rabbit_cluster`) is started for this module
(about 25 s); the test kills one of its nodes, so it is the module's only test.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from helpers.rabbit_cluster import Cluster

from maildefer.errors import QueueError
from maildefer.queue.amqp import AmqpQueue


@pytest.mark.slow
async def test_pushes_succeed_again_soon_after_the_leader_node_is_killed(
    rabbit_cluster: Cluster,
) -> None:
    name = f"leader-{uuid.uuid4().hex[:8]}"
    q = AmqpQueue(rabbit_cluster.url(name), connect_timeout=1, publish_timeout=2)
    try:
        await q.push(b"Subject: before\r\n\r\n")
        leader = rabbit_cluster.leader_of(name)
        await asyncio.to_thread(leader.kill)
        killed_at = time.monotonic()
        failures = 0
        while True:
            try:
                await q.push(b"Subject: after\r\n\r\n")
                break
            except QueueError:  # a 451 for serve: the sender retries
                failures += 1
                assert time.monotonic() - killed_at < 20, f"still failing after {failures}"
                await asyncio.sleep(0.1)
        # Not a lucky one: every push from now on is confirmed (a channel left with a
        # stale view of the queue nacked every one of them, for as long as it lived).
        for _ in range(50):
            await q.push(b"Subject: steady\r\n\r\n")
        assert await q.count() == 52
    finally:
        await q.close()
