"""The SMTP/LMTP protocol engine: aiosmtpd's ``SMTP`` with maildefer's limits and DATA loop.

:func:`smtp_factory` makes the protocol factory for ``loop.create_server``
(:mod:`maildefer.smtp.server` owns the listener): one :class:`SMTPSession` (or
:class:`LMTPSession`) per connection, all sharing one
:class:`~maildefer.smtp.policy.DeliveryPolicy` (the aiosmtpd "handler": RCPT and DATA
decisions) and one :class:`~maildefer.smtp.policy.SessionTracker` (caps, shutdown).

What this adds to aiosmtpd (docs/reliability.md R23-R31; each part says why where it is): the
tracker's connection caps; a command idle timeout and a DATA deadline that grows with the
bytes received; ``421`` after ``max_bad_commands`` error replies; a cap on "junk" commands;
``451`` for internal errors; RFC 3463 codes on aiosmtpd's replies. The message bytes are
stored exactly as received (``decode_data=False``, no ``Received:`` header): the queue
promises byte-exact storage and its envelope record keeps the peer and the time.

aiosmtpd internals: this is the one module in maildefer that uses them. Each member below
was checked against aiosmtpd 1.4.6 (``aiosmtpd/smtp.py``), hence ``aiosmtpd<1.5`` in
pyproject.toml; tests/test_smtp_session.py runs our code against aiosmtpd's own on the
same inputs, and a failure there after an aiosmtpd upgrade means re-checking this list.

- Overridden, each calling aiosmtpd's through ``super()``: ``_handle_client()`` (the task
  ``connection_made`` starts; we bind its log context and, with ``proxy_protocol``, read
  the PROXY header before aiosmtpd's greeting), ``_timeout_cb()`` (the idle
  timer's callback; we re-arm it while the handlers run or the DATA deadline lies ahead,
  and say ``421``), ``_getaddr(arg)`` (the MAIL/RCPT path parser, ``(address, rest)`` or
  ``(None, None)``; we add a fast path and catch the stdlib parser's crashes),
  ``_call_handler_hook(command, *args)`` (we mark the handler phase around DATA's hook).
- ``_smtp_methods``: the command dict built in ``__init__``, looked up with ``.get()`` by
  ``_handle_client`` and ``smtp_HELP`` (which also calls ``.items()``); wrapped in
  :class:`_CommandTable`.
- ``_timeout_duration`` (the ``timeout=`` argument, read), ``_timeout_handle`` (the armed
  ``TimerHandle``, replaced when we re-arm, cancelled while a PROXY header is awaited),
  ``_reset_timeout()`` (called after DATA and after the PROXY header). STARTTLS makes a
  new ``session`` with the transport's ``peer``: ``connection_made`` puts a PROXY client back.
- ``_reader`` (the ``StreamReader`` our DATA loop reads with ``readuntil`` and ``read``),
  ``_writer`` (closed when DATA is cancelled, as aiosmtpd does), ``_set_post_data_state()``
  (a new envelope after DATA), ``_handle_hooks`` and ``_decode_data`` (read: does our DATA
  loop apply).
- The ``mail.log`` logger and the reply texts of aiosmtpd's ``smtp_DATA`` and command loop
  (``_REWRITES`` maps them; our DATA loop gives the same texts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import structlog
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP

from maildefer.logs import sanitize
from maildefer.settings import ServerSettings
from maildefer.smtp.policy import (
    REPLY_TEMPFAIL,
    DeliveryPolicy,
    SessionTracker,
    combine,
)
from maildefer.smtp.proxy import ProxyGate
from maildefer.smtp.spool import REPLY_NO_STORAGE, MessageSink, attach, default_spool

log = structlog.get_logger("maildefer.smtp")
_aiosmtpd_log = logging.getLogger("mail.log")  # aiosmtpd's logger, for its DATA log line

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
# the address between the brackets (tests/test_smtp_session.py checks that against it).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*)>(.*)", re.DOTALL)


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

    Made by :func:`smtp_factory`; not created by hand. The tracker reaches it through
    :attr:`busy`, :meth:`close_for_shutdown` and :meth:`abort`.

    Example:
        >>> import asyncio, io
        >>> from maildefer import logs; logs.configure(stream=io.StringIO())
        >>> from maildefer.smtp.policy import AcceptAll, SessionTracker
        >>> async def stop(how):  # an idle session told to go: what its client reads
        ...     tracker = SessionTracker()
        ...     settings = ServerSettings(hostname="h")
        ...     factory = smtp_factory(settings, DeliveryPolicy(AcceptAll(), settings), tracker)
        ...     server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        ...     reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        ...     await reader.readline()  # the 220 greeting
        ...     (session,) = tracker.sessions
        ...     getattr(session, how)()
        ...     said = await reader.read()
        ...     writer.close(); await writer.wait_closed(); server.close()
        ...     return session.busy, said
        >>> asyncio.run(stop("close_for_shutdown"))
        (False, b'421 4.3.2 Service shutting down\\r\\n')
        >>> asyncio.run(stop("abort"))
        (False, b'')
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
        self._ip: str | None = ""  # the address counted per IP (None: a PROXY header awaited)
        self._proxy = ProxyGate.of(settings)  # None: proxy_protocol off
        self._client: tuple[str, int] | None = None  # the one a PROXY header named
        self._session_id = ""
        self._shutdown_pending = False
        self._metrics = policy.metrics
        self._spool = policy.spool if policy.spool is not None else default_spool(settings)
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
            if self._client is not None and self.session is not None:
                self.session.peer = self._client  # type: ignore[assignment]  # not the proxy
            return
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        # Behind a proxy, counted per IP once the PROXY header names the client.
        self._ip = address if self._proxy is None else None
        if self._proxy is not None and not self._proxy.admits(address, transport):
            self._refused = True
            return
        refusal = self._tracker.admit(self, self._ip)
        if refusal is not None:
            self._refused = True
            log.info("connection_refused", peer=sanitize(address), reply=refusal)
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
            # aiosmtpd re-arms its idle timer per command, never during DATA: ours is this.
            now = self.loop.time()
            if self._min_rate:
                # Postfix's smtpd_min_data_rate: each read earns len/rate seconds, but the
                # deadline never lies more than one command timeout ahead.
                self._data_deadline = min(
                    now + self._timeout_duration, self._data_deadline + len(data) / self._min_rate
                )
            else:  # data_min_rate = 0: only an idle timeout between reads
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
        if self._proxy is not None and not await self._proxy_header(self._proxy):
            return
        log.debug("connected")
        await super()._handle_client()

    async def _proxy_header(self, gate: ProxyGate) -> bool:
        """The PROXY header, before any greeting: its client is the peer; ``False``: closed."""
        assert self.session is not None and isinstance(self.transport, asyncio.WriteTransport)
        if self._timeout_handle is not None:  # the header has its own, shorter deadline;
            self._timeout_handle.cancel()  # aiosmtpd's timer would say 421 on the way out
        header = await gate.read(self._reader, self.transport)
        if header is None:  # refused (logged) and closed
            return False
        proxy = self.session.peer
        ip = header.client[0] if header.client else str(proxy[0] if proxy else "")
        if refusal := self._tracker.readmit(self, ip):
            log.info("connection_refused", peer=sanitize(ip), reply=refusal)
            self.transport.write(refusal.encode("ascii") + b"\r\n")
            self.transport.close()
            return False
        self._ip, self._client = ip, header.client
        if header.client is not None:
            self.session.peer = header.client  # type: ignore[assignment]
        self._reset_timeout()
        return True

    def close_for_shutdown(self) -> None:
        """Tell an idle client the service is going away, and close (a busy one: after DATA)."""
        if self.busy:
            self._shutdown_pending = True
            return
        # A closing TLS transport (the client quit just now) raises on write: skip it.
        if isinstance(self.transport, asyncio.WriteTransport) and not self.transport.is_closing():
            self.transport.write(b"421 4.3.2 Service shutting down\r\n")
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now (handlers are cancelled by aiosmtpd)."""
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
        (tests/test_smtp_session.py compares the two on the same byte streams). Ours keeps
        memory bounded (spool.py): a large message is spooled as it arrives, and a spool
        that cannot be written is ``452 4.3.1`` after the terminator.
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
        # The bytes go to the sink: in memory under the budget, else spooled (spool.py);
        # closing it, however DATA ends, releases the budget and removes the spool file.
        sink = self._spool.sink()
        try:
            await self._receive_data(sink)
        finally:
            sink.close()

    async def _receive_data(self, sink: MessageSink) -> None:
        """The DATA loop of :meth:`_smtp_data`, its reply, and the handlers in between."""
        assert self.envelope is not None
        reader = self._reader
        readuntil = reader.readuntil
        data, mark = sink.lines, sink.mark
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
                sink.discard()
                line = await reader.read(exc.consumed)
            if not fragments and line == b".\r\n":
                break
            num_bytes += len(line)
            if state is _DataState.NOMINAL and limit and num_bytes > limit:
                state = _DataState.TOO_MUCH
                sink.discard()
            if fragments or not line.endswith(b"\r\n"):
                fragments.append(line)
                if not line.endswith(b"\r\n"):
                    continue
                line = b"".join(fragments)
                fragments.clear()
            if state is _DataState.NOMINAL:
                if len(line) > line_limit:
                    state = _DataState.TOO_LONG
                    sink.discard()
                else:
                    # RFC 5321 4.5.2: a leading dot was added by the client; drop it.
                    data.append(line[1:] if line[:1] == b"." else line)
                    if num_bytes > mark:  # once per budget step, not per line
                        await sink.overflow(num_bytes)
                        mark = sink.mark
        if state is not _DataState.NOMINAL:
            if state is _DataState.TOO_LONG:
                await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            else:
                await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        assert not fragments  # a line cut off only by a lost connection, which cancels us
        content = await sink.finish()
        if content is None:  # the spool could not be written: nothing is stored
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(REPLY_NO_STORAGE)
            return
        attach(self.envelope, content)  # bytes, or a spool file the policy hands on
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

    :func:`smtp_factory`'s example shows one.
    """


def smtp_factory(
    settings: ServerSettings,
    policy: DeliveryPolicy,
    tracker: SessionTracker,
    *,
    tls_context: ssl.SSLContext | None = None,
) -> Callable[[], SMTPSession]:
    """The protocol factory for ``loop.create_server``: one session per connection.

    Args:
        settings: the ``[server]`` table (limits, hostname, ``lmtp``).
        policy: the one aiosmtpd handler every session shares: who is accepted at RCPT,
            where DATA goes, and the checks on the way (disk guard, sender authentication).
        tracker: the listener's session registry (caps, shutdown).
        tls_context: offer STARTTLS with this context.

    Example:
        >>> import asyncio, io
        >>> from maildefer import logs; logs.configure(stream=io.StringIO())
        >>> from maildefer.smtp.policy import AcceptAll, SessionTracker
        >>> async def talk(settings, *commands):  # one connection: what the server said
        ...     policy = DeliveryPolicy(AcceptAll(), settings)
        ...     factory = smtp_factory(settings, policy, SessionTracker())
        ...     server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        ...     reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        ...     writer.write(b"".join(c + b"\\r\\n" for c in commands))
        ...     said = await reader.read()  # until the server closes
        ...     writer.close(); await writer.wait_closed(); server.close()
        ...     print(*said.decode().splitlines(), sep="\\n")
        >>> smtp = ServerSettings(hostname="mx.test", max_bad_commands=2)
        >>> asyncio.run(talk(smtp, b"HELO c", b"FOO", b"RCPT TO:<b@y>", b"NOOP"))
        220 mx.test maildefer ESMTP
        250 mx.test
        500 5.5.2 Error: command not recognized
        503 Error: need MAIL command
        421 4.7.0 Error: too many errors
        >>> lmtp = ServerSettings(hostname="mx.test", lmtp=True)
        >>> mail = (b"MAIL FROM:<a@x>", b"RCPT TO:<b@y>", b"RCPT TO:<c@y>", b"DATA", b"hi", b".")
        >>> asyncio.run(talk(lmtp, b"LHLO c", *mail, b"QUIT"))  # doctest: +ELLIPSIS
        220 mx.test maildefer ESMTP
        ...
        250 2.0.0 Ok: queued
        250 2.0.0 Ok: queued
        221 Bye
    """
    cls = LMTPSession if settings.lmtp else SMTPSession
    if policy.spool is None:  # the memory budget and spool directory every session shares
        policy = dataclasses.replace(policy, spool=default_spool(settings))
    return partial(cls, policy, tracker, settings=settings, tls_context=tls_context)
