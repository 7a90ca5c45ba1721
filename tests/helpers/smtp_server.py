"""Helpers for the SMTP tests: a handler package in tmp_path, a running Server, a raw client."""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from maildefer.queue.envelope import request_from_file
from maildefer.settings import Settings
from maildefer.smtp.server import Server

# A handler module for tests: the local part decides what the handler does.
HANDLERS = """
import asyncio
from maildefer import Queue, SMTPError, route, stateless

CALLS = []

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    CALLS.append(message.rcpt_to)
    if name.startswith("fail"):
        raise RuntimeError("boom")
    if name.startswith("slow"):
        await asyncio.sleep(float(name.split("-", 1)[1]))
    if name.startswith("refuse"):
        raise SMTPError(550, "5.7.1 Not wanted here")
    if name.startswith("busy"):
        raise SMTPError(450, "4.2.1 Mailbox busy, try later")
    await Queue("run/posts").push(message)
"""


def write_handlers(root: Path, source: str = HANDLERS) -> str:
    """Write a handler module with a unique name under ``root``; returns its name."""
    name = f"smtp_test_handlers_{uuid.uuid4().hex[:12]}"
    (root / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def make_settings(
    root: Path, module: str, *, queues: dict[str, Any] | None = None, **server: Any
) -> Settings:
    values: dict[str, Any] = {
        "port": 0,
        "hostname": "mx.test",
        "handlers": [module],
        "grace_period": 5.0,
        **server,
    }
    return Settings(
        root=root,
        server=values,
        router={"defaults": {"host": r"example\.com"}},
        queues=queues or {},
    )


@contextlib.asynccontextmanager
async def running(settings: Settings, **kwargs: Any) -> AsyncIterator[Server]:
    server = Server(settings, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


def queued(path: Path) -> list[Any]:
    """The MailRequests in a maildir queue's new/, in the order they were queued.

    Sorted by the key's time as numbers: ``M<usec>`` is not zero-padded, so a plain
    string sort puts ``M99999`` after ``M100000``.
    """
    new = path / "new"
    if not new.exists():
        return []

    def order(p: Path) -> tuple[int, int, int, str]:
        sec, _, rest = p.name.partition(".M")
        usec, _, rest = rest.partition("P")
        seq = rest.partition("Q")[2].partition("R")[0]
        numbers = [int(x) if x.isdigit() else 0 for x in (sec, usec, seq)]
        return numbers[0], numbers[1], numbers[2], p.name

    return [request_from_file(p.read_bytes()) for p in sorted(new.iterdir(), key=order)]


class RawClient:
    """A byte-level SMTP client: what smtplib cannot send (bare LF, NUL, long lines)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, *, greet: bool = True) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
        client = cls(reader, writer)
        if greet:
            code, _ = await client.reply()
            assert code == 220
        return client

    async def reply(self, within: float = 10.0) -> tuple[int, str]:
        """One (possibly multi-line) reply: the code and the text lines joined."""
        lines = []
        async with asyncio.timeout(within):
            while True:
                line = await self.reader.readline()
                if not line:
                    raise ConnectionError("closed")
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(text)
                if len(text) < 4 or text[3] != "-":
                    return int(text[:3]), "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> tuple[int, str]:
        data = line.encode() if isinstance(line, str) else line
        await self.send(data + b"\r\n")
        return await self.reply()

    async def transaction(self, mail_from: str, rcpts: list[str], body: bytes) -> tuple[int, str]:
        """MAIL, RCPTs, DATA with ``body`` sent as is (must end in CRLF.CRLF)."""
        code, text = await self.cmd(f"MAIL FROM:<{mail_from}>")
        assert code == 250, text
        for rcpt in rcpts:
            code, text = await self.cmd(f"RCPT TO:<{rcpt}>")
            assert code == 250, text
        code, text = await self.cmd("DATA")
        assert code == 354, text
        await self.send(body)
        return await self.reply()

    async def closed(self, within: float = 10.0) -> bool:
        """Read until EOF; True once the server closed the connection."""
        async with asyncio.timeout(within):
            while await self.reader.read(65536):
                pass
        await self.close()
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
