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
        It sends through the relay active in its context (the worker activates
        ``[relay]``); with nothing listening there, the failure propagates, so the worker
        retries the message:

        >>> import asyncio
        >>> from maildefer.relay import Relay
        >>> message = MailRequest(b"Subject: hi\\r\\n\\r\\n", mail_from="a@x", rcpt_tos=["b@y"])
        >>> with Relay(port=1, timeout=2.0).active():  # nothing listens on port 1
        ...     asyncio.run(START(message, address="b@y"))
        Traceback (most recent call last):
        ...
        aiosmtplib.errors.SMTPConnectError: Error connecting to 127.0.0.1 on port 1: ...
    """
    await deliver(message)
