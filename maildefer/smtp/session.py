"""The SMTP/LMTP session policy: aiosmtpd's protocol with maildefer's limits and DATA path.

:func:`smtp_factory` returns the protocol factory that ``loop.create_server`` takes
(:mod:`maildefer.smtp.server` owns the listener). Each connection is one :class:`SMTPSession`
(or :class:`LMTPSession`) sharing one :class:`DeliveryPolicy` (the aiosmtpd "handler":
RCPT and DATA decisions) and one :class:`SessionTracker` (connection caps, shutdown).

What aiosmtpd does not do and this module adds (RELIABILITY.md R23-R31):

- RCPT: an address no route matches gets ``550 5.1.1``; past ``max_recipients``,
  ``452 4.5.3``. Nothing is ever relayed.
- DATA: the handlers run once per accepted recipient, *concurrently* (their pushes share
  one directory fsync, and ``handler_timeout`` bounds the whole DATA); ``250`` only after
  all of them returned. A raise or a timeout gives ``451 4.3.0``; a handler's
  :class:`~maildefer.errors.SMTPError` gives its own reply. In SMTP mode one reply covers
  every recipient: the first transient failure wins, then the first permanent one, so a
  partial failure is retried (at-least-once: a recipient whose handler succeeded may see
  the message again). LMTP answers per recipient (RFC 2033 section 4.2).
- Connection caps (global and per IP, ``421 4.7.0``); a command idle timeout; a DATA
  deadline that grows with the bytes received (Postfix's ``smtpd_min_data_rate``),
  because aiosmtpd does not reset its timer during DATA (``data_min_rate = 0``: the
  deadline is only an idle timeout between reads); ``421`` after
  ``max_bad_commands`` error replies (aiosmtpd's own cap is 5 unknown commands, with a
  502); a per-command cap on "junk" commands (aiosmtpd's ``command_call_limit``).
- Internal errors answer ``451 4.3.0`` (aiosmtpd's default is a permanent ``500``).

The message bytes are stored exactly as received (``decode_data=False``): no
``Received:`` header is added, because the queue promises byte-exact storage and its
envelope record already keeps the peer and the time.

Example:
    >>> from maildefer.settings import ServerSettings
    >>> factory = smtp_factory(ServerSettings(hostname="mx.test"), AcceptAll(), SessionTracker())
    >>> callable(factory)
    True
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, cast

import structlog
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from maildefer.errors import NoRouteError, SMTPError
from maildefer.logs import sanitize
from maildefer.mail import MailRequest
from maildefer.settings import ServerSettings

if TYPE_CHECKING:
    from maildefer.ops.metrics import Metrics

log = structlog.get_logger("maildefer.smtp")
_aiosmtpd_log = logging.getLogger("mail.log")

JUNK_COMMAND_LIMIT = 100
"""Per-session cap on each of NOOP, VRFY, EXPN, HELP, HELO, EHLO, LHLO, STARTTLS, AUTH
(Postfix's ``smtpd_junk_command_limit``). MAIL, RCPT, DATA, RSET and QUIT are not capped:
a kept connection legitimately sends thousands of transactions."""

_JUNK = ("NOOP", "VRFY", "EXPN", "HELP", "HELO", "EHLO", "LHLO", "STARTTLS", "AUTH")
_UNLIMITED = 2**62

# aiosmtpd's own replies, given RFC 3463 enhanced status codes (and the 5.3.4 our contract
# names for an oversize message).
_REWRITES = {
    "552 Error: Too much mail data": "552 5.3.4 Message size exceeds fixed maximum message size",
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message size exceeds fixed maximum message size"
    ),
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)",
    "500 Command line too long": "500 5.5.2 Command line too long",
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
}

_ERROR_CODES = frozenset({"500", "501", "502", "503", "504", "530", "538", "550", "553", "555"})
"""Replies that count toward ``max_bad_commands``: syntax, sequence and protocol errors and
refused recipients (Postfix's ``smtpd_hard_error_limit``, which also stops address
harvesting); the count starts again after each accepted message, as in Postfix."""

# An SMTP path in its everyday form, ``<dot-atom@dot-atom>`` in ASCII atext, then the rest
# of the command line. aiosmtpd's own parser (the stdlib header parser, plus a class
# defined per call) costs about 40 us a MAIL or RCPT; for this form it returns exactly
# the address between the brackets (tests/test_smtp_addresses.py checks that against it).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*)>(.*)", re.DOTALL)

REPLY_OK = "250 2.0.0 Ok: queued"
REPLY_TEMPFAIL = "451 4.3.0 Error: local error in processing, try again later"
REPLY_TIMEOUT = "451 4.3.0 Error: handler timed out, try again later"


class Recipients(Protocol):
    """What the SMTP layer needs from a router: who is local, and delivery.

    :class:`maildefer.routing.Router` is one; :class:`AcceptAll` is the log server's.

    Example:
        >>> recipients: Recipients = AcceptAll()
        >>> recipients.match("anyone@anywhere")
        ['anyone@anywhere']
    """

    def match(self, address: str) -> Sequence[object]:
        """The routes for an address; empty means the address is refused at RCPT."""
        ...

    def deliver(self, message: MailRequest) -> Awaitable[object]:
        """Run the handlers for ``message.rcpt_to``; raising refuses that recipient."""
        ...


class AcceptAll:
    """Accepts every recipient and hands each whole message to one coroutine.

    The log server (``maildefer log``) uses it; pair it with ``per_recipient=False`` in
    :class:`DeliveryPolicy` so a message with three recipients is delivered once.

    Args:
        sink: called once per message; ``None`` accepts and drops.

    Example:
        >>> import asyncio
        >>> asyncio.run(AcceptAll().deliver(MailRequest(b"\\n"))) is None
        True
    """

    def __init__(self, sink: Callable[[MailRequest], Awaitable[object]] | None = None) -> None:
        self._sink = sink

    def match(self, address: str) -> list[str]:
        """Every address is accepted.

        Example:
            >>> AcceptAll().match("x@y")
            ['x@y']
        """
        return [address]

    async def deliver(self, message: MailRequest) -> None:
        """Pass the message to the sink.

        Example:
            >>> import asyncio; asyncio.run(AcceptAll().deliver(MailRequest(b"")))
        """
        if self._sink is not None:
            await self._sink(message)


def _reply_for(error: BaseException | None, rcpt: str) -> str:
    """The SMTP reply for one recipient's outcome."""
    if error is None:
        return REPLY_OK
    if isinstance(error, SMTPError):
        return error.reply
    if isinstance(error, TimeoutError):
        return REPLY_TIMEOUT
    if isinstance(error, NoRouteError):
        return f"550 5.1.1 <{rcpt}>: Recipient address rejected: no route"
    return REPLY_TEMPFAIL


def combine(replies: Sequence[str]) -> str:
    """The one SMTP reply for a DATA whose recipients had these outcomes.

    All accepted: ``250``. Otherwise the first transient (4xx) reply, so the sender retries
    the whole message; failing that, the first permanent one.

    Example:
        >>> combine(["250 ok", "550 5.7.1 no", "451 4.3.0 later"])
        '451 4.3.0 later'
    """
    failures = [r for r in replies if not r.startswith("2")]
    if not failures:
        return replies[0] if replies else REPLY_OK
    transient = [r for r in failures if r.startswith("4")]
    return (transient or failures)[0]


@dataclass
class DeliveryPolicy:
    """The aiosmtpd handler: RCPT acceptance and the DATA path into the router.

    Args:
        recipients: the router (or any :class:`Recipients`).
        settings: the ``[server]`` limits.
        per_recipient: deliver once per accepted recipient (the router), or once per
            message (the log server).
        metrics: counts refused recipients and times the handlers (optional).

    Example:
        >>> DeliveryPolicy(AcceptAll(), ServerSettings(hostname="h")).per_recipient
        True
    """

    recipients: Recipients
    settings: ServerSettings
    per_recipient: bool = True
    metrics: Metrics | None = None

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """EHLO/LHLO: as aiosmtpd, minus AUTH (no authenticator is configured).

        Example:
            >>> import asyncio, types
            >>> s = types.SimpleNamespace(host_name=None)
            >>> p = DeliveryPolicy(AcceptAll(), ServerSettings(hostname="h"))
            >>> asyncio.run(p.handle_EHLO(None, s, None, "c", ["250-h", "250-AUTH PLAIN"]))
            ['250-h']
        """
        # With the 5-argument hook aiosmtpd leaves recording the greeting to us.
        session.host_name = hostname
        return [r for r in responses if not r[4:].startswith("AUTH")]

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Accept a recipient only if a route matches it, up to ``max_recipients``.

        Example:
            >>> import asyncio, types
            >>> env = types.SimpleNamespace(rcpt_tos=[], rcpt_options=[])
            >>> p = DeliveryPolicy(AcceptAll(), ServerSettings(hostname="h"))
            >>> asyncio.run(p.handle_RCPT(None, None, env, "a@b", []))
            '250 2.1.5 Ok'
        """
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            if self.metrics is not None:
                self.metrics.message_refused(452)
            return "452 4.5.3 Error: too many recipients"
        if not self.recipients.match(address):
            log.info("rcpt_refused", rcpt=sanitize(address))
            if self.metrics is not None:
                self.metrics.message_refused(550)
            return f"550 5.1.1 <{sanitize(address)}>: Recipient address rejected"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Run the handlers; the reply (one line, or one per recipient in LMTP).

        Example:
            >>> import asyncio, types
            >>> env = types.SimpleNamespace(
            ...     original_content=b"\\r\\n", mail_from="a@x", rcpt_tos=["b@y"])
            >>> ses = types.SimpleNamespace(peer=("127.0.0.1", 5))
            >>> p = DeliveryPolicy(AcceptAll(), ServerSettings(hostname="h"))
            >>> from maildefer import logs; import io; logs.configure(stream=io.StringIO())
            >>> asyncio.run(p.handle_DATA(None, ses, env))
            '250 2.0.0 Ok: queued'
        """
        started = time.monotonic()
        peer = session.peer
        raw: bytes = envelope.original_content or b""
        request = MailRequest(
            raw,
            mail_from="" if envelope.mail_from == "<>" else envelope.mail_from or "",  # null sender
            rcpt_tos=list(envelope.rcpt_tos),
            peer=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or ""),
        )
        if self.metrics is None:
            replies = await self._deliver(request)
        else:
            with self.metrics.handling("serve"):
                replies = await self._deliver(request)
        lmtp = isinstance(server, LMTP)
        if lmtp:
            # RFC 2033 4.2: one reply per accepted RCPT, in RCPT order.
            reply = "\r\n".join(replies)
            code = combine(replies)[:3]
        else:
            reply = combine(replies)
            code = reply[:3]
        log.info(
            "message",
            mail_from=sanitize(envelope.mail_from),
            rcpts=len(request.rcpt_tos),
            size=len(raw),
            code=int(code) if code.isdigit() else code,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return reply

    async def _deliver(self, request: MailRequest) -> list[str]:
        """One reply per recipient (one shared outcome when not ``per_recipient``)."""
        rcpts = request.rcpt_tos
        timeout = self.settings.handler_timeout
        if not self.per_recipient or len(rcpts) == 1:
            # The common case, without a task per recipient.
            # MailRequest already addresses its first recipient: no copy needed.
            one = request
            error = await self._run_one(one, within=timeout)
            return [_reply_for(error, r) for r in rcpts]
        tasks = [
            asyncio.ensure_future(self._run_one(request.for_recipient(rcpt), within=None))
            for rcpt in rcpts
        ]
        try:
            done, _ = await asyncio.wait(tasks, timeout=timeout)
        finally:
            # Our caller cancelled (client gone, forced shutdown) or the deadline passed:
            # cancel what still runs and let it unwind; pushes are cancellation-safe.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        replies = []
        for rcpt, task in zip(rcpts, tasks, strict=True):
            if task in done and not task.cancelled():
                replies.append(_reply_for(task.result(), rcpt))
            else:
                log.warning("handler_timeout", rcpt=sanitize(rcpt), timeout=timeout)
                replies.append(REPLY_TIMEOUT)
        return replies

    async def _run_one(self, request: MailRequest, *, within: float | None) -> BaseException | None:
        """Deliver to one recipient; the exception it ended with, or ``None``."""
        try:
            async with asyncio.timeout(within):
                await self.recipients.deliver(request)
        except SMTPError as exc:
            log.info("handler_refused", rcpt=sanitize(request.rcpt_to), reply=sanitize(exc.reply))
            return exc
        except TimeoutError as exc:
            log.warning("handler_timeout", rcpt=sanitize(request.rcpt_to), timeout=within)
            return exc
        except Exception as exc:
            log.error("handler_failed", rcpt=sanitize(request.rcpt_to), exc_info=exc)
            return exc
        return None


@dataclass
class SessionTracker:
    """Every open session of one listener: connection caps and graceful shutdown.

    Args:
        max_connections: global cap on concurrent sessions.
        max_per_ip: cap on concurrent sessions from one address.

    Example:
        >>> t = SessionTracker(max_connections=1)
        >>> t.count, t.closing
        (0, False)
    """

    max_connections: int = 500
    max_per_ip: int = 50
    closing: bool = False
    sessions: set[SMTPSession] = field(default_factory=set)
    per_ip: dict[str, int] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _empty: asyncio.Event | None = None

    @property
    def count(self) -> int:
        """How many sessions are open."""
        return len(self.sessions)

    def admit(self, session: SMTPSession, ip: str) -> str | None:
        """Register a new session; the refusal reply if a cap is reached.

        Example:
            >>> t = SessionTracker(max_connections=5, max_per_ip=0)
            >>> t.admit(object(), "10.0.0.1")
            '421 4.7.0 Error: too many connections from your address'
        """
        if self.closing:
            return "421 4.3.2 Service shutting down"
        if len(self.sessions) >= self.max_connections:
            return "421 4.7.0 Error: too many connections"
        if self.per_ip.get(ip, 0) >= self.max_per_ip:
            return "421 4.7.0 Error: too many connections from your address"
        self.sessions.add(session)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def release(self, session: SMTPSession, ip: str) -> None:
        """Forget a closed session.

        Example:
            >>> SessionTracker().release(object(), "10.0.0.1")
        """
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        left = self.per_ip.get(ip, 1) - 1
        if left > 0:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)
        if not self.sessions and self._empty is not None:
            self._empty.set()

    def next_id(self) -> str:
        """A short id for a new session's log lines.

        Example:
            >>> SessionTracker().next_id()
            's1'
        """
        return f"s{next(self._ids)}"

    def begin_shutdown(self) -> None:
        """Refuse new sessions; close idle ones now, busy ones after their transaction.

        Example:
            >>> t = SessionTracker(); t.begin_shutdown(); t.closing
            True
        """
        self.closing = True
        for session in list(self.sessions):
            if not session.busy:
                session.close_for_shutdown()

    async def wait_empty(self, within: float) -> bool:
        """Wait until every session has closed; ``False`` if ``within`` seconds passed first.

        Example:
            >>> import asyncio; asyncio.run(SessionTracker().wait_empty(0.1))
            True
        """
        if not self.sessions:
            return True
        self._empty = asyncio.Event()
        try:
            async with asyncio.timeout(within):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True

    def abort_all(self) -> None:
        """Close every session now (the grace period is over).

        Example:
            >>> SessionTracker().abort_all()
        """
        for session in list(self.sessions):
            session.abort()


class _DataState(enum.Enum):
    NOMINAL = enum.auto()
    TOO_LONG = enum.auto()
    TOO_MUCH = enum.auto()


class _Phase(enum.Enum):
    COMMAND = "command"
    DATA = "data"
    HANDLER = "handler"


class _CommandTable(dict[str, Any]):
    """aiosmtpd's command dispatch table, with a fallback for unknown commands.

    aiosmtpd closes a session after 5 unknown commands with a 502 (a module constant);
    routing them to our own method lets ``max_bad_commands`` decide, with a 421.
    """

    def __init__(self, methods: dict[str, Any], unknown: Callable[..., Awaitable[None]]) -> None:
        super().__init__(methods)
        self._unknown = unknown

    def get(self, key: str, default: Any = None) -> Any:
        method = super().get(key)
        return method if method is not None else partial(self._unknown, key)


class SMTPSession(SMTP):
    """One SMTP connection: aiosmtpd's protocol with caps, deadlines and 451s.

    Made by :func:`smtp_factory`; not created by hand.

    Example:
        >>> SMTPSession.__mro__[1].__name__
        'SMTP'
    """

    def __init__(
        self,
        policy: DeliveryPolicy,
        tracker: SessionTracker,
        *,
        settings: ServerSettings,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        junk = dict.fromkeys(_JUNK, JUNK_COMMAND_LIMIT)
        super().__init__(
            policy,
            data_size_limit=settings.max_message_size,
            enable_SMTPUTF8=settings.smtputf8,
            decode_data=False,
            hostname=settings.hostname,
            ident="maildefer ESMTP",
            tls_context=tls_context,
            timeout=settings.command_timeout,
            auth_require_tls=True,
            auth_exclude_mechanism=["PLAIN", "LOGIN"],
            command_call_limit={**junk, "*": _UNLIMITED},
        )
        self._smtp_methods = _CommandTable(self._smtp_methods, self._unknown_command)
        self._tracker = tracker
        self._min_rate = settings.data_min_rate
        self._max_bad = settings.max_bad_commands
        self._bad = 0
        self._phase = _Phase.COMMAND
        self._data_deadline = 0.0
        self._refused = False
        self._ip = ""
        self._session_id = ""
        self._shutdown_pending = False
        self._metrics = policy.metrics
        # 354 sent: the next reply ends this DATA (250, a handler's refusal, 552...).
        self._awaiting_data_reply = False

    # -- connection lifecycle -------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """In DATA or its handlers: shutdown lets this session finish its transaction."""
        return self._phase is not _Phase.COMMAND

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection under the caps, or answer 421 and close it."""
        if self.transport is not None:  # STARTTLS: the same session, a new transport
            super().connection_made(transport)
            return
        peer = transport.get_extra_info("peername")
        self._ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        refusal = self._tracker.admit(self, self._ip)
        if refusal is not None:
            self._refused = True
            log.info("connection_refused", peer=sanitize(self._ip), reply=refusal)
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(refusal.encode("ascii") + b"\r\n")
            transport.close()
            return
        self._session_id = self._tracker.next_id()
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        """Release the session's slot; aiosmtpd cancels its task."""
        if self._refused:
            return
        self._tracker.release(self, self._ip)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        """The client closed its side."""
        if self._refused:
            return False
        result: bool | None = super().eof_received()
        return result

    def data_received(self, data: bytes) -> None:
        """Feed aiosmtpd's reader; during DATA, extend the deadline by the bytes' worth."""
        if self._refused:
            return
        if self._phase is _Phase.DATA:
            now = self.loop.time()
            if self._min_rate:
                # Postfix's smtpd_min_data_rate: each read earns len/rate seconds, but the
                # deadline never lies more than one command timeout ahead.
                self._data_deadline = min(
                    now + self._timeout_duration, self._data_deadline + len(data) / self._min_rate
                )
            else:
                self._data_deadline = now + self._timeout_duration
        super().data_received(data)

    def _timeout_cb(self) -> None:
        if self._phase is _Phase.HANDLER:
            # The handlers have their own deadline (handler_timeout); the idle timer must
            # not cut the connection under them.
            self._timeout_handle = self.loop.call_later(self._timeout_duration, self._timeout_cb)
            return
        if self._phase is _Phase.DATA and self.loop.time() < self._data_deadline:
            self._timeout_handle = self.loop.call_at(self._data_deadline, self._timeout_cb)
            return
        log.info("timeout", phase=self._phase.value)
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.write(b"421 4.4.2 Error: timeout exceeded\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def _handle_client(self) -> None:
        peer = self.session.peer if self.session is not None else None
        text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        # This task's context is its own copy: the binding stays with this session.
        structlog.contextvars.bind_contextvars(session=self._session_id, peer=sanitize(text))
        log.debug("connected")
        await super()._handle_client()

    def close_for_shutdown(self) -> None:
        """Tell an idle client the service is going away, and close.

        Example:
            >>> hasattr(SMTPSession, "close_for_shutdown")
            True
        """
        if self.busy:
            self._shutdown_pending = True
            return
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.write(b"421 4.3.2 Service shutting down\r\n")
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now (handlers are cancelled by aiosmtpd).

        Example:
            >>> hasattr(SMTPSession, "abort")
            True
        """
        if self.transport is not None:
            self.transport.close()

    # -- replies and errors -----------------------------------------------------------------

    def _getaddr(self, arg: str) -> tuple[Any, Any]:
        plain = _PLAIN_PATH.fullmatch(arg)
        if plain is not None:
            address, rest = plain.groups()
            # What the stdlib parser does after ">": folding whitespace is skipped, and a
            # comment (which it also skips) is left to the general path.
            if rest[:1] in (" ", "\t"):
                rest = rest.lstrip()
            if not rest.startswith("("):
                limit = self.local_part_limit
                if limit and len(address.rpartition("@")[0]) > limit:
                    return None, None
                return address, rest
        # The stdlib address parser aiosmtpd calls raises IndexError, AttributeError or
        # UnboundLocalError on inputs like "<" or "<x@" (found by tests/test_fuzz_smtp.py):
        # that is a syntax error (553/502), not an internal failure worth a 451.
        try:
            return cast(tuple[Any, Any], super()._getaddr(arg))
        except Exception:
            return None, None

    async def push(self, status: str | bytes) -> None:
        """Send a reply; count errors and hang up after ``max_bad_commands`` of them."""
        if isinstance(status, str):
            # aiosmtpd echoes client bytes (VRFY's argument, surrogate-escaped 8-bit): a
            # strict encode would raise and turn a 502 into a 451 with a logged traceback.
            status = _REWRITES.get(status, status).encode("utf-8", "replace").decode()
            code = status[:3]
            await super().push(status)
        else:
            code = status[:3].decode("ascii", "replace")
            await super().push(status)
        if self._metrics is not None:
            self._count_data_reply(status, code)
        if code == "250" and self._phase is _Phase.DATA:
            self._bad = 0  # a message was delivered: the client is not just probing
        elif code in _ERROR_CODES and self.transport is not None:
            self._bad += 1
            if self._bad >= self._max_bad:
                log.warning("too_many_errors", errors=self._bad)
                await super().push("421 4.7.0 Error: too many errors")
                self.transport.close()

    def _count_data_reply(self, status: str | bytes, code: str) -> None:
        """Metrics: received/accepted/refused, from the reply that ends a DATA.

        Counted here rather than in the policy because aiosmtpd itself answers some
        DATAs (``552`` too much mail, ``500`` line too long), and an internal error's
        ``451`` comes from :meth:`handle_exception`.
        """
        assert self._metrics is not None
        if code == "354" and self._phase is _Phase.DATA:
            self._awaiting_data_reply = True
            return
        if not self._awaiting_data_reply:
            return
        self._awaiting_data_reply = False
        self._metrics.message_received()
        if isinstance(status, bytes):
            status = status.decode("ascii", "replace")
        # LMTP: one line per recipient; counted once per message, like SMTP's reply.
        final = combine(status.split("\r\n"))[:3] if "\r\n" in status else code
        if final.startswith("2"):
            self._metrics.message_accepted()
        elif final[:1] in ("4", "5"):
            self._metrics.message_refused(final)

    async def _unknown_command(self, command: str, arg: str | None) -> None:
        log.info("unknown_command", command=sanitize(command, limit=40))
        await self.push("500 5.5.2 Error: command not recognized")

    async def handle_exception(self, error: Exception) -> str:
        """An error inside the session: transient ``451``, never aiosmtpd's ``500``."""
        log.error("session_error", exc_info=error)
        return REPLY_TEMPFAIL

    # -- DATA ---------------------------------------------------------------------------------

    async def smtp_DATA(self, arg: str) -> None:
        """DATA with a size-scaled deadline, handlers exempt from the idle timer."""
        self._phase = _Phase.DATA
        self._data_deadline = self.loop.time() + self._timeout_duration
        try:
            if self._decode_data or "DATA" not in self._handle_hooks:
                await super().smtp_DATA(arg)  # not how maildefer sets sessions up
            else:
                await self._smtp_data(arg)
        finally:
            self._phase = _Phase.COMMAND
            if self.transport is not None:
                self._reset_timeout()
                if self._shutdown_pending or self._tracker.closing:
                    self.close_for_shutdown()

    async def _smtp_data(self, arg: str) -> None:
        """DATA as aiosmtpd 1.4's ``smtp_DATA`` answers it (bytes, ``handle_DATA``), leaner.

        The protocol is aiosmtpd's, reply for reply: lines end at CRLF only, only
        ``.\\r\\n`` ends the data (CVE-2024-27305), a line over ``line_length_limit`` is
        ``500`` and over ``data_size_limit`` bytes is ``552``, both answered after the
        terminator. aiosmtpd's loop joins every line twice into a bytearray and logs it at
        debug level; a 4 KiB message has about 50 lines, and this loop costs half as much
        (tests/test_smtp_data.py compares the two on the same byte streams).
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reader = self._reader
        readuntil = reader.readuntil
        data: list[bytes] = []
        fragments: list[bytes] = []  # the pieces of a line longer than the reader's limit
        num_bytes = 0
        limit = self.data_size_limit
        line_limit = self.line_length_limit
        state = _DataState.NOMINAL
        while self.transport is not None:
            try:
                line: bytes = await readuntil(b"\r\n")
            except asyncio.CancelledError:
                # The connection got reset during DATA (eof_received cancels us).
                _aiosmtpd_log.info("Connection lost during DATA")
                self._writer.close()
                raise
            except asyncio.LimitOverrunError as exc:
                # Longer than the reader's limit: drain it, answer 500 after the terminator.
                if state is _DataState.NOMINAL:
                    state = _DataState.TOO_LONG
                data.clear()
                line = await reader.read(exc.consumed)
            if not fragments and line == b".\r\n":
                break
            num_bytes += len(line)
            if state is _DataState.NOMINAL and limit and num_bytes > limit:
                state = _DataState.TOO_MUCH
                data.clear()
            if fragments or not line.endswith(b"\r\n"):
                fragments.append(line)
                if not line.endswith(b"\r\n"):
                    continue
                line = b"".join(fragments)
                fragments.clear()
            if state is _DataState.NOMINAL:
                if len(line) > line_limit:
                    state = _DataState.TOO_LONG
                    data.clear()
                else:
                    # RFC 5321 4.5.2: a leading dot was added by the client; drop it.
                    data.append(line[1:] if line[:1] == b"." else line)
        if state is not _DataState.NOMINAL:
            if state is _DataState.TOO_LONG:
                await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            else:
                await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        assert not fragments  # a line cut off only by a lost connection, which cancels us
        original_content = b"".join(data)
        data.clear()
        self.envelope.content = original_content
        self.envelope.original_content = original_content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        if command != "DATA":
            return await super()._call_handler_hook(command, *args)
        self._phase = _Phase.HANDLER
        try:
            return await super()._call_handler_hook(command, *args)
        finally:
            self._phase = _Phase.DATA


class LMTPSession(SMTPSession, LMTP):
    """One LMTP connection (``lmtp = true``): LHLO, one DATA reply per recipient.

    Example:
        >>> [c.__name__ for c in LMTPSession.__mro__[:3]]
        ['LMTPSession', 'SMTPSession', 'LMTP']
    """


def smtp_factory(
    settings: ServerSettings,
    recipients: Recipients,
    tracker: SessionTracker,
    *,
    tls_context: ssl.SSLContext | None = None,
    per_recipient: bool = True,
    metrics: Metrics | None = None,
) -> Callable[[], SMTPSession]:
    """The protocol factory for ``loop.create_server``: one session per connection.

    Args:
        settings: the ``[server]`` table (limits, hostname, ``lmtp``).
        recipients: who is accepted at RCPT and where DATA goes (the router).
        tracker: the listener's session registry (caps, shutdown).
        tls_context: offer STARTTLS with this context.
        per_recipient: deliver once per recipient (the router) or once per message.
        metrics: where to count messages and refusals and time the handlers.

    Example:
        >>> f = smtp_factory(ServerSettings(hostname="h"), AcceptAll(), SessionTracker())
        >>> f.func.__name__
        'SMTPSession'
    """
    policy = DeliveryPolicy(recipients, settings, per_recipient=per_recipient, metrics=metrics)
    cls = LMTPSession if settings.lmtp else SMTPSession
    return partial(cls, policy, tracker, settings=settings, tls_context=tls_context)
