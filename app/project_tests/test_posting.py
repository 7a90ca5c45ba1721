"""The posting handler, through maildefer's test kit (the maildefer_* fixtures).

Each test runs in its own temporary directory: the queues (run/posts, run/outbox) are
there, the sender states are in memory, and nothing is sent anywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from app.handlers import posting
from maildefer.testing import RouterConversation
from maildefer.testing.kit import CapturedRelay, TestQueues, TestServer

Conversations = Callable[[str], RouterConversation]


async def test_a_post_is_queued_and_answered(
    maildefer_conversation: Conversations, maildefer_queues: TestQueues
) -> None:
    ann = maildefer_conversation("ann@writers.org")
    assert await ann.state("app.handlers.posting") == "START"
    await ann.say("hello@example.com", "First post", "Hello, world.\n")
    posts = await maildefer_queues.pushed("posts")
    assert [(m.mail_from, m["Subject"]) for m in posts] == [("ann@writers.org", "First post")]
    replies = await maildefer_queues.pushed("outbox")
    assert [m.rcpt_tos for m in replies] == [["ann@writers.org"]]
    assert await ann.state("app.handlers.posting") == "POSTING"


async def test_the_reply_is_relayed_by_the_outbox(
    maildefer_conversation: Conversations,
    maildefer_queues: TestQueues,
    maildefer_relay: CapturedRelay,
) -> None:
    await maildefer_conversation("ann@writers.org").say("hello@example.com", "First post")
    stats = await maildefer_queues.run("outbox")
    assert (stats.handled, stats.failed) == (1, 0)
    assert len(maildefer_relay.delivered(to="ann@writers.org", subject="Re: First post")) == 1


async def test_a_post_over_smtp_is_accepted(
    maildefer_serve: TestServer, maildefer_queues: TestQueues
) -> None:
    assert await maildefer_serve.send("hello@example.com", "Over SMTP") == 250
    assert [m["Subject"] for m in await maildefer_queues.pushed("posts")] == ["Over SMTP"]


async def test_another_domain_is_refused(maildefer_serve: TestServer) -> None:
    assert await maildefer_serve.send("hello@elsewhere.org") == 550


async def test_a_failing_handler_answers_451(
    maildefer_serve: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object) -> str:
        raise RuntimeError("the queue is down")

    monkeypatch.setattr(posting, "defer", broken)
    # 451: the sender keeps the message and tries again later; nothing is lost.
    assert await maildefer_serve.send("hello@example.com") == 451
