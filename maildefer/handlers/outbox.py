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
``[relay]``.

Example:
    >>> from maildefer import Router
    >>> [r.pattern for r in Router.from_modules(["maildefer.handlers.outbox"]).routes()]
    ['(address)']
"""

from __future__ import annotations

from maildefer.mail import MailRequest
from maildefer.relay import deliver
from maildefer.routing import route, stateless


@route("(address)", address=".+")
@stateless
async def START(message: MailRequest, address: str) -> None:
    """Relay one queued message to all of its envelope recipients.

    Example:
        >>> START.__name__
        'START'
    """
    await deliver(message)
