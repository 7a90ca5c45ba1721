"""What the pytest fixtures of :mod:`maildefer.testing.plugin` hand to a test.

Each class works on its own too, without pytest: a captured relay (:class:`CapturedRelay`),
queues in a directory with a burst run of their handlers (:class:`TestQueues`), a real
SMTP listener on port 0 (:class:`TestServer`), and the project's settings moved into a
temporary directory (:func:`project_settings`).

Example:
    >>> import asyncio
    >>> from maildefer.mail import MailResponse
    >>> relay = CapturedRelay()
    >>> asyncio.run(relay.deliver(MailResponse(To="a@x.org", From="b@y.org", Subject="Hi")))
    '250 captured'
    >>> [m["Subject"] for m in relay.delivered(to="a@x.org")]
    ['Hi']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from email.message import Message
from email.utils import getaddresses, parseaddr
from pathlib import Path
from types import TracebackType

from maildefer.mail import MailRequest, MailResponse
from maildefer.queue import Queue
from maildefer.queue.config import QueueRegistry, queue_options, resolve_queue
from maildefer.queue.keys import key_time
from maildefer.relay import Relay, Sendable
from maildefer.routing import Router
from maildefer.settings import QueueSettings, Settings, load_settings
from maildefer.smtp.server import Server
from maildefer.state import MemoryStateStore
from maildefer.worker import Worker, WorkerStats

__all__ = ["CapturedRelay", "TestQueues", "TestServer", "project_settings"]


def project_settings(root: Path, tmp: Path) -> Settings:
    """The settings of the project at ``root``, its queues and SMTP port made disposable.

    Every maildir queue path (and ``[undeliverable]``) becomes absolute under ``tmp``,
    so what a test pushes never lands in the project; ``[server] port`` becomes 0 (a
    free port). Templates and other paths still resolve against ``root``.

    Example:
        >>> import tempfile
        >>> s = project_settings(Path(tempfile.mkdtemp()), Path("/tmp/t"))
        >>> s.server.port, s.undeliverable.path
        (0, '/tmp/t/run/undeliverable')
    """
    config = root / "config" / "settings.toml"
    settings = load_settings(config) if config.is_file() else Settings(root=root)

    def moved(path: str) -> str:
        return path if "://" in path or Path(path).is_absolute() else str(tmp / path)

    queues = {
        name: queue.model_copy(update={"path": moved(queue.path)})
        for name, queue in settings.queues.items()
    }
    return settings.model_copy(
        update={
            "queues": queues,
            "undeliverable": settings.undeliverable.model_copy(
                update={"path": moved(settings.undeliverable.path)}
            ),
            "server": settings.server.model_copy(update={"port": 0}),
        }
    )


class CapturedRelay(Relay):
    """A relay that records each message instead of sending it (Lamson's ``delivered``).

    Activate it (``with relay.active():``) and every :func:`maildefer.relay.deliver`, and
    the outbox handler, hand it their mail.

    Attributes:
        messages: what was delivered, in order, each with its envelope.

    Example:
        >>> import asyncio
        >>> relay = CapturedRelay()
        >>> raw = b"Subject: x\\r\\n\\r\\nbody\\r\\n"
        >>> _ = asyncio.run(relay.deliver(raw, mail_from="a@x", rcpt_tos=["b@y"]))
        >>> relay.messages[0].rcpt_tos
        ['b@y']
    """

    def __init__(self) -> None:
        super().__init__(port=0)
        self.messages: list[MailRequest] = []

    async def __aenter__(self) -> CapturedRelay:
        return self  # no connections to keep open

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def deliver(
        self,
        message: Sendable,
        *,
        mail_from: str | None = None,
        rcpt_tos: Sequence[str] | None = None,
    ) -> str:
        """Record one message with the envelope :meth:`Relay.deliver` would have used.

        Raises:
            ValueError: raw bytes without an envelope (as the real relay).

        Example:
            >>> import asyncio
            >>> asyncio.run(CapturedRelay().deliver(b"x"))
            Traceback (most recent call last):
            ...
            ValueError: raw bytes need mail_from and rcpt_tos
        """
        if isinstance(message, MailRequest):
            raw = message.raw
            sender = message.mail_from if mail_from is None else mail_from
            recipients = list(message.rcpt_tos if rcpt_tos is None else rcpt_tos)
        else:
            parsed: Message | None
            if isinstance(message, MailResponse):
                parsed = message.to_message()
            elif isinstance(message, bytes):
                parsed = None
            else:
                parsed = message
            raw = message if isinstance(message, bytes) else bytes(parsed or b"")
            if parsed is not None:
                headers = [str(v) for h in ("To", "Cc", "Bcc") for v in parsed.get_all(h, [])]
                sender = parseaddr(str(parsed["From"] or ""))[1] if mail_from is None else mail_from
                recipients = (
                    [a for _, a in getaddresses(headers) if a]
                    if rcpt_tos is None
                    else list(rcpt_tos)
                )
            else:
                sender, recipients = mail_from or "", list(rcpt_tos or [])
                if mail_from is None or not recipients:
                    raise ValueError("raw bytes need mail_from and rcpt_tos")
        self.messages.append(
            MailRequest(raw, mail_from=sender, rcpt_tos=recipients, peer="captured")
        )
        return "250 captured"

    def delivered(self, *, to: str | None = None, subject: str | None = None) -> list[MailRequest]:
        """The captured messages sent to ``to`` (an envelope recipient) with ``subject``.

        Both are exact (addresses case-insensitively); ``None`` matches anything.

        Example:
            >>> CapturedRelay().delivered(to="nobody@x.org")
            []
        """
        found = []
        for message in self.messages:
            if to is not None and to.lower() not in (r.lower() for r in message.rcpt_tos):
                continue
            if subject is not None and message["Subject"] != subject:
                continue
            found.append(message)
        return found


class TestQueues:
    """The project's queues in a temporary directory: what was pushed, and burst runs.

    Retries are due at once (``retry_delay = 0``), so :meth:`run` retries a failing
    message until it is buried after the queue's ``max_attempts``, without waiting.

    Args:
        settings: settings whose queue paths are disposable (:func:`project_settings`).

    Example:
        >>> import tempfile
        >>> q = TestQueues(Settings(queues={"posts": {"path": tempfile.mkdtemp()}}))
        >>> q.registry.get(q.settings.queues["posts"].path).options.retry_delay
        0.0
    """

    __test__ = False  # a helper, not a test class for pytest to collect

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = QueueRegistry(
            undeliverable=settings.undeliverable_ref(),
            options={
                resolve_queue(settings, name): dataclasses.replace(
                    queue_options(queue), retry_delay=0.0, retry_max_delay=0.0
                )
                for name, queue in settings.queues.items()
            },
        )

    def _ref(self, queue: str) -> str:
        # A relative path means what it means to a handler's Queue("run/posts"): from the
        # working directory (the test's tmp_path), where the settings' paths now point.
        if queue in self.settings.queues or "://" in queue:
            return resolve_queue(self.settings, queue)
        return str(Path(queue).absolute())

    def _table(self, queue: str) -> QueueSettings:
        ref = self._ref(queue)
        for name, table in self.settings.queues.items():
            if resolve_queue(self.settings, name) == ref:
                return table
        return QueueSettings(path=ref)

    async def pushed(self, queue: str) -> list[MailRequest]:
        """The messages waiting in a queue (by name, path or URL), oldest first.

        Example:
            >>> import asyncio, tempfile
            >>> q = TestQueues(Settings(queues={"posts": {"path": tempfile.mkdtemp()}}))
            >>> asyncio.run(q.pushed("posts"))
            []
        """
        with self.registry.active():
            box = Queue(self._ref(queue))
            # In the order they were pushed: a key starts with its time (keys() is not sorted).
            keys = sorted(await box.keys(), key=lambda k: (key_time(k) or 0.0, k))
            found = [await box.get(key) for key in keys]
        return [m for m in found if m is not None]

    async def buried(self) -> int:
        """How many messages the undeliverable queue holds.

        Example:
            >>> import asyncio, tempfile
            >>> asyncio.run(TestQueues(Settings(root=tempfile.mkdtemp())).buried())
            0
        """
        with self.registry.active():
            return await Queue(self.settings.resolve(self.settings.undeliverable.path)).count()

    async def run(self, queue: str) -> WorkerStats:
        """Run a queue's handlers on what it holds until it is empty (arq's ``run_check``).

        Burst workers run one after another, so retries come due and are run again,
        until a pass claims nothing; the counts are those of every pass together.

        Example:
            >>> import asyncio, io, tempfile
            >>> from maildefer import logs; logs.configure(stream=io.StringIO())
            >>> s = Settings(queues={"q": {"path": tempfile.mkdtemp(), "handlers": []}})
            >>> asyncio.run(TestQueues(s).run("q")).handled
            0
        """
        table = self._table(queue)
        router = Router.from_modules(
            table.handlers, defaults=self.settings.router.defaults, state=MemoryStateStore()
        )
        backend = self.registry.get(self._ref(queue))
        total = WorkerStats()
        with self.registry.active():
            for _ in range(table.max_attempts + 2):
                worker = Worker(
                    backend,
                    router.deliver,
                    concurrency=table.concurrency,
                    handler_timeout=table.handler_timeout,
                    burst=True,
                    handlers=table.handlers,
                    name=queue,
                    lifespan=router.lifespan(self.settings),
                )
                stats = await worker.serve()
                for field in dataclasses.fields(WorkerStats):
                    name = field.name
                    setattr(total, name, getattr(total, name) + getattr(stats, name))
                if stats.handled + stats.failed + stats.released == 0:
                    break
        return total

    async def close(self) -> None:
        """Close the queues' backends.

        Example:
            >>> import asyncio
            >>> asyncio.run(TestQueues(Settings()).close())
        """
        await self.registry.close()


class TestServer:
    """A real ``serve`` in this process, on a free port, and an SMTP client for it.

    Args:
        settings: the settings to serve with (``[server] port = 0``).
        router: the router to deliver with.

    Example:
        >>> import asyncio, io
        >>> from maildefer import logs; logs.configure(stream=io.StringIO())
        >>> async def demo():
        ...     async with TestServer(Settings(server={"port": 0}), Router([])) as srv:
        ...         return await srv.send("nobody@example.com")
        >>> asyncio.run(demo())
        550
    """

    __test__ = False  # a helper, not a test class for pytest to collect

    def __init__(self, settings: Settings, router: Router) -> None:
        self.server = Server(settings, router=router)

    @property
    def port(self) -> int:
        """The port it listens on."""
        port = self.server.port
        assert port is not None, "not started"
        return port

    async def __aenter__(self) -> TestServer:
        await self.server.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.server.shutdown()

    async def send(
        self,
        to: str,
        subject: str = "test",
        body: str = "test\n",
        *,
        sender: str = "tester@example.com",
    ) -> int:
        """Send one message over SMTP; returns the reply code that ended it.

        That is DATA's reply (250 once the handlers returned, 451 when one raised), or
        the refusal of RCPT (550: no route) or MAIL.
        """
        import aiosmtplib

        message = MailResponse(To=to, From=sender, Subject=subject, Body=body).as_bytes()
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, timeout=30)
        await client.connect()
        try:
            await client.ehlo()
            # Each step's refusal ends the transaction: its code is the answer.
            try:
                await client.mail(sender)
                await client.rcpt(to)
                reply = await client.data(message)
            except aiosmtplib.SMTPResponseException as exc:
                return exc.code
            return reply.code
        finally:
            client.close()
