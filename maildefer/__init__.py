"""maildefer: Lamson's "defer to queue" on asyncio.

An SMTP/LMTP listener hands each message to coroutine handlers routed by recipient
address; a handler does the quick part and defers the slow part to a durable queue,
which worker processes drain as soon as a message lands.

Example:
    A handler module (``app/handlers/posting.py``)::

        from maildefer import Queue, route

        @route("post-(name)@(host)")          # groups become keyword arguments
        async def START(message, name, host):
            await Queue("run/posts").push(message)
            return POSTING                     # the sender's next state

    Everything an application needs is importable from here:

    >>> from maildefer import MailRequest, Router, route, stateless
    >>> MailRequest(b"Subject: hi\\n\\n")["Subject"]
    'hi'

    Replies come from templates (``app/templates``) through ``view`` and ``reply``:

    >>> from maildefer import reply, view
    >>> reply.subject("Re: my post")
    'Re: my post'
"""

from __future__ import annotations

from maildefer import reply, view
from maildefer.auth import AuthResults, authenticated
from maildefer.errors import Retry, SMTPError
from maildefer.lifespan import resources
from maildefer.mail import MailRequest, MailResponse
from maildefer.queue import Queue
from maildefer.routing import Router, route, route_like, stateless

__all__ = [
    "AuthResults",
    "MailRequest",
    "MailResponse",
    "Queue",
    "Retry",
    "Router",
    "SMTPError",
    "authenticated",
    "reply",
    "resources",
    "route",
    "route_like",
    "stateless",
    "view",
]
