"""The index handler, run by a worker on the posts queue, through maildefer's test kit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from app.handlers import index
from maildefer.testing import RouterConversation
from maildefer.testing.kit import TestQueues

Conversations = Callable[[str], RouterConversation]


async def test_a_queued_post_is_indexed(
    maildefer_conversation: Conversations, maildefer_queues: TestQueues
) -> None:
    await maildefer_conversation("ann@writers.org").say("hello@example.com", "First post")
    stats = await maildefer_queues.run("posts")
    assert (stats.handled, stats.failed) == (1, 0)
    lines = Path("run/posts.index").read_text().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("\tann@writers.org\tFirst post")
    assert await maildefer_queues.pushed("posts") == []


async def test_a_failing_index_is_retried_then_buried(
    maildefer_conversation: Conversations,
    maildefer_queues: TestQueues,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(path: Path, line: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(index, "_append", broken)
    await maildefer_conversation("ann@writers.org").say("hello@example.com", "First post")
    stats = await maildefer_queues.run("posts")
    attempts = maildefer_queues.settings.queues["posts"].max_attempts
    assert (stats.handled, stats.failed, stats.buried) == (0, attempts, 1)
    assert await maildefer_queues.buried() == 1
