"""A ready-made queue handler that relays queued mail: the outbox of an application.

Replies and notifications composed in the SMTP session should not be sent from it: a
relay that is slow or down would hold up, or refuse, the incoming message. Push them to
a queue instead and let a worker relay them with the queue's retries and backoff::

    [queues.outbox]
    path = "run/outbox"
    handlers = ["maildefer.handlers.outbox"]

    # in a handler
    await Queue("run/outbox").push(reply.to_message())

Every message is sent once, to all of its envelope recipients, through the relay of
``[relay]``. What the smarthost's answer makes of it:

- accepted: the message leaves the queue;
- a temporary failure (down, a 4xx, TLS or AUTH refused: see
  :class:`~maildefer.relay.RelayError`): retried with the queue's backoff, then buried
  (reason ``failed``) after ``max_attempts``;
- a 5xx to MAIL, RCPT or DATA: buried at once (reason ``rejected``), the smarthost's
  reply recorded as the error.

In a worker the module's :func:`lifespan` keeps the relay's connections open between
messages (one TLS handshake and AUTH for many messages, not one per message).

Example:
    >>> from maildefer import Router
    >>> [r.pattern for r in Router.from_modules(["maildefer.handlers.outbox"]).routes()]
    ['(address)']
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from maildefer.errors import SMTPError
from maildefer.lifespan import resources
from maildefer.mail import MailRequest
from maildefer.relay import Relay, RelayError, current_relay
from maildefer.routing import route, stateless
from maildefer.settings import Settings


@asynccontextmanager
async def lifespan(settings: Settings) -> AsyncIterator[Relay]:
    """Keep the relay's connections open for the process (closed at shutdown).

    The relay is the active one (the CLI activates ``[relay]``), else ``[relay]``'s own.

    Example:
        >>> import asyncio
        >>> async def demo():
        ...     with Relay(port=2529).active():
        ...         async with lifespan(Settings()) as relay:
        ...             return relay.port, relay.pooling
        >>> asyncio.run(demo())
        (2529, True)
    """
    try:
        relay = current_relay()
    except RuntimeError:
        relay = Relay.from_settings(settings)
    async with relay:
        yield relay


@route("(address)", address=".+")
@stateless
async def START(message: MailRequest, address: str) -> None:
    """Relay one queued message to all of its envelope recipients.

    Raises:
        SMTPError: the smarthost refused it for good (a 5xx): the worker buries it.
        RelayError: a temporary failure: the worker retries it.

    Example:
        It sends through the relay of the lifespan, or else the one active in its
        context; with nothing listening there, the failure is temporary, so the worker
        retries the message:

        >>> import asyncio
        >>> message = MailRequest(b"Subject: hi\\r\\n\\r\\n", mail_from="a@x", rcpt_tos=["b@y"])
        >>> with Relay(port=1, timeout=2.0).active():  # nothing listens on port 1
        ...     asyncio.run(START(message, address="b@y"))
        Traceback (most recent call last):
        ...
        maildefer.relay.RelayError: relay 127.0.0.1:1: SMTPConnectError: Error connecting ...
    """
    try:
        relay: Relay = resources()
    except LookupError:  # no lifespan running: a router used in-process, a test
        relay = current_relay()
    try:
        await relay.deliver(message)
    except RelayError as exc:
        if exc.permanent and exc.code is not None:
            # The smarthost's own reply is the error the undeliverable queue records.
            raise SMTPError(exc.code, exc.text) from exc
        raise
