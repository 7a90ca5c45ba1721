"""A raw-socket SMTP fuzzer against a real ``maildefer serve`` process (R2, R26, R29, R30).

Several clients open connections and send random sequences for a bounded time: valid and
invalid commands, random bytes (NUL, 8-bit, bare CR and LF), very long lines, pipelined
groups, DATA with random bodies, dot-stuffing and fake terminators (``\\n.\\n``, ``\\r.\\r``,
``\\r\\n.\\n``...), partial DATA then a disconnect, abrupt closes (FIN or RST).

The fuzzer keeps a model of the protocol precise enough to predict every reply's owner:
aiosmtpd ends a command line at LF and a DATA line at CRLF, and only a line ``.\\r\\n``
ends DATA (RFC 5321 4.5.2; CVE-2024-27305). For every DATA it computes what the server
must store (the bytes sent, un-dot-stuffed) and whether it must accept it (no line over
1001 octets, not over ``max_message_size``). Afterwards:

- the server still answers a normal delivery with 250;
- every message in the queue is one the fuzzer saw acknowledged (or one whose reply it
  deliberately never read): compared by sha256 of the content plus the envelope;
- every acknowledged message is in the queue, byte-exact;
- the server's open file descriptors went back to their count before the fuzzing;
- no ``tmp/`` debris, no error-level log line, a clean exit on SIGTERM. (One known
  traceback is tolerated until its fix lands: see
  ``test_malformed_addresses_get_a_syntax_error_not_451``.)

``FUZZ_SECONDS`` (default 10) sets the duration, ``FUZZ_SEED`` replays a run: the seed is
printed at the start and in every failure message. With several concurrent clients the
interleaving differs between runs, but each client's byte sequence is the seed's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers.dns_server import dns_server
from helpers.smtp_server import RawClient, make_settings, queued, running, write_handlers

from maildefer.mail import MailRequest
from maildefer.queue.envelope import request_from_file

REPO = Path(__file__).resolve().parent.parent
FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "10"))
CLIENTS = 4
MAX_MESSAGE = 48_000
LINE_LIMIT = 1001  # aiosmtpd's line_length_limit: octets of a DATA line, CRLF included

HANDLER = """
from maildefer import Queue, route, stateless


@route("(name)@(host)")
@stateless
async def START(message, name, host):
    await Queue("run/posts").push(message)
"""

# First words a random line must not start with: they change the session's state (the
# fuzzer sends these only as explicit actions whose effect it tracks from the replies).
STATEFUL = {b"MAIL", b"RCPT", b"RSET", b"HELO", b"EHLO", b"LHLO", b"DATA", b"QUIT"}
STATEFUL |= {b"STARTTLS", b"AUTH", b"BDAT"}
JUNK_WORDS = [b"NOOP", b"HELP", b"VRFY", b"EXPN", b"XYZZY", b"TURN", b"ETRN", b"", b"\x00"]
BAD_ENVELOPE = [
    b"MAIL",
    b"MAIL FROM:",
    b"MAIL TO:<a@b.org>",
    b"MAIL FROM:<a@b.org> SIZE=abc",
    b"MAIL FROM:<a@b.org> SIZE=99999999",
    b"MAIL FROM:<a@b.org> BODY=9BIT",
    b"MAIL FROM:<<a@b.org>>",
    b"RCPT",
    b"RCPT TO:",
    b"RCPT TO:<>",
    b"RCPT FROM:<ok@example.com>",
    b"RCPT TO:<ok@example.com> NOTIFY=bogus",
    b"DATA now",
]

Record = tuple[str, str, tuple[str, ...], str]
"""What one stored message is compared by: sha256 of the content, mail_from, rcpt_tos,
rcpt_to (the handler pushes once per recipient)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def data_outcome(stream: bytes) -> tuple[bytes, bool, bytes] | None:
    """What the server makes of the bytes sent after ``354``.

    Returns ``(content, acceptable, rest)``: the un-dot-stuffed content, whether a 250 is
    due (no over-long line, not over the size limit), and the bytes after the terminator
    (read as commands); ``None`` if the stream holds no terminator.
    """
    pos, lines, size, too_long = 0, [], 0, False
    while True:
        end = stream.find(b"\r\n", pos)
        if end < 0:
            return None
        line = stream[pos : end + 2]
        pos = end + 2
        if line == b".\r\n":
            break
        size += len(line)
        too_long = too_long or len(line) > LINE_LIMIT
        lines.append(line[1:] if line.startswith(b".") else line)
    return b"".join(lines), not too_long and size <= MAX_MESSAGE, stream[pos:]


def terminated(body: bytes) -> bytes:
    """``body`` plus the end of DATA, a real terminator in it dot-stuffed away first.

    Random bytes may hold a line ``.\\r\\n`` (or end in a ``.`` that the final CRLF
    would complete): that would end DATA early and turn the rest into commands.
    """
    while True:
        stream = body + (b".\r\n" if not body or body.endswith(b"\r\n") else b"\r\n.\r\n")
        outcome = data_outcome(stream)
        assert outcome is not None
        if not outcome[2]:
            return stream
        start = len(stream) - len(outcome[2]) - 3  # where the early ".\r\n" line begins
        body = body[:start] + b"." + body[start:]


@dataclass
class Ledger:
    """What the fuzzer saw: acknowledged messages, ones in doubt, counters, failures."""

    seed: int
    stamped: bool = False  # [auth] verify on: serve puts Authentication-Results on top
    acked: Counter[Record] = field(default_factory=Counter)
    in_doubt: Counter[Record] = field(default_factory=Counter)
    stats: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    contents: dict[str, bytes] = field(default_factory=dict)  # for failure messages
    history: dict[str, list[str]] = field(default_factory=dict)  # what happened to a DATA

    def records(self, content: bytes, mail_from: str, rcpts: list[str]) -> list[Record]:
        content = as_stored(content, self.stamped)
        digest = hashlib.sha256(content).hexdigest()
        self.contents[digest] = content
        return [(digest, mail_from, tuple(rcpts), rcpt) for rcpt in rcpts]

    def note(self, digest: str, what: str) -> None:
        self.history.setdefault(digest, []).append(what)

    def fail(self, what: str) -> None:
        self.failures.append(f"seed={self.seed}: {what}")


class Closed(Exception):
    """The connection is gone (closed by the server, or by the fuzzer on purpose)."""


class Session:
    """One fuzzing connection: a byte-exact writer and a model of the server's state."""

    def __init__(
        self, rng: random.Random, ledger: Ledger, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        self.rng, self.ledger, self.reader, self.writer = rng, ledger, r, w
        self.pending: list[tuple[bytes, str]] = []  # one entry per LF sent: (kind, argument)
        self.current = b""  # bytes sent since the last LF: the server holds half a line
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.envelope_known = True

    # -- wire -------------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise Closed from exc

    async def reply(self) -> tuple[int, str]:
        lines = []
        try:
            async with asyncio.timeout(10):
                while True:
                    raw = await self.reader.readline()
                    if not raw:
                        raise Closed
                    text = raw.decode("utf-8", "replace").rstrip("\r\n")
                    lines.append(text)
                    if len(text) < 4 or text[3] != "-":
                        break
        except TimeoutError:
            self.ledger.fail(f"no reply within 10 s (expected {len(self.pending)} more)")
            raise Closed from None
        except ConnectionError as exc:
            raise Closed from exc
        text = "\n".join(lines)
        if not text[:3].isdigit():
            self.ledger.fail(f"malformed reply {text[:80]!r}")
            raise Closed
        code = int(text[:3])
        if code == 421:
            self.ledger.stats["421"] += 1
            raise Closed
        return code, text

    async def command_bytes(self, data: bytes, kinds: list[tuple[bytes, str]]) -> None:
        """Send command-phase bytes; ``kinds`` names what each LF-ended line is."""
        assert len(kinds) == data.count(b"\n")
        self.pending.extend(kinds)
        _, lf, tail = data.rpartition(b"\n")
        self.current = tail if lf else self.current + tail
        await self.write(data)

    async def drain(self) -> tuple[int, str] | None:
        """Read the reply of every line sent; apply their effect; the last reply."""
        last = None
        while self.pending:
            kind, arg = self.pending.pop(0)
            code, text = await self.reply()
            last = code, text
            self.apply(kind, arg, code)
        return last

    def apply(self, kind: bytes, arg: str, code: int) -> None:
        self.ledger.stats[f"reply {code // 100}xx"] += 1
        if code != 250:
            return
        if kind in (b"HELO", b"EHLO", b"RSET"):
            self.mail_from, self.rcpts = None, []
        elif kind == b"MAIL":
            self.mail_from, self.rcpts = arg, []
        elif kind == b"RCPT":
            self.rcpts.append(arg)
        elif kind == b"BAD":
            # A command the fuzzer thought invalid was accepted: its effect is unknown.
            self.ledger.stats["bad command accepted"] += 1
            self.envelope_known = False

    async def line(self, text: bytes, kind: bytes = b"", arg: str = "") -> None:
        """One explicit command line (ends any half line first)."""
        if self.current:
            await self.command_bytes(b"\r\n", [(b"", "")])
        await self.command_bytes(text + b"\r\n", [(kind, arg)])

    # -- random content -----------------------------------------------------------------------

    def address(self, valid: bool = True) -> str:
        rng = self.rng
        local = "".join(
            rng.choices("abcdefghijklmnopqrstuvwxyz0123456789.+-_", k=rng.randint(1, 20))
        )
        local = local.strip(".") or "x"
        return (
            f"{local}@example.com"
            if valid
            else f"{local}@{rng.choice(['nowhere.org', 'example.net'])}"
        )

    def junk_line(self) -> bytes:
        rng = self.rng
        shape = rng.random()
        if shape < 0.3:
            body = rng.randbytes(rng.randint(0, 80))
        elif shape < 0.6:
            word = rng.choice(JUNK_WORDS)
            body = word + b" " + rng.randbytes(rng.randint(0, 30))
        elif shape < 0.75:
            body = bytes(
                rng.choice(b"AZaz09 :<>@.\x00\x80\xff\t") for _ in range(rng.randint(0, 60))
            )
        elif shape < 0.9:
            body = rng.choice(JUNK_WORDS) + b" " + b"x" * rng.choice([500, 1000, 1001, 2000, 5000])
        else:
            body = "NOOP ünïcödé ✉".encode()
        body = body.replace(b"\n", b" ")
        # The line must not become a command whose effect the model cannot follow, joined
        # to the half line the server already holds either.
        first = (self.current + body).replace(b"\r", b"").partition(b" ")[0].upper()
        if any(first.startswith(word) for word in STATEFUL):
            body = b"X" + body
            if self.current:
                body = b"\r\n" + body  # ends the held half line: one more reply
        return body

    def ending(self) -> bytes:
        return self.rng.choice([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"", b"\r\r\n"])

    def body(self) -> bytes:
        """A random DATA body as sent: not dot-stuffed properly, on purpose, at times."""
        rng = self.rng
        parts: list[bytes] = []
        if rng.random() < 0.7:
            parts.append(
                f"Subject: fuzz {rng.getrandbits(48):x}\r\nFrom: f@fuzz.org\r\n\r\n".encode()
            )
        for _ in range(rng.randint(0, 25)):
            r = rng.random()
            if r < 0.25:
                text = bytes(rng.choice(b"abc XYZ 019.,:;-") for _ in range(rng.randint(0, 120)))
            elif r < 0.4:
                text = rng.randbytes(rng.randint(0, 200))  # NUL, 8-bit, bare CR/LF
            elif r < 0.55:
                text = rng.choice([b".", b"..", b"...", b". ", b".x", b"..\r", b".\r", b".\n"])
            elif r < 0.7:
                # Terminator look-alikes: smuggling vectors that must stay content.
                text = rng.choice(
                    [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r\n.\r", b".\n", b"\n.", b"\r."]
                )
            elif r < 0.74:
                text = b"L" * rng.choice([997, 998, 999, 1000, 1500])  # around the line limit
            elif r < 0.75:
                text = b"B" * rng.randint(10_000, 30_000)  # a big (over-long) line
            else:
                text = b"Header-" + str(rng.randint(0, 99)).encode() + b": " + rng.randbytes(20)
            parts.append(text + rng.choice([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""]))
        if rng.random() < 0.04:
            parts.append((b"S" * 900 + b"\r\n") * (MAX_MESSAGE // 900 + 1))  # too big: 552
        return b"".join(parts)

    # -- actions -------------------------------------------------------------------------------

    async def act(self) -> None:
        rng = self.rng
        r = rng.random()
        if r < 0.2:
            for _ in range(rng.randint(1, 4)):  # written back to back: pipelined
                data = self.junk_line() + self.ending()
                await self.command_bytes(data, [(b"", "")] * data.count(b"\n"))
            await self.drain()
        elif r < 0.27:
            word = rng.choice([b"EHLO", b"HELO"])
            await self.line(word + b" fuzz.example", word)
            await self.drain()
        elif r < 0.35:
            sender = rng.choice(["", self.address(), self.address(False)])
            params = rng.choice([b"", b" BODY=8BITMIME", b" SIZE=1000", b" SMTPUTF8"])
            await self.line(b"MAIL FROM:<" + sender.encode() + b">" + params, b"MAIL", sender)
            await self.drain()
        elif r < 0.45:
            rcpt = self.address(valid=rng.random() < 0.8)
            await self.line(b"RCPT TO:<" + rcpt.encode() + b">", b"RCPT", rcpt)
            await self.drain()
        elif r < 0.5:
            await self.line(rng.choice(BAD_ENVELOPE), b"BAD")
            await self.drain()
        elif r < 0.55:
            word = rng.choice([b"RSET", b"NOOP", b"HELP"])
            await self.line(word, word)
            await self.drain()
        elif r < 0.75:
            await self.transaction(pipelined=False)
        elif r < 0.92:
            await self.transaction(pipelined=True)
        elif r < 0.96:
            await self.line(b"DATA", b"DATA")
            await self.data_phase(final=rng.choice(["partial-close", "partial-reset"]))
        else:
            await self.line(b"QUIT", b"QUIT")
            with contextlib.suppress(Closed):
                await self.drain()
            raise Closed

    async def transaction(self, *, pipelined: bool) -> None:
        rng = self.rng
        sender = rng.choice(["", self.address(), "bounce@fuzz.org"])
        rcpts = [self.address(valid=rng.random() < 0.85) for _ in range(rng.randint(1, 4))]
        group = [(b"MAIL FROM:<" + sender.encode() + b">", b"MAIL", sender)]
        group += [(b"RCPT TO:<" + a.encode() + b">", b"RCPT", a) for a in rcpts]
        if rng.random() < 0.2:
            group.insert(rng.randint(1, len(group)), (b"NOOP", b"", ""))
        group.append((b"DATA", b"DATA", ""))
        if pipelined:
            if self.current:
                await self.command_bytes(b"\r\n", [(b"", "")])
            await self.command_bytes(
                b"".join(text + b"\r\n" for text, _, _ in group),
                [(kind, arg) for _, kind, arg in group],
            )
        else:
            for text, kind, arg in group[:-1]:
                await self.line(text, kind, arg)
                await self.drain()
            await self.line(b"DATA", b"DATA")
        final = rng.choices(
            ["complete", "complete+pipelined", "abandon-after-terminator", "partial-close"],
            weights=[70, 15, 8, 7],
        )[0]
        await self.data_phase(final=final)

    async def data_phase(self, *, final: str) -> None:
        """Read the replies up to DATA's; on 354 send a body and end it as ``final`` says."""
        self.pending.pop()  # DATA's own reply is read here
        await self.drain()
        code, _ = await self.reply()
        self.ledger.stats["DATA"] += 1
        if code != 354:
            return
        self.ledger.stats["354"] += 1
        stream = terminated(self.body())
        if final.startswith("partial"):
            await self.write(stream[: self.rng.randint(0, len(stream) - 3)])
            self.ledger.stats["partial DATA"] += 1
            self.abort(reset=final == "partial-reset")
            raise Closed
        content, acceptable, _ = data_outcome(stream) or (b"", False, b"")
        records: list[Record] = []
        if self.mail_from is not None and self.envelope_known:
            records = self.ledger.records(content, self.mail_from, self.rcpts)
        extra: list[tuple[bytes, bytes, str]] = []
        if final == "complete+pipelined":
            extra = [(b"RSET", b"RSET", ""), (b"NOOP", b"", "")]
        digest = hashlib.sha256(content).hexdigest()
        try:
            await self.write(stream + b"".join(t + b"\r\n" for t, _, _ in extra))
        except Closed:
            self.ledger.in_doubt.update(records)
            self.ledger.note(digest, "closed while sending")
            raise
        self.ledger.note(digest, f"{final} from={self.mail_from!r} rcpts={self.rcpts}")
        if final == "abandon-after-terminator":
            # The reply is never read: the server may or may not keep the message.
            self.ledger.in_doubt.update(records)
            self.ledger.stats["abandoned after terminator"] += 1
            self.abort(reset=self.rng.random() < 0.5)
            raise Closed
        try:
            code, text = await self.reply()
        except Closed:
            self.ledger.in_doubt.update(records)
            self.ledger.note(digest, "closed before the reply")
            self.ledger.stats["closed before DATA reply"] += 1
            raise
        self.ledger.note(digest, f"reply {text[:40]!r}")
        self.mail_from, self.rcpts = None, []
        if code == 250:
            if not acceptable:
                self.ledger.fail(f"250 for a DATA that must be refused: {text!r}")
            if not self.envelope_known:
                self.ledger.fail("250 after an unknown envelope change")
            self.ledger.acked.update(records)
            self.ledger.stats["250 after DATA"] += 1
        else:
            if acceptable or code not in (500, 552):
                self.ledger.fail(f"{code} for DATA (acceptable={acceptable}): {text!r}")
            self.ledger.stats[f"refused DATA {code}"] += 1
        self.envelope_known = True
        self.pending.extend((kind, arg) for _, kind, arg in extra)
        await self.drain()

    def abort(self, *, reset: bool) -> None:
        sock = self.writer.get_extra_info("socket")
        if reset and sock is not None:
            # SO_LINGER 0: close() sends RST instead of FIN.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


async def fuzz_client(index: int, port: int, ledger: Ledger, deadline: float) -> None:
    rng = random.Random(f"{ledger.seed}:{index}")
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
        except OSError as exc:
            ledger.fail(f"cannot connect: {exc}")
            return
        ledger.stats["connections"] += 1
        session = Session(rng, ledger, reader, writer)
        try:
            code, text = await session.reply()
            if code != 220:
                ledger.fail(f"greeting {text!r}")
            for _ in range(rng.randint(1, 40)):
                if time.monotonic() >= deadline:
                    break
                await session.act()
                ledger.stats["actions"] += 1
            if rng.random() < 0.3:
                session.abort(reset=rng.random() < 0.5)
        except Closed:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# -- the server process ----------------------------------------------------------------------


@dataclass
class Serve:
    root: Path
    port: int
    proc: subprocess.Popen[bytes]
    stamped: bool = False

    def fds(self) -> list[str]:
        out = []
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            with contextlib.suppress(OSError):
                out.append(os.readlink(f"/proc/{self.proc.pid}/fd/{fd}"))
        return sorted(out)

    def log_lines(self) -> list[dict[str, object]]:
        out = []
        for line in (self.root / "serve.log").read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


@pytest.fixture(
    params=[
        pytest.param(False, id="verify-off"),
        # The same fuzzing with SPF/DKIM/DMARC on every message, against a DNS server of
        # the test's own on 127.0.0.1 (every name NXDOMAIN): nothing leaves the machine.
        pytest.param(True, id="verify-on", marks=pytest.mark.slow),
    ]
)
def serve(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Serve]:
    with contextlib.ExitStack() as stack:
        auth = ""
        if request.param:
            nameserver = stack.enter_context(dns_server()).nameserver
            auth = f'[auth]\nverify = true\nnameservers = ["{nameserver}"]\ntimeout = 2.0\n'
        yield from _serve(tmp_path, auth)


def _serve(tmp_path: Path, auth: str) -> Iterator[Serve]:
    port = free_port()
    (tmp_path / "config").mkdir()
    (tmp_path / "fuzz_handler.py").write_text(HANDLER)
    (tmp_path / "config" / "settings.toml").write_text(
        "[server]\n"
        f'host = "127.0.0.1"\nport = {port}\nhostname = "mx.fuzz"\n'
        'handlers = ["fuzz_handler"]\n'
        f"max_message_size = {MAX_MESSAGE}\ncommand_timeout = 30.0\ngrace_period = 10.0\n"
        "[router]\n"
        'defaults = { host = "example\\\\.com" }\n'
        "[logging]\n"
        'format = "json"\n' + auth
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILDEFER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(tmp_path)])
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "maildefer", "serve", "--config", "config/settings.toml"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "serve did not listen within 20 s"
            time.sleep(0.05)
        yield Serve(tmp_path, port, proc, stamped=bool(auth))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def deliver(port: int, subject: str) -> tuple[int, bytes]:
    body = f"From: ok@fuzz.org\r\nSubject: {subject}\r\n\r\nafter the storm\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("normal.example")
        client.mail("ok@fuzz.org")
        client.rcpt("normal@example.com")
        return client.data(body.encode())


def settle_fds(serve: Serve, baseline: list[str], within: float = 10.0) -> list[str]:
    """Poll until the server holds no more descriptors than before; what it holds then."""
    deadline = time.monotonic() + within
    while True:
        now = serve.fds()
        if len(now) <= len(baseline) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


AUTH_HEADER = b"Authentication-Results: mx.fuzz;"


def as_stored(content: bytes, stamped: bool) -> bytes:
    """What serve with ``[auth] verify`` keeps of ``content`` under its header: all of it
    but leading lines that start with whitespace (they would fold into that header)."""
    while stamped and content[:1] in (b" ", b"\t"):
        end = content.find(b"\n")
        content = b"" if end < 0 else content[end + 1 :]
    return content


def unstamped(raw: bytes) -> bytes:
    """A stored message without the Authentication-Results field serve put on top."""
    assert raw.startswith(AUTH_HEADER), raw[:100]
    pos = raw.find(b"\n") + 1
    while raw[pos : pos + 1] == b"\t":  # its continuation lines
        pos = raw.find(b"\n", pos) + 1
    return raw[pos:]


def record_of(m: MailRequest, stamped: bool = False) -> Record:
    raw = unstamped(m.raw) if stamped else m.raw
    return hashlib.sha256(raw).hexdigest(), m.mail_from, tuple(m.rcpt_tos), m.rcpt_to


def stored(queue: Path, stamped: bool = False) -> Counter[Record]:
    return Counter(
        record_of(request_from_file(p.read_bytes()), stamped) for p in (queue / "new").iterdir()
    )


def explain(record: Record, got: Counter[Record], ledger: Ledger, queue: Path) -> str:
    """A missing record, and what the queue holds for the same envelope instead."""
    sent = ledger.contents.get(record[0], b"?")
    same = [r for r in got if r[1:] == record[1:]]
    text = f"{record[1:]} sent {sent[:300]!r} {ledger.history.get(record[0])}"
    for path in (queue / "new").iterdir():
        m = request_from_file(path.read_bytes())
        if record_of(m, ledger.stamped) in same:
            text += f"; stored {m.raw[:300]!r}"
    return text


def test_data_outcome_model() -> None:
    assert terminated(b"a\r\n.\r\nb") == b"a\r\n..\r\nb\r\n.\r\n"
    assert terminated(b".") == b"..\r\n.\r\n"
    assert terminated(b"") == b".\r\n"
    # The model the fuzzer's verdicts rest on, checked on the smuggling vectors.
    assert data_outcome(b".\r\n") == (b"", True, b"")
    assert data_outcome(b"a\r\n.\r\n") == (b"a\r\n", True, b"")
    assert data_outcome(b"a\n.\nb\r\n.\r\nRSET\r\n") == (b"a\n.\nb\r\n", True, b"RSET\r\n")
    assert data_outcome(b"..x\r\n.\r.\r\n.\r\n") == (b".x\r\n\r.\r\n", True, b"")
    assert data_outcome(b"a\r\n.\n") is None
    assert data_outcome(b"x" * 1000 + b"\r\n.\r\n") == (b"x" * 1000 + b"\r\n", False, b"")
    assert data_outcome(b"x" * 999 + b"\r\n.\r\n") == (b"x" * 999 + b"\r\n", True, b"")


def test_fuzz_serve(serve: Serve) -> None:
    seed = int(os.environ.get("FUZZ_SEED") or random.randrange(2**32))
    print(f"FUZZ_SEED={seed} FUZZ_SECONDS={FUZZ_SECONDS:g}")
    ledger = Ledger(seed, stamped=serve.stamped)
    assert deliver(serve.port, "warm-up")[0] == 250
    ledger.acked.update(
        stored(serve.root / "run" / "posts", serve.stamped)
    )  # the warm-up message, as the server stored it
    baseline = settle_fds(serve, serve.fds())

    async def run() -> None:
        deadline = time.monotonic() + FUZZ_SECONDS
        await asyncio.gather(
            *(fuzz_client(i, serve.port, ledger, deadline) for i in range(CLIENTS))
        )

    asyncio.run(run())
    print(f"seed={seed}", dict(sorted(ledger.stats.items())))

    code, text = deliver(serve.port, "after")
    assert code == 250, f"seed={seed}: normal delivery after fuzzing got {code} {text!r}"
    after_body = b"From: ok@fuzz.org\r\nSubject: after\r\n\r\nafter the storm\r\n"
    ledger.acked.update(ledger.records(after_body, "ok@fuzz.org", ["normal@example.com"]))

    fds = settle_fds(serve, baseline)
    print(f"seed={seed}: server fds {len(baseline)} before, {len(fds)} after")
    assert len(fds) <= len(baseline), (
        f"seed={seed}: fd leak: {len(baseline)} -> {len(fds)}: "
        f"{sorted((Counter(fds) - Counter(baseline)).elements())[:20]}"
    )

    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(timeout=30) == 0

    assert not ledger.failures, "\n".join(ledger.failures[:20])
    queue = serve.root / "run" / "posts"
    assert os.listdir(queue / "tmp") == [], f"seed={seed}: tmp/ debris"
    got = stored(queue, serve.stamped)
    missing = ledger.acked - got
    assert not missing, f"seed={seed}: {sum(missing.values())} acknowledged messages not " + (
        f"stored, e.g. {explain(next(iter(missing)), got, ledger, queue)}"
    )
    unacked = got - ledger.acked - ledger.in_doubt
    assert not unacked, f"seed={seed}: stored without a 250: " + "; ".join(
        f"{r[1:]} {ledger.history.get(r[0])}" for r in list(unacked)[:5]
    )
    assert ledger.stats["250 after DATA"] >= 10, f"seed={seed}: too few deliveries to mean much"
    errors = [line for line in serve.log_lines() if line.get("level") in ("error", "critical")]
    assert not errors, f"seed={seed}: {errors[:3]}"


# -- regressions found by the fuzzer --------------------------------------------------------


async def test_vrfy_with_8bit_argument_gets_502_not_451(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiosmtpd echoes VRFY's argument; with SMTPUTF8 on, 8-bit bytes arrive surrogate-escaped
    # and a strict UTF-8 encode of the reply raised: 451 plus a traceback in the log.
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    async with running(make_settings(tmp_path, write_handlers(tmp_path))) as server:
        client = await RawClient.connect(server.port)
        code, text = await client.cmd(b"VRFY a@b@\xc0\xff")
        assert code == 502, text
        assert (await client.cmd("NOOP"))[0] == 250
        await client.close()


async def test_null_sender_is_empty_and_the_example_app_does_not_answer_a_bounce(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiosmtpd keeps "MAIL FROM:<>" as the string "<>": handlers saw a truthy sender, and the
    # example's posting handler queued an auto-reply to "<>" for every bounce (RFC 3834).
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    bounce = b"From: MAILER-DAEMON@writers.org\r\nSubject: Undelivered\r\n\r\nbounce\r\n"
    async with running(make_settings(tmp_path, "app.handlers.posting")) as server:
        client = await RawClient.connect(server.port)
        await client.cmd("EHLO c")
        code, text = await client.transaction("", ["my-post@example.com"], bounce + b".\r\n")
        assert code == 250, text
        await client.close()
    [post] = queued(tmp_path / "run" / "posts")
    assert post.mail_from == ""
    assert queued(tmp_path / "run" / "outbox") == []


PARSER_CRASHES = [b"<", b"<x@", b"<a @", b"\x00 @[", b"\x00@ [ "]
"""Arguments on which the stdlib address parser that aiosmtpd's ``_getaddr`` calls raises
(IndexError, AttributeError, UnboundLocalError) instead of ``HeaderParseError``."""


async def test_malformed_addresses_get_a_syntax_error_not_451(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = make_settings(tmp_path, write_handlers(tmp_path), max_bad_commands=100)
    async with running(settings) as server:
        client = await RawClient.connect(server.port)
        assert (await client.cmd("EHLO c"))[0] == 250
        codes = []
        for arg in PARSER_CRASHES:
            codes.append((await client.cmd(b"VRFY " + arg))[0])
            codes.append((await client.cmd(b"MAIL FROM:" + arg))[0])
        assert (await client.cmd("MAIL FROM:<a@b.org>"))[0] == 250
        for arg in PARSER_CRASHES:
            codes.append((await client.cmd(b"RCPT TO:" + arg))[0])
        await client.close()
    # A syntax error is permanent (501/502/553); a 451 makes a real MTA retry it for days.
    assert all(500 <= code < 600 for code in codes), codes
