"""The blog's posting handler: runs inside the SMTP session, so it only does the quick part.

Mail to ``<post_name>@example.com`` (``host`` comes from ``[router] defaults``) is
accepted and pushed to the ``run/posts`` queue; the ``index`` handler, run by
``maildefer worker --queue run/posts``, does the slow part later. ``push`` returns once
the message is on disk, so the SMTP 250 that follows never promises more than is stored.

A sender starts in ``START`` and moves to ``POSTING`` after the first post (the state is
kept in ``run/state.db``). Each post is answered, as in the tutorial, but the reply is not
sent from the SMTP session: it is pushed to ``run/outbox``, which a worker relays
(``maildefer.outbox``, through ``[relay]``) with retries, so a relay that is down delays
the reply instead of refusing the post. The reply is rendered from
``app/templates/post_received.msg`` (text) and ``post_received.html`` (its HTML
alternative, autoescaped) by ``maildefer.reply``, which also threads it (``Re:``,
``In-Reply-To``, ``References``) and sends none to the null sender, to list or bulk mail,
to mailer-daemons or to mail that is itself automatic (RFC 3834).

Only authentic posts are published: ``@authenticated("dmarc")`` refuses, with
``550 5.7.1``, a post whose ``From:`` domain DMARC does not confirm (a ``451`` when DNS
could not tell, so the sender retries). It applies with ``[auth] verify = true`` in
``config/settings.toml``; with verification off (the default, for the tutorial's local
``maildefer send``) every post is taken, and ``serve`` says so at start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from maildefer import MailRequest, MailResponse, Queue, authenticated, reply, route, route_like

# Relative to the working directory: run `serve` and `worker` from the project root.
POSTS_QUEUE = "run/posts"
OUTBOX_QUEUE = "run/outbox"


def reply_for(message: MailRequest, post_name: str, host: str) -> MailResponse | None:
    """The confirmation for a post, or None where RFC 3834 says not to answer."""
    title = message["Subject"] or post_name
    return reply.respond(
        message,
        {"title": title, "post_name": post_name, "host": host},
        "post_received.msg",
        Html="post_received.html",
        From=f"noreply@{host}",
        Subject=reply.subject(title),
    )


async def defer(message: MailRequest, post_name: str, host: str) -> str:
    """Push the post to the queue; returns its key once it is durable."""
    key = await Queue(POSTS_QUEUE).push(message)
    answer = reply_for(message, post_name, host)
    if answer is not None:
        await Queue(OUTBOX_QUEUE).push(answer)
    structlog.get_logger("app.posting").info("post queued", post_name=post_name, host=host, key=key)
    return key


@route("(post_name)@(host)")
@authenticated("dmarc")
async def START(message: MailRequest, post_name: str, host: str) -> Callable[..., Any]:
    """A sender's first post."""
    await defer(message, post_name, host)
    return POSTING


@route_like(START)
@authenticated("dmarc")
async def POSTING(message: MailRequest, post_name: str, host: str) -> Callable[..., Any]:
    """Every later post of a sender who already posted."""
    await defer(message, post_name, host)
    return POSTING
