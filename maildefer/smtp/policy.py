"""The SMTP policy: who is accepted at RCPT, where DATA goes, connection caps, replies.

Everything here goes through aiosmtpd's *public* handler API: the ``handle_EHLO``,
``handle_MAIL``, ``handle_RCPT`` and ``handle_DATA`` hooks and the
:class:`~aiosmtpd.smtp.Session` and :class:`~aiosmtpd.smtp.Envelope` they are given. The
protocol engine, which needs aiosmtpd's internals, is :mod:`maildefer.smtp.session`. A
listener shares one :class:`DeliveryPolicy` (the aiosmtpd "handler") and one
:class:`SessionTracker` between all its connections.

What aiosmtpd does not do and this module adds (docs/reliability.md R23-R31):

- MAIL FROM: ``452 4.3.1`` while the queues' disk is nearly full (the
  :class:`~maildefer.smtp.diskguard.DiskGuard`, R8); the sender is recorded only otherwise.
- RCPT: an address no route matches gets ``550 5.1.1``; past ``max_recipients``,
  ``452 4.5.3``. Nothing is ever relayed.
- DATA: the handlers run once per accepted recipient, *concurrently* (their pushes share
  one directory fsync, and ``handler_timeout`` bounds the whole DATA); ``250`` only after
  all of them returned. A raise or a timeout gives ``451 4.3.0``; a handler's
  :class:`~maildefer.errors.SMTPError` gives its own reply. In SMTP mode one reply covers
  every recipient: the first transient failure wins, then the first permanent one, so a
  partial failure is retried (at-least-once: a recipient whose handler succeeded may see
  the message again). LMTP answers per recipient (RFC 2033 section 4.2).
- Connection caps (global and per IP, ``421 4.7.0``) and the shutdown order: idle
  sessions are closed at once, busy ones after their transaction.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

from maildefer.errors import NoRouteError, SMTPError
from maildefer.logs import sanitize
from maildefer.mail import MailRequest
from maildefer.queue.spooled import SpooledMailRequest
from maildefer.settings import ServerSettings
from maildefer.smtp.diskguard import DiskGuard, announced_size
from maildefer.smtp.spool import Spool, spooled_content

if TYPE_CHECKING:
    from maildefer.ops.metrics import Metrics
    from maildefer.smtp.authcheck import AuthChecker

# One logger name for the whole SMTP side (policy and session), as before the split.
log = structlog.get_logger("maildefer.smtp")

# DATA's replies: every handler returned; one raised (or the session hit an internal
# error), so the client retries; the handlers overran ``handler_timeout``.
REPLY_OK = "250 2.0.0 Ok: queued"
REPLY_TEMPFAIL = "451 4.3.0 Error: local error in processing, try again later"
REPLY_TIMEOUT = "451 4.3.0 Error: handler timed out, try again later"


class RecipientRouter(Protocol):
    """What the SMTP layer needs from a router: who is local, and delivery.

    :class:`maildefer.routing.Router` is one; :class:`AcceptAll` is the log server's.

    Example:
        >>> router: RecipientRouter = AcceptAll()
        >>> router.match("anyone@anywhere")
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
        >>> import asyncio, io, types
        >>> from maildefer import logs; logs.configure(stream=io.StringIO())
        >>> seen = []
        >>> async def sink(message): seen.append(message.rcpt_tos)
        >>> policy = DeliveryPolicy(
        ...     AcceptAll(sink), ServerSettings(hostname="h"), per_recipient=False)
        >>> env = types.SimpleNamespace(
        ...     original_content=b"\\r\\n", mail_from="a@x", rcpt_tos=["b@y", "c@y", "d@y"])
        >>> asyncio.run(policy.handle_DATA(None, types.SimpleNamespace(peer=None), env))
        '250 2.0.0 Ok: queued'
        >>> seen
        [['b@y', 'c@y', 'd@y']]
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
            >>> import asyncio
            >>> async def sink(message): print(message.raw)
            >>> asyncio.run(AcceptAll(sink).deliver(MailRequest(b"Subject: x\\r\\n")))
            b'Subject: x\\r\\n'
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
        >>> combine(["250 ok", "550 5.7.1 no"])
        '550 5.7.1 no'
        >>> combine([]) == REPLY_OK
        True
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
        router: the router (or any :class:`RecipientRouter`).
        settings: the ``[server]`` limits; ``settings.lmtp`` selects LMTP's DATA replies
            (one per recipient), as it selects the LMTP session class in
            :func:`~maildefer.smtp.session.smtp_factory`.
        per_recipient: deliver once per accepted recipient (the router), or once per
            message (the log server).
        metrics: counts refused recipients and times the handlers (optional).
        disk_guard: refuses MAIL FROM with ``452 4.3.1`` while the queues' disk is
            nearly full (docs/reliability.md R8; optional).
        auth: checks SPF/DKIM/DMARC on each message before its handlers run, for
            ``message.auth`` and the ``Authentication-Results`` header (``[auth] verify``).
        spool: the memory budget and spool directory the sessions share; a ``SIZE=``
            it cannot take is refused at MAIL FROM (``smtp_factory`` supplies a default).

    Example:
        >>> import asyncio, io, types
        >>> from maildefer import logs; logs.configure(stream=io.StringIO())
        >>> class OnlyNews:  # a RecipientRouter
        ...     def match(self, address):
        ...         return [address] if address.startswith("news@") else []
        ...     async def deliver(self, message):
        ...         print("delivered to", message.rcpt_to)
        >>> policy = DeliveryPolicy(OnlyNews(), ServerSettings(hostname="mx.test"))
        >>> env = types.SimpleNamespace(
        ...     rcpt_tos=[], rcpt_options=[], mail_from="a@x.test", original_content=b"\\r\\n")
        >>> for rcpt in ("news@example.com", "bob@example.com"):
        ...     print(asyncio.run(policy.handle_RCPT(None, None, env, rcpt, [])))
        250 2.1.5 Ok
        550 5.1.1 <bob@example.com>: Recipient address rejected
        >>> asyncio.run(policy.handle_DATA(None, types.SimpleNamespace(peer=None), env))
        delivered to news@example.com
        '250 2.0.0 Ok: queued'
    """

    router: RecipientRouter
    settings: ServerSettings
    per_recipient: bool = True
    metrics: Metrics | None = None
    disk_guard: DiskGuard | None = None
    auth: AuthChecker | None = None
    spool: Spool | None = None

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
            >>> s.host_name
            'c'
        """
        # With the 5-argument hook aiosmtpd leaves recording the greeting to us.
        session.host_name = hostname
        return [r for r in responses if not r[4:].startswith("AUTH")]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """MAIL FROM: ``452 4.3.1`` when the message would not fit (disk guard, spool).

        aiosmtpd has checked the syntax and ``SIZE`` against ``max_message_size`` (552)
        before this hook; with the hook, recording the sender is ours to do.

        Example:
            >>> import asyncio, types
            >>> env = types.SimpleNamespace(mail_from=None, mail_options=[])
            >>> full = DiskGuard(["/"], min_free=2**62)
            >>> p = DeliveryPolicy(AcceptAll(), ServerSettings(hostname="h"), disk_guard=full)
            >>> asyncio.run(p.handle_MAIL(None, None, env, "a@b", ["SIZE=100"]))
            '452 4.3.1 Error: insufficient system storage'
            >>> env.mail_from is None  # not recorded: the client must MAIL again
            True
            >>> p.disk_guard = None
            >>> asyncio.run(p.handle_MAIL(None, None, env, "a@b", ["SIZE=100"]))
            '250 OK'
            >>> env.mail_from, env.mail_options
            ('a@b', ['SIZE=100'])
        """
        if self.disk_guard is not None or self.spool is not None:
            size = announced_size(mail_options)
            # RFC 1870: refused before the data is sent: the queues' disk (the guard), or
            # a SIZE= larger than the spool it would be written to can take.
            refusal = self.disk_guard.refusal(size) if self.disk_guard is not None else None
            if refusal is None and self.spool is not None:
                refusal = self.spool.size_refusal(size)
            if refusal is not None:
                if self.metrics is not None:
                    self.metrics.message_refused(452)
                return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"  # aiosmtpd's own reply when there is no hook

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
            >>> p = DeliveryPolicy(AcceptAll(), ServerSettings(hostname="h", max_recipients=1))
            >>> asyncio.run(p.handle_RCPT(None, None, env, "a@b", []))
            '250 2.1.5 Ok'
            >>> asyncio.run(p.handle_RCPT(None, None, env, "c@d", []))
            '452 4.5.3 Error: too many recipients'
            >>> env.rcpt_tos
            ['a@b']
        """
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            if self.metrics is not None:
                self.metrics.message_refused(452)
            return "452 4.5.3 Error: too many recipients"
        if not self.router.match(address):
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
            >>> import asyncio, io, types
            >>> from maildefer import logs; logs.configure(stream=io.StringIO())
            >>> env = types.SimpleNamespace(
            ...     original_content=b"\\r\\n", mail_from="<>", rcpt_tos=["a@y", "b@y"])
            >>> ses = types.SimpleNamespace(peer=("127.0.0.1", 5))
            >>> lmtp = DeliveryPolicy(AcceptAll(), ServerSettings(hostname="h", lmtp=True))
            >>> asyncio.run(lmtp.handle_DATA(None, ses, env)).split("\\r\\n")
            ['250 2.0.0 Ok: queued', '250 2.0.0 Ok: queued']
        """
        started = time.monotonic()
        peer = session.peer
        raw: bytes = envelope.original_content or b""
        spooled = spooled_content(envelope)  # a large message: in a spool file, not in raw
        mail_from = "" if envelope.mail_from == "<>" else envelope.mail_from or ""  # null sender
        rcpt_tos = list(envelope.rcpt_tos)
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        request = (
            MailRequest(raw, mail_from=mail_from, rcpt_tos=rcpt_tos, peer=client)
            if spooled is None
            else SpooledMailRequest(spooled, mail_from=mail_from, rcpt_tos=rcpt_tos, peer=client)
        )
        if self.auth is not None:
            # [auth] verify: message.auth and the Authentication-Results header, before
            # any handler sees the message (maildefer/smtp/authcheck.py).
            ip = str(peer[0]) if isinstance(peer, tuple) else None
            await self.auth.apply(request, ip=ip, helo=session.host_name)
        if self.metrics is None:
            replies = await self._deliver(request)
        else:
            with self.metrics.handling("serve"):
                replies = await self._deliver(request)
        if self.settings.lmtp:
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
            size=len(raw) if spooled is None else spooled.size,
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
                await self.router.deliver(request)
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


class TrackedSession(Protocol):
    """What :class:`SessionTracker` needs from a session (an ``SMTPSession`` is one)."""

    @property
    def busy(self) -> bool:
        """In a transaction (DATA or its handlers): shutdown lets it finish."""
        ...

    def close_for_shutdown(self) -> None:
        """Say ``421`` and close once idle."""
        ...

    def abort(self) -> None:
        """Drop the connection now."""
        ...


@dataclass
class SessionTracker:
    """Every open session of one listener: connection caps and graceful shutdown.

    Args:
        max_connections: global cap on concurrent sessions.
        max_per_ip: cap on concurrent sessions from one address.

    Example:
        >>> t = SessionTracker(max_connections=1)
        >>> first, second = object(), object()
        >>> t.admit(first, "10.0.0.1") is None, t.count
        (True, 1)
        >>> t.admit(second, "10.0.0.2")
        '421 4.7.0 Error: too many connections'
        >>> t.release(first, "10.0.0.1"); t.admit(second, "10.0.0.2") is None
        True
    """

    max_connections: int = 500
    max_per_ip: int = 50
    closing: bool = False
    sessions: set[TrackedSession] = field(default_factory=set)
    per_ip: dict[str, int] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _empty: asyncio.Event | None = None

    @property
    def count(self) -> int:
        """How many sessions are open (the class example shows it counting)."""
        return len(self.sessions)

    def admit(self, session: TrackedSession, ip: str | None) -> str | None:
        """Register a new session; the refusal reply if a cap is reached.

        ``ip=None`` counts it toward ``max_connections`` only, until :meth:`readmit` gives
        its address (a PROXY-protocol connection: its peer is the proxy, not the client).

        Example:
            >>> t = SessionTracker(max_connections=5, max_per_ip=1)
            >>> t.admit(object(), "10.0.0.1") is None
            True
            >>> t.admit(object(), "10.0.0.1")
            '421 4.7.0 Error: too many connections from your address'
        """
        if self.closing:
            return "421 4.3.2 Service shutting down"
        if len(self.sessions) >= self.max_connections:
            return "421 4.7.0 Error: too many connections"
        if ip is not None and self.per_ip.get(ip, 0) >= self.max_per_ip:
            return "421 4.7.0 Error: too many connections from your address"
        self.sessions.add(session)
        if ip is not None:
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def readmit(self, session: TrackedSession, ip: str) -> str | None:
        """Count a session admitted with ``ip=None`` under ``ip``; the refusal at the cap.

        Example:
            >>> t = SessionTracker(max_per_ip=1); a, b = object(), object()
            >>> t.admit(a, None), t.admit(b, None), t.count, t.per_ip
            (None, None, 2, {})
            >>> t.readmit(a, "203.0.113.7"), t.readmit(b, "203.0.113.7")
            (None, '421 4.7.0 Error: too many connections from your address')
            >>> t.per_ip  # b is still counted under no address, until it is released
            {'203.0.113.7': 1}
        """
        assert session in self.sessions
        if self.per_ip.get(ip, 0) >= self.max_per_ip:
            return "421 4.7.0 Error: too many connections from your address"
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def release(self, session: TrackedSession, ip: str | None) -> None:
        """Forget a closed session (one never admitted is ignored).

        Example:
            >>> t = SessionTracker(); s = object()
            >>> t.admit(s, "10.0.0.1"); t.per_ip
            {'10.0.0.1': 1}
            >>> t.release(s, "10.0.0.1"); t.per_ip, t.count
            ({}, 0)
            >>> t.release(object(), "10.0.0.1"); t.per_ip
            {}
        """
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        left = self.per_ip.get(ip, 1) - 1 if ip is not None else 0
        if ip is not None and left > 0:
            self.per_ip[ip] = left
        elif ip is not None:
            self.per_ip.pop(ip, None)
        if not self.sessions and self._empty is not None:
            self._empty.set()

    def next_id(self) -> str:
        """A short id for a new session's log lines.

        Example:
            >>> t = SessionTracker(); t.next_id(), t.next_id()
            ('s1', 's2')
        """
        return f"s{next(self._ids)}"

    def begin_shutdown(self) -> None:
        """Refuse new sessions; close idle ones now, busy ones after their transaction.

        Example:
            >>> class Idle:
            ...     busy = False
            ...     def close_for_shutdown(self): print("421 sent")
            >>> t = SessionTracker(); t.admit(Idle(), "10.0.0.1")
            >>> t.begin_shutdown()
            421 sent
            >>> t.admit(Idle(), "10.0.0.2")
            '421 4.3.2 Service shutting down'
        """
        self.closing = True
        for session in list(self.sessions):
            if not session.busy:
                session.close_for_shutdown()

    async def wait_empty(self, within: float) -> bool:
        """Wait until every session has closed; ``False`` if ``within`` seconds passed first.

        Example:
            >>> import asyncio
            >>> async def drain(release_after):
            ...     t = SessionTracker(); s = object(); t.admit(s, "10.0.0.1")
            ...     asyncio.get_running_loop().call_later(release_after, t.release, s, "10.0.0.1")
            ...     return await t.wait_empty(0.5)
            >>> asyncio.run(drain(0.01)), asyncio.run(drain(5))
            (True, False)
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
            >>> class Open:
            ...     busy = True
            ...     def abort(self): print("dropped")
            >>> t = SessionTracker(); t.admit(Open(), "10.0.0.1")
            >>> t.abort_all()
            dropped
        """
        for session in list(self.sessions):
            session.abort()
