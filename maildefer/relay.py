"""Outgoing mail: :class:`Relay` hands a message to an SMTP server with aiosmtplib.

Handlers reply to senders (Lamson's ``relay.deliver``) through the relay named in
``[relay]``; in development that is ``maildefer log``, which keeps everything it is sent
in a queue instead of delivering it. Every command runs with the relay of its settings
active (:meth:`Relay.active`), so handler code calls the module-level :func:`deliver`.
Handlers that run inside the SMTP session should rather push replies to a queue that
:mod:`maildefer.outbox` relays with retries: a relay that is down then delays a reply
instead of refusing the incoming message.

Example:
    >>> from maildefer.settings import Settings
    >>> r = Relay.from_settings(Settings())
    >>> r.host, r.port
    ('127.0.0.1', 8825)
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from email.message import EmailMessage, Message

from maildefer.mail import MailRequest, MailResponse
from maildefer.settings import Settings

Sendable = MailResponse | MailRequest | EmailMessage | Message | bytes
"""What :meth:`Relay.deliver` sends."""


class Relay:
    """An SMTP server that takes outgoing mail.

    Args:
        host: its address.
        port: its port.
        timeout: seconds for each SMTP step.

    Example:
        >>> Relay("127.0.0.1", 2525).port
        2525
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8825, timeout: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout

    @contextmanager
    def active(self) -> Iterator[Relay]:
        """Make this the relay that :func:`deliver` uses in this context.

        Example:
            >>> with Relay(port=2527).active():
            ...     current_relay().port
            2527
        """
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    @classmethod
    def from_settings(cls, settings: Settings) -> Relay:
        """The relay of ``[relay]``.

        Example:
            >>> Relay.from_settings(Settings(relay={"port": 2526})).port
            2526
        """
        return cls(settings.relay.host, settings.relay.port, settings.relay.timeout)

    async def deliver(
        self,
        message: Sendable,
        *,
        mail_from: str | None = None,
        rcpt_tos: Sequence[str] | None = None,
    ) -> str:
        """Send one message; returns the text of the server's reply to DATA.

        STARTTLS is not attempted: the relay is expected on a trusted local network
        (a smarthost on 127.0.0.1, or ``maildefer log`` in development).

        Args:
            message: a :class:`MailResponse`, an ``EmailMessage``, a received
                :class:`MailRequest` (forwarded byte-exact, its envelope by default) or
                raw bytes (then ``mail_from`` and ``rcpt_tos`` are required).
            mail_from: the envelope sender; default from the message.
            rcpt_tos: the envelope recipients; default from the message (To, Cc, Bcc;
                Bcc is not transmitted).

        Raises:
            aiosmtplib.SMTPException: the server refused the message (the exception
                carries ``code`` and ``message``), or could not be reached
                (``SMTPConnectError``, ``SMTPTimeoutError``).
            ValueError: raw bytes without an envelope.

        Example:
            >>> import asyncio
            >>> asyncio.run(Relay(port=1).deliver(b"x"))
            Traceback (most recent call last):
            ...
            ValueError: raw bytes need mail_from and rcpt_tos
        """
        # Imported here: every command activates a relay, few of them send mail.
        import aiosmtplib

        payload: EmailMessage | Message | bytes
        sender, recipients = mail_from, list(rcpt_tos) if rcpt_tos is not None else None
        if isinstance(message, MailResponse):
            payload = message.to_message()
        elif isinstance(message, MailRequest):
            payload = message.raw
            sender = message.mail_from if sender is None else sender
            recipients = list(message.rcpt_tos) if recipients is None else recipients
        else:
            payload = message
        if isinstance(payload, bytes) and (sender is None or not recipients):
            raise ValueError("raw bytes need mail_from and rcpt_tos")
        _, reply = await aiosmtplib.send(
            payload,
            sender=sender,
            recipients=recipients,
            hostname=self.host,
            port=self.port,
            timeout=self.timeout,
            start_tls=False,
        )
        return reply


# A context variable, not a global: the CLI activates the relay of its settings, and the
# tasks of serve and worker inherit it.
_ACTIVE: contextvars.ContextVar[Relay | None] = contextvars.ContextVar(
    "maildefer_relay", default=None
)


def current_relay() -> Relay:
    """The relay active in this context.

    Raises:
        RuntimeError: no relay is active (outside serve/worker, use ``Relay(...)``).

    Example:
        >>> with Relay(port=2528).active():
        ...     current_relay().port
        2528
    """
    relay = _ACTIVE.get()
    if relay is None:
        raise RuntimeError("no relay is active: use Relay(host, port).deliver(...)")
    return relay


async def deliver(
    message: Sendable,
    *,
    mail_from: str | None = None,
    rcpt_tos: Sequence[str] | None = None,
) -> str:
    """Send a message through the active relay (Lamson's ``relay.deliver``).

    Example:
        >>> import asyncio
        >>> asyncio.run(deliver(b"x"))
        Traceback (most recent call last):
        ...
        RuntimeError: no relay is active: use Relay(host, port).deliver(...)
    """
    return await current_relay().deliver(message, mail_from=mail_from, rcpt_tos=rcpt_tos)
