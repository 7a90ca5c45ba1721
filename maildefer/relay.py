"""Outgoing mail: :class:`Relay` hands a message to a smarthost with aiosmtplib.

Handlers reply to senders (Lamson's ``relay.deliver``) through the relay named in
``[relay]``: in development ``maildefer log``, which keeps everything it is sent in a
queue; in production a smarthost (Postfix, SES, a provider) reached with STARTTLS or
implicit TLS, the certificate verified, and AUTH when ``username`` is set. Every command
runs with the relay of its settings active (:meth:`Relay.active`), so handler code calls
the module-level :func:`deliver`. Handlers that run inside the SMTP session should rather
push replies to a queue that :mod:`maildefer.handlers.outbox` relays with retries: a
relay that is down then delays a reply instead of refusing the incoming message.

Failures raise :class:`RelayError`, never a bare aiosmtplib or ``ssl`` exception. It is
not an :class:`~maildefer.errors.SMTPError` on purpose: in ``serve`` a smarthost's 550 is
no answer to *our* sender, who gets ``451 4.3.0`` (any handler exception's reply) and
keeps the message; the outbox turns a permanent one into ``SMTPError`` itself.

Example:
    >>> from maildefer.settings import Settings
    >>> r = Relay.from_settings(Settings())
    >>> r.host, r.port
    ('127.0.0.1', 8825)
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from email.message import EmailMessage, Message
from types import TracebackType
from typing import TYPE_CHECKING

import structlog

from maildefer.errors import MaildeferError
from maildefer.logs import sanitize
from maildefer.mail import MailRequest, MailResponse
from maildefer.settings import Settings

if TYPE_CHECKING:
    import aiosmtplib

Sendable = MailResponse | MailRequest | EmailMessage | Message | bytes
"""What :meth:`Relay.deliver` sends."""

# 5xx replies that are about our credentials or TLS, not about the message (RFC 4954 §6:
# 530 authentication required, 534 mechanism too weak, 535 credentials invalid, 538
# encryption required): the operator fixes the settings and the mail waits meanwhile.
_SETUP_CODES = frozenset({530, 534, 535, 538})
# Idle connections kept per relay; more concurrent deliveries open more, closed after use.
_MAX_IDLE = 8
_BCC = re.compile(rb"(?:resent-)?bcc[ \t]*:", re.IGNORECASE)
_BCC_ANYWHERE = re.compile(rb"(?im)^(?:resent-)?bcc[ \t]*:")


class RelayError(MaildeferError):
    """The relay did not take a message: unreachable, TLS or AUTH failed, or it refused.

    Args:
        where: the relay, ``"host:port"``.
        text: the smarthost's reply text, or what went wrong when there was no reply.
        code: the smarthost's reply code; ``None`` when it gave none (connection,
            timeout, TLS, STARTTLS not offered).
        temporary: the message may go through later. A 4xx, every failure without a
            reply, and a 5xx about our setup (connect, EHLO, AUTH: 535 included) are
            temporary; only a 5xx to the message's own MAIL, RCPT or DATA is permanent.

    Example:
        >>> err = RelayError("smtp.example.com:587", "5.1.1 no such user", 550, temporary=False)
        >>> err.permanent, err.reply
        (True, '550 5.1.1 no such user')
        >>> str(err)
        'relay smtp.example.com:587: 550 5.1.1 no such user'
    """

    def __init__(self, where: str, text: str, code: int | None = None, *, temporary: bool) -> None:
        self.where = where
        self.text = text
        self.code = code
        self.temporary = temporary
        super().__init__(f"relay {where}: {self.reply}")

    @property
    def reply(self) -> str:
        """The smarthost's reply, code and text (the text alone when it gave none)."""
        return self.text if self.code is None else f"{self.code} {self.text}"

    @property
    def permanent(self) -> bool:
        """The smarthost refused this message for good (a 5xx to MAIL, RCPT or DATA)."""
        return not self.temporary


class Relay:
    """An SMTP server that takes outgoing mail: a smarthost, or ``maildefer log``.

    ``async with relay:`` keeps connections open for reuse by the deliveries made inside
    it on the same event loop (the outbox's lifespan does this for a worker); outside
    one, each delivery opens and closes its own connection. A connection is reused only
    after a successful transaction, and only once a ``NOOP`` proves it still alive.

    Args:
        host: its address.
        port: its port.
        timeout: seconds for each SMTP step.
        starttls: upgrade with STARTTLS before AUTH; refuse to send if it is not offered.
        tls: implicit TLS from the first byte (port 465).
        username: AUTH (PLAIN or LOGIN, as offered) with this user; ``""``: no AUTH.
        password: the password for ``username``; never logged, never in a repr.
        ca_file: the CA bundle that verifies the certificate; ``None``: the system store.
        idle_timeout: seconds an idle connection is kept for reuse.

    Raises:
        ValueError: ``starttls`` and ``tls`` together.

    Example:
        >>> Relay("127.0.0.1", 2525).port
        2525
        >>> Relay("smtp.example.com", 587, starttls=True, username="app", password="s3cret")
        Relay('smtp.example.com', 587, starttls=True, tls=False, username='app')
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8825,
        timeout: float = 30.0,
        *,
        starttls: bool = False,
        tls: bool = False,
        username: str = "",
        password: str = "",
        ca_file: str | None = None,
        idle_timeout: float = 30.0,
    ) -> None:
        if starttls and tls:
            raise ValueError("starttls and tls are exclusive: STARTTLS upgrades a plain port")
        self.host = host
        self.port = port
        self.timeout = timeout
        self.starttls = starttls
        self.tls = tls
        self.username = username
        self.ca_file = ca_file
        self.idle_timeout = idle_timeout
        self._password = password  # kept out of __repr__ and every log line
        self._context: ssl.SSLContext | None = None
        self._scopes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._log = structlog.get_logger("maildefer.relay")

    def __repr__(self) -> str:
        return (
            f"Relay({self.host!r}, {self.port}, starttls={self.starttls}, tls={self.tls},"
            f" username={self.username!r})"
        )

    @property
    def where(self) -> str:
        """``host:port``, as errors and log lines name the relay."""
        return f"{self.host}:{self.port}"

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
        """The relay of ``[relay]`` (``ca_file`` resolved against the project root).

        Example:
            >>> Relay.from_settings(Settings(relay={"port": 2526, "starttls": True}))
            Relay('127.0.0.1', 2526, starttls=True, tls=False, username='')
        """
        r = settings.relay
        return cls(
            r.host,
            r.port,
            r.timeout,
            starttls=r.starttls,
            tls=r.tls,
            username=r.username,
            password=r.password.get_secret_value(),
            ca_file=str(settings.resolve(r.ca_file)) if r.ca_file else None,
        )

    async def __aenter__(self) -> Relay:
        """Keep connections for reuse until the matching ``__aexit__``.

        Example:
            >>> import asyncio
            >>> async def demo():
            ...     async with Relay(port=1) as relay:
            ...         return relay.pooling
            >>> asyncio.run(demo())
            True
        """
        loop = asyncio.get_running_loop()
        if self._scopes and self._loop is not loop:
            raise RuntimeError("this relay keeps connections for another event loop")
        self._scopes += 1
        self._loop = loop
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the idle connections once the outermost scope ends (never raises)."""
        self._scopes -= 1
        if self._scopes == 0:
            idle, self._idle, self._loop = self._idle, [], None
            await asyncio.gather(*(self._quit(conn) for conn, _ in idle))

    @property
    def pooling(self) -> bool:
        """Deliveries on this event loop reuse connections (inside ``async with``)."""
        try:
            return self._scopes > 0 and self._loop is asyncio.get_running_loop()
        except RuntimeError:
            return False

    async def deliver(
        self,
        message: Sendable,
        *,
        mail_from: str | None = None,
        rcpt_tos: Sequence[str] | None = None,
    ) -> str:
        """Send one message; returns the text of the server's reply to DATA.

        Recipients the server refused while it accepted others are logged
        (``relay_recipients_refused``); the message was sent to the rest.

        Args:
            message: a :class:`MailResponse` or ``EmailMessage`` (sent to every To, Cc
                and Bcc recipient; Bcc is never transmitted), a received
                :class:`MailRequest` (forwarded byte-exact but for any Bcc header, to its
                envelope) or raw bytes (then ``mail_from`` and ``rcpt_tos`` are required).
            mail_from: the envelope sender; default from the message.
            rcpt_tos: the envelope recipients; default from the message.

        Raises:
            RelayError: not sent: see :attr:`RelayError.temporary`.
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
            payload = _without_bcc(message.raw)
            sender = message.mail_from if sender is None else sender
            recipients = list(message.rcpt_tos) if recipients is None else recipients
        elif isinstance(message, bytes):
            payload = _without_bcc(message)
        else:
            payload = message
        if isinstance(payload, bytes) and (sender is None or not recipients):
            raise ValueError("raw bytes need mail_from and rcpt_tos")
        pooled = self.pooling
        conn, reused = await self._acquire(pooled)
        try:
            if isinstance(payload, bytes):
                assert sender is not None and recipients is not None
                refused, reply = await conn.sendmail(
                    sender,
                    recipients,
                    payload,
                    mail_options=_options(conn, payload, [sender, *recipients]),
                )
            else:
                refused, reply = await conn.send_message(
                    payload, sender=sender, recipients=recipients
                )
        except (aiosmtplib.SMTPException, OSError) as exc:
            conn.close()
            raise self._failed(exc, during="transaction") from exc
        except BaseException:
            conn.close()  # cancelled mid-transaction: the connection's state is unknown
            raise
        if refused:
            self._log.warning(
                "relay_recipients_refused",
                relay=self.where,
                refused={
                    sanitize(r): sanitize(f"{v.code} {v.message}") for r, v in refused.items()
                },
            )
        if pooled and len(self._idle) < _MAX_IDLE:
            self._idle.append((conn, asyncio.get_running_loop().time()))
        else:
            await self._quit(conn)
        self._log.debug("relay_sent", relay=self.where, reused=reused, reply=sanitize(reply))
        return reply

    async def _acquire(self, pooled: bool) -> tuple[aiosmtplib.SMTP, bool]:
        """A connection ready for MAIL FROM: an idle one still alive, or a new one."""
        import aiosmtplib

        now = asyncio.get_running_loop().time()
        while pooled and self._idle:
            conn, since = self._idle.pop()
            if conn.is_connected and now - since < self.idle_timeout:
                try:
                    # The server may have dropped it while idle (a timeout, a restart):
                    # a NOOP costs one round trip and means nothing of ours is lost.
                    await conn.noop()
                    return conn, True
                except (aiosmtplib.SMTPException, OSError):
                    conn.close()
            else:
                await self._quit(conn)
        conn = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            timeout=self.timeout,
            use_tls=self.tls,
            # False, not None: aiosmtplib's None upgrades only if offered, and starttls
            # must mean "refuse to send in clear" (contract §2).
            start_tls=self.starttls,
            tls_context=self._tls_context() if self.tls or self.starttls else None,
            username=self.username or None,
            password=self._password if self.username else None,
        )
        try:
            await conn.connect()
        except (aiosmtplib.SMTPException, OSError) as exc:
            conn.close()
            raise self._failed(exc, during="connect") from exc
        return conn, False

    def _tls_context(self) -> ssl.SSLContext:
        """The verifying context, made once (loading a CA store costs milliseconds)."""
        if self._context is None:
            # Verification always on: the system store, or the operator's own CA bundle.
            self._context = ssl.create_default_context(cafile=self.ca_file)
        return self._context

    async def _quit(self, conn: aiosmtplib.SMTP) -> None:
        """QUIT politely, bounded; a connection already gone is just closed."""
        import aiosmtplib

        with suppress(aiosmtplib.SMTPException, OSError):
            if conn.is_connected:
                await conn.quit(timeout=min(self.timeout, 5.0))
        conn.close()

    def _failed(self, exc: BaseException, *, during: str) -> RelayError:
        """The :class:`RelayError` for an aiosmtplib, ``ssl`` or OS failure."""
        import aiosmtplib

        code: int | None = None
        if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
            # Every recipient refused: temporary if any of them may work later.
            later = [r for r in exc.recipients if r.code < 500 or r.code in _SETUP_CODES]
            first = (later or exc.recipients)[0]
            code, text, temporary = first.code, first.message, bool(later)
        elif isinstance(exc, aiosmtplib.SMTPResponseException):
            code, text = exc.code, exc.message
            temporary = during == "connect" or code < 500 or code in _SETUP_CODES
        else:
            # No reply to judge: unreachable, a timeout, TLS refused or not offered.
            text, temporary = f"{type(exc).__name__}: {exc}", True
        # Not logged here: the caller logs it once, with its outcome (the worker's line
        # per message, serve's handler_failed).
        error = RelayError(self.where, text, code, temporary=temporary)
        return error


def _without_bcc(raw: bytes) -> bytes:
    """The message without its Bcc/Resent-Bcc header fields (and their folded lines).

    Only those lines go: the rest, body included, stays byte-exact (RFC 5322 §3.6.3:
    Bcc recipients are in the envelope, never in the header others receive).
    """
    ends = [i + n for i, n in ((raw.find(b"\r\n\r\n"), 2), (raw.find(b"\n\n"), 1)) if i >= 0]
    split = min(ends) if ends else len(raw)
    head = raw[:split]
    if not _BCC_ANYWHERE.search(head):
        return raw
    kept: list[bytes] = []
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] not in (b" ", b"\t"):  # a new field; else a folded continuation
            dropping = bool(_BCC.match(line))
        if not dropping:
            kept.append(line)
    return b"".join(kept) + raw[split:]


def _options(conn: aiosmtplib.SMTP, payload: bytes, addresses: Sequence[str]) -> list[str]:
    """MAIL FROM parameters for raw bytes, as ``send_message`` picks them for a message.

    SMTPUTF8 (RFC 6531) for non-ASCII addresses, 8BITMIME (RFC 6152) for an 8-bit body.
    """
    options = []
    if not all(a.isascii() for a in addresses) and conn.supports_extension("smtputf8"):
        options.append("SMTPUTF8")
    if not payload.isascii() and conn.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    return options


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

    Raises:
        RelayError: not sent (in ``serve``, the sender of the message being handled
            gets ``451 4.3.0`` and retries).

    Example:
        >>> import asyncio
        >>> asyncio.run(deliver(b"x"))
        Traceback (most recent call last):
        ...
        RuntimeError: no relay is active: use Relay(host, port).deliver(...)
    """
    return await current_relay().deliver(message, mail_from=mail_from, rcpt_tos=rcpt_tos)
