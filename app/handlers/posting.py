"""The blog's posting handler: runs inside the SMTP session, so it only does the quick part.

Mail to ``<post_name>@example.com`` (``host`` comes from ``[router] defaults``) is
accepted and pushed to the ``run/posts`` queue; the ``index`` handler, run by
``maildefer worker --queue run/posts``, does the slow part later. ``push`` returns once
the message is on disk, so the SMTP 250 that follows never promises more than is stored.

A sender starts in ``START`` and moves to ``POSTING`` after the first post (the state is
kept in ``run/state.db``): the place where a first-time poster would get a welcome or a
confirmation request. The tutorial's reply (through ``maildefer.relay``) is left out so
the example needs no outgoing mail server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from maildefer import MailRequest, Queue, route, route_like

# Relative to the working directory: run `serve` and `worker` from the project root.
POSTS_QUEUE = "run/posts"


async def defer(message: MailRequest, post_name: str, host: str) -> str:
    """Push the post to the queue; returns its key once it is durable."""
    key = await Queue(POSTS_QUEUE).push(message)
    structlog.get_logger("app.posting").info("post queued", post_name=post_name, host=host, key=key)
    return key


@route("(post_name)@(host)")
async def START(message: MailRequest, post_name: str, host: str) -> Callable[..., Any]:
    """A sender's first post."""
    await defer(message, post_name, host)
    return POSTING


@route_like(START)
async def POSTING(message: MailRequest, post_name: str, host: str) -> Callable[..., Any]:
    """Every later post of a sender who already posted."""
    await defer(message, post_name, host)
    return POSTING
