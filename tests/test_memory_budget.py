"""Bounded memory under big mail: the budget, the spool, SIZE=, and serve's peak RSS.

The unit part runs the real Server in-process on real sockets (budget accounting, spool
cleanup, a disk error, SIZE= refused early, a spooled message's head and push). The
acceptance part runs ``maildefer serve`` as a subprocess and sends 60 messages of 20 MiB
at once from 60 clients, then reads serve's peak RSS (``VmHWM``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.smtp_server import RawClient, make_settings, queued, running, write_handlers

from maildefer.queue.envelope import unwrap_fields
from maildefer.settings import Settings
from maildefer.smtp.spool import CHUNK, GRANULE, MemoryBudget, Spool

ROOT = Path(__file__).resolve().parent.parent
SMALL = b"From: a@x.org\r\nTo: post@example.com\r\nSubject: small\r\n\r\nbody\r\n"

# Records what each handler call saw, then pushes; "head@" rewrites the head first.
HANDLERS = """
from maildefer import Queue, route, stateless

SEEN = []

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    if name == "head":
        message.replace_head(b"X-Checked: yes\\r\\n" + message.head)
    await Queue("run/posts").push(message)
    # Pushing a spooled message streams its file: nothing was read into memory (_loaded).
    loaded = message.__dict__.get("_loaded", "in memory")
    SEEN.append((type(message).__name__, message["Subject"], message.rcpt_to, loaded))
"""


def big_message(size: int, tag: bytes = b"big") -> bytes:
    """A message of about ``size`` bytes; some lines start with a dot (stuffed on the wire)."""
    head = b"From: a@x.org\r\nTo: post@example.com\r\nSubject: %s\r\n\r\n" % tag
    line = b"y" * 76 + b"\r\n"
    lines = [(b"." if i % 97 == 0 else b"") + line for i in range(size // len(line))]
    return head + b"".join(lines)


def stuffed(message: bytes) -> bytes:
    """``message`` as DATA sends it: leading dots doubled, then the terminator."""
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def settings_for(project: Path, **server: object) -> tuple[Settings, str]:
    module = write_handlers(project, HANDLERS)
    queues = {"posts": {"path": "run/posts", "handlers": [module]}}
    return make_settings(project, module, queues=queues, **server), module


def seen(module: str) -> list[object]:
    return list(sys.modules[module].SEEN)


def spool_files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


async def eventually(predicate: Callable[[], object], what: str, within: float = 10.0) -> None:
    """Poll ``predicate`` on the loop (the server runs on it) until true."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 (a condition of the server's state)
            await asyncio.sleep(0.01)


# -- the budget's accounting --------------------------------------------------------------


async def test_budget_accounting_small_in_memory_large_spooled(tmp_path: Path) -> None:
    budget = MemoryBudget(4 * CHUNK)
    spool = Spool(tmp_path, budget, threshold=CHUNK)
    small = spool.sink()
    small.lines.append(b"x" * 1000)
    await small.overflow(1000)
    assert budget.used == GRANULE and not small.spooled  # reserved as bytes arrive
    assert await small.finish() == b"x" * 1000
    assert budget.used == GRANULE  # held while the handlers run
    big = spool.sink()
    total = 0
    for _ in range(3 * CHUNK // 1000):
        big.lines.append(b"y" * 1000)
        total += 1000
        if total > big.mark:
            await big.overflow(total)
        # A spooling session holds at most one chunk (and one step) of the budget.
        assert budget.used - GRANULE <= CHUNK + GRANULE
    content = await big.finish()
    assert big.spooled and content is not None and not isinstance(content, bytes)
    assert content.size == total and os.path.getsize(content.path) == total
    assert budget.used == GRANULE  # the spooled message holds none
    small.close()
    big.close()
    assert budget.used == 0 and os.listdir(tmp_path) == []
    assert budget.peak <= GRANULE + CHUNK + 2 * GRANULE


async def test_message_over_threshold_spooled_though_budget_has_room(tmp_path: Path) -> None:
    budget = MemoryBudget(4 * CHUNK)
    spool = Spool(tmp_path, budget, threshold=GRANULE)  # below one chunk
    sink = spool.sink()
    total = 0
    while total <= 2 * GRANULE:
        sink.lines.append(b"z" * 998 + b"\r\n")
        total += 1000
        if total > sink.mark:
            await sink.overflow(total)
    assert sink.spooled
    content = await sink.finish()
    assert content is not None and not isinstance(content, bytes) and content.size == total
    sink.close()
    assert budget.used == 0 and os.listdir(tmp_path) == []


async def test_exhausted_budget_spools_a_small_message(tmp_path: Path) -> None:
    budget = MemoryBudget(CHUNK)
    spool = Spool(tmp_path, budget, threshold=CHUNK)
    assert budget.reserve(CHUNK)  # every byte taken (by other sessions)
    sink = spool.sink()
    sink.lines.append(b"Subject: s\r\n\r\nsmall\r\n")
    await sink.overflow(21)
    content = await sink.finish()
    assert sink.spooled and not isinstance(content, bytes) and content is not None
    assert (
        content.read() == b"Subject: s\r\n\r\nsmall\r\n" and content.head == b"Subject: s\r\n\r\n"
    )
    assert budget.used == CHUNK  # written without a reservation of its own
    sink.close()
    assert os.listdir(tmp_path) == []


async def test_small_message_in_memory_and_budget_released(project: Path) -> None:
    settings, module = settings_for(project)
    async with running(settings) as server:
        assert server.port and server.spool is not None
        assert await asyncio.to_thread(sendmail, server.port, SMALL) == {}
        assert server.spool.budget.used == 0 and server.spool.budget.peak > 0
    assert seen(module) == [("MailRequest", "small", "post@example.com", "in memory")]
    assert [m.raw for m in queued(project / "run" / "posts")] == [SMALL]


async def test_large_message_spooled_pushed_byte_exact_no_file_left(project: Path) -> None:
    settings, module = settings_for(project)
    message = big_message(3 * CHUNK)
    async with running(settings) as server:
        assert server.port and server.spool is not None
        tmp = project / "run" / "posts" / "tmp"
        assert server.spool.directory == tmp  # the queue's tmp/: copied on one filesystem
        client = await RawClient.connect(server.port)
        await client.cmd("EHLO c")
        rcpts = ["post@example.com", "head@example.com"]
        code, text = await client.transaction("a@x.org", rcpts, stuffed(message))
        assert code == 250, text
        assert spool_files(tmp) == []  # removed once the reply is sent
        await client.close()
        assert server.spool.budget.used == 0
    assert sorted(seen(module)) == [  # type: ignore[type-var]
        ("SpooledMailRequest", "big", "head@example.com", None),
        ("SpooledMailRequest", "big", "post@example.com", None),
    ]
    stored = sorted(m.raw for m in queued(project / "run" / "posts"))
    assert stored == sorted([message, b"X-Checked: yes\r\n" + message])


async def test_client_gone_mid_data_leaves_no_spool_file(project: Path) -> None:
    settings, module = settings_for(project)
    async with running(settings) as server:
        assert server.port and server.spool is not None
        tmp = server.spool.directory
        client = await RawClient.connect(server.port)
        await client.cmd("EHLO c")
        assert (await client.cmd("MAIL FROM:<a@x.org>"))[0] == 250
        assert (await client.cmd("RCPT TO:<post@example.com>"))[0] == 250
        assert (await client.cmd("DATA"))[0] == 354
        await client.send(stuffed(big_message(3 * CHUNK))[: 2 * CHUNK])
        await eventually(lambda: spool_files(tmp), "a spool file")
        await client.close()  # mid-DATA
        budget = server.spool.budget
        await eventually(lambda: not spool_files(tmp) and not budget.used, "no spool file")
    assert seen(module) == [] and queued(project / "run" / "posts") == []


async def test_spool_write_failure_is_452_nothing_stored(project: Path) -> None:
    spool_dir = project / "spool"
    settings, _ = settings_for(project, spool_dir=str(spool_dir))
    async with running(settings) as server:
        assert server.port
        shutil.rmtree(spool_dir)
        spool_dir.write_bytes(b"")  # a file where the directory was: open() fails, ENOTDIR
        client = await RawClient.connect(server.port)
        await client.cmd("EHLO c")
        code, text = await client.transaction(
            "a@x.org", ["post@example.com"], stuffed(big_message(2 * CHUNK))
        )
        assert (code, text[:9]) == (452, "452 4.3.1"), text
        # The session goes on; a message that stays in memory is stored.
        code, text = await client.transaction("a@x.org", ["post@example.com"], stuffed(SMALL))
        assert code == 250, text
        await client.close()
        assert server.spool is not None and server.spool.budget.used == 0
    assert [m.raw for m in queued(project / "run" / "posts")] == [SMALL]


async def test_size_that_cannot_be_spooled_refused_at_mail_from(project: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm: the test needs a spool on another, smaller filesystem")
    spool_dir = shm / f"maildefer-test-{os.getpid()}-{time.monotonic_ns()}"
    free = shutil.disk_usage(shm).free
    # The queue's disk guard (another check) is off: only the spool's free space counts.
    settings, _ = settings_for(
        project, spool_dir=str(spool_dir), max_message_size=4 * free + 10**9, min_free_space=0
    )
    try:
        async with running(settings) as server:
            assert server.port
            client = await RawClient.connect(server.port)
            await client.cmd("EHLO c")
            code, text = await client.cmd(f"MAIL FROM:<a@x.org> SIZE={free + CHUNK}")
            assert (code, text[:9]) == (452, "452 4.3.1"), text
            code, text = await client.cmd(f"MAIL FROM:<a@x.org> SIZE={4 * free + 10**10}")
            assert code == 552, text  # over max_message_size: as before
            code, text = await client.cmd(f"MAIL FROM:<a@x.org> SIZE={2 * CHUNK}")
            assert code == 250, text
            await client.close()
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)


def sendmail(port: int, message: bytes) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        return client.sendmail("a@x.org", ["post@example.com"], message)


# -- acceptance: 60 clients x 20 MiB at once, serve as a subprocess -------------------------

CLIENTS = 60
MESSAGE_BYTES = 20 << 20
LINE = 998  # the longest line SMTP allows (RFC 5321 4.5.3.1.6): fewer lines to parse
RSS_BOUND = 250 << 20
"""serve's peak RSS must stay under this (measured: see docs/operations.md)."""

SERVE_HANDLERS = """
from maildefer import Queue, route, stateless

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    await Queue("run/posts").push(message)
"""


def big_lines(index: int) -> Iterator[bytes]:
    """Client ``index``'s message, line by line (never whole in the test's memory)."""
    yield (
        b"From: c%d@x.org\r\nTo: post@example.com\r\nSubject: big %d\r\n"
        b"Message-ID: <%d@test>\r\n\r\n" % (index, index, index)
    )
    filler = bytes(range(33, 127)) * 11
    for number in range(MESSAGE_BYTES // (LINE + 2)):
        prefix = b"." if number % 1000 == 0 else b""  # dot-stuffed on the wire
        body = b"%s%08d:%03d:" % (prefix, number, index)
        yield body + filler[: LINE - len(body)] + b"\r\n"


async def send_big(port: int, index: int, *, announce: bool) -> tuple[int, str, str]:
    """One client: MAIL (with SIZE= if ``announce``), RCPT, DATA streamed; reply, sha256."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    digest = hashlib.sha256()

    async def reply() -> tuple[int, str]:
        while True:
            line = (await reader.readline()).decode()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != "-":
                return int(line[:3]), line.strip()

    try:
        assert (await reply())[0] == 220
        size = f" SIZE={MESSAGE_BYTES + 4096}" if announce else ""
        for command in (
            "EHLO c",
            f"MAIL FROM:<c{index}@x.org>{size}",
            "RCPT TO:<post@example.com>",
        ):
            writer.write(command.encode() + b"\r\n")
            code, text = await reply()
            if code != 250:
                return code, text, ""
        writer.write(b"DATA\r\n")
        code, text = await reply()
        if code != 354:
            return code, text, ""
        batch: list[bytes] = []
        for line in big_lines(index):
            digest.update(line)
            batch.append(b"." + line if line[:1] == b"." else line)
            if len(batch) == 256:
                writer.write(b"".join(batch))
                batch.clear()
                await writer.drain()
        writer.write(b"".join(batch) + b".\r\n")
        await writer.drain()
        code, text = await reply()
        writer.write(b"QUIT\r\n")
        return code, text, digest.hexdigest()
    finally:
        writer.close()
        await writer.wait_closed()


def start_serve(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    (root / "memory_handlers.py").write_text(SERVE_HANDLERS)
    (root / "config").mkdir()
    config = root / "config" / "settings.toml"
    config.write_text(
        '[server]\nport = 0\nhostname = "mx.test"\nhandlers = ["memory_handlers"]\n'
        "max_connections_per_ip = 100\n"  # 60 clients from 127.0.0.1; defaults otherwise
        '[router]\ndefaults = { host = "example\\\\.com" }\n'
        '[queues.posts]\npath = "run/posts"\nhandlers = ["memory_handlers"]\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILDEFER_")}
    env |= {"PYTHONPATH": f"{root}:{ROOT}", "MAILDEFER_LOGGING__FORMAT": "json"}
    log = root / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "maildefer", "--config", str(config), "serve"],
            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=out,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and json.loads(line).get("event") == "listening":
                return proc, int(json.loads(line)["port"])
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"serve did not start:\n{log.read_text()}")


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
@pytest.mark.parametrize("announce", [False, True], ids=["plain", "size-announced"])
def test_sixty_clients_twenty_mib_each_bounded_rss(tmp_path: Path, announce: bool) -> None:
    proc, port = start_serve(tmp_path)
    try:

        async def everyone() -> list[tuple[int, str, str]]:
            return await asyncio.gather(
                *(send_big(port, i, announce=announce) for i in range(CLIENTS))
            )

        results = asyncio.run(everyone())
        refused = [i for i, (code, _, _) in enumerate(results) if code != 250]
        assert all(400 <= results[i][0] < 500 for i in refused), results  # never a 5xx
        expected = {i: digest for i, (_, _, digest) in enumerate(results) if digest}
        for _attempt in range(3):  # refused clients succeed on retry
            if not refused:
                break
            retried = asyncio.run(_retry(port, refused, announce))
            expected.update({i: d for i, (code, _, d) in zip(refused, retried, strict=True) if d})
            refused = [i for i, (code, _, _) in zip(refused, retried, strict=True) if code != 250]
        assert refused == []
        assert sendmail(port, SMALL) == {}  # a small message afterwards
        rss = peak_rss(proc.pid)
        print(f"serve peak RSS (VmHWM): {rss / 2**20:.1f} MiB")
        assert rss < RSS_BOUND, f"peak RSS {rss / 2**20:.1f} MiB"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    # Every 250 stored byte-exact: unwrap checks the stored message against the sha256
    # (and length) in its envelope record, which must be the sha256 of what was sent.
    new = tmp_path / "run" / "posts" / "new"
    stored: dict[int, str] = {}
    for path in new.iterdir():
        data = path.read_bytes()
        fields = unwrap_fields(data)
        assert fields is not None
        subject = re.search(rb"\r\nSubject: big (\d+)\r\n", fields[5][:400])
        if subject is not None:
            record = re.match(rb".*?sha256=([0-9a-f]{64})", data)
            assert record is not None
            stored[int(subject[1])] = record[1].decode()
    assert stored == expected and len(stored) == CLIENTS
    assert os.listdir(tmp_path / "run" / "posts" / "tmp") == []  # no spool file left


async def _retry(port: int, indexes: list[int], announce: bool) -> list[tuple[int, str, str]]:
    return await asyncio.gather(*(send_big(port, i, announce=announce) for i in indexes))
