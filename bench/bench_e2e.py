"""End to end: SMTP in -> durable queue -> worker handler done, under a steady 200 msg/s.

A real ``python -m maildefer serve`` and one ``python -m maildefer worker`` on a project
made in a temp directory: serve's handler pushes each message to the maildir queue
``run/q``; the worker's handler writes the send time carried in the message's
``X-Bench-Sent`` header and ``time.time()`` at its end to a file. The client sends at a
steady rate (default 200 msg/s for 15 s) over several kept SMTP sessions (asyncio, raw
SMTP: a session stamps ``time.time()`` just before its ``MAIL FROM``). Figures: p50/p99
of send start -> handler done, p50/p99 of send start -> the 250 after DATA, p99 of how late
a send started after its slot in the schedule (all sessions busy), the rate achieved, and
the CPU time serve and the worker used per message.
The queue is on the real disk (``run/`` of the checkout): every push is fsync'd.

Usage: ``python bench/bench_e2e.py [--quick] [--rate 200] [--seconds 15]``; one JSON object
per figure on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SESSIONS = 16
SIZE = 4096

SERVE_HANDLER = """
from maildefer import Queue, route, stateless

@route("(user)@(host)")
@stateless
async def START(message, user, host):
    await Queue("run/q").push(message)
"""

WORKER_HANDLER = """
import os, time
from maildefer import route, stateless

@route("(user)@(host)")
@stateless
async def START(message, user, host):
    line = f"{message['X-Bench-Sent']}\\t{time.time():.6f}\\n".encode()
    fd = os.open(os.environ["BENCH_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, line)
    os.close(fd)
"""


def emit(
    figure: str,
    value: float,
    unit: str,
    goal: str | None = None,
    **extra: Any,
) -> None:
    record = {
        "bench": "e2e",
        "figure": figure,
        "value": round(value, 3),
        "unit": unit,
        "baseline": None,
        "ratio": None,
        "goal": goal,
        **extra,
    }
    print(json.dumps(record), flush=True)


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Project:
    """A maildefer project in ``base``: settings, the two handler modules, the processes."""

    def __init__(self, base: Path, port: int) -> None:
        self.root = base
        self.port = port
        self.record = base / "record"
        (base / "config").mkdir(parents=True)
        (base / "e2e_serve.py").write_text(SERVE_HANDLER)
        (base / "e2e_worker.py").write_text(WORKER_HANDLER)
        (base / "config" / "settings.toml").write_text(
            textwrap.dedent(
                f"""
                [server]
                host = "127.0.0.1"
                port = {port}
                hostname = "bench.test"
                handlers = ["e2e_serve"]
                max_connections_per_ip = 1000
                [router.defaults]
                host = ".+"
                [queues.q]
                path = "run/q"
                handlers = ["e2e_worker"]
                [logging]
                level = "info"
                format = "json"
                """
            )
        )
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *argv: str, log: str) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MAILDEFER_")}
        environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(self.root)])
        environ["BENCH_RECORD"] = str(self.record)
        # The child keeps its own copy of the descriptor; ours can close.
        with open(self.root / log, "ab") as stderr:
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "maildefer", *argv],
                    cwd=self.root,
                    env=environ,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            )

    def cpu_seconds(self) -> list[float]:
        """User + system CPU seconds used so far by each process (worker, serve)."""
        ticks = os.sysconf("SC_CLK_TCK")
        out = []
        for proc in self.procs:
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                out.append(0.0)
                continue
            out.append((int(fields[11]) + int(fields[12])) / ticks)
        return out

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def wait_log(self, log: str, event: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        path = self.root / log
        while time.monotonic() < deadline:
            if path.exists() and f'"{event}"' in path.read_text(errors="replace"):
                return
            if any(p.poll() is not None for p in self.procs):
                raise SystemExit(f"a process exited; see {self.root}")
            time.sleep(0.02)
        raise SystemExit(f"no {event} in {path} within {timeout} s")

    def records(self) -> dict[float, float]:
        """Send time -> handler-done time, per message handled so far."""
        if not self.record.exists():
            return {}
        out = {}
        for line in self.record.read_text().splitlines():
            sent, _, done = line.partition("\t")
            if sent and done and sent != "None":
                out[float(sent)] = float(done)
        return out


# -- the client ----------------------------------------------------------------------------


async def reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return line


async def send_steady(
    port: int, rate: float, seconds: float
) -> tuple[list[float], list[float], float]:
    """Send ``rate`` messages/s for ``seconds``.

    Returns the 250 latencies (ms), how late each send started after its slot in the
    schedule (ms: > 0 when every session was busy), and the rate achieved.
    """
    total = int(rate * seconds)
    due: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    filler = b"x" * 78 + b"\r\n"
    acked: list[float] = []
    lag: list[float] = []
    done_at: list[float] = []

    async def session() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reply(reader)
        writer.write(b"EHLO bench.test\r\n")
        await reply(reader)
        while (job := await due.get()) is not None:
            i, slot = job
            sent = time.time()
            lag.append((sent - slot) * 1000)
            head = f"To: u@bench.test\r\nSubject: e2e {i}\r\nX-Bench-Sent: {sent:.6f}\r\n\r\n"
            body = head.encode() + filler * ((SIZE - len(head)) // 80) + b".\r\n"
            for cmd in (b"MAIL FROM:<a@client.test>\r\n", b"RCPT TO:<u@bench.test>\r\n"):
                writer.write(cmd)
                if not (await reply(reader)).startswith(b"250"):
                    raise RuntimeError(f"{cmd!r} refused")
            writer.write(b"DATA\r\n")
            await reply(reader)
            writer.write(body)
            answer = await reply(reader)
            if not answer.startswith(b"250"):
                raise RuntimeError(f"DATA refused: {answer!r}")
            now = time.time()
            acked.append((now - sent) * 1000)
            done_at.append(now)
        writer.write(b"QUIT\r\n")
        await reply(reader)
        writer.close()

    tasks = [asyncio.create_task(session()) for _ in range(SESSIONS)]
    loop = asyncio.get_running_loop()
    start = loop.time()
    first = time.time()
    for i in range(total):
        # A steady schedule: message i is due at start + i/rate, whatever came before.
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        due.put_nowait((i, time.time()))
    for _ in tasks:
        due.put_nowait(None)
    await asyncio.gather(*tasks)
    return acked, lag, len(done_at) / (max(done_at) - first)


def wait_connectable(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(100).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"serve did not answer on port {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="5 s instead of 15 s")
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=None, help="how long to send")
    parser.add_argument("--dir", default=str(ROOT / "run"), help="where the project goes")
    args = parser.parse_args()
    seconds = args.seconds or (5.0 if args.quick else 15.0)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    # Absolute: the processes run in the project and BENCH_RECORD must name the same file.
    base = Path(tempfile.mkdtemp(prefix="bench-e2e-", dir=args.dir)).resolve()
    port = free_port()
    project = Project(base, port)
    try:
        project.start("worker", "--queue", "q", log="worker.log")
        project.start("serve", log="serve.log")
        project.wait_log("worker.log", "worker_started", 60)
        wait_connectable(port, 60)
        # Warm-up: one message through the whole path before measuring.
        asyncio.run(send_steady(port, 10.0, 0.5))
        deadline = time.monotonic() + 30
        while len(project.records()) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        warm = set(project.records())
        cpu_before = project.cpu_seconds()
        if not warm:
            raise SystemExit(f"e2e: the warm-up messages never reached the worker; see {base}")
        note(f"e2e: sending {args.rate:.0f} msg/s for {seconds:.0f} s over {SESSIONS} sessions")
        acked, lag, achieved = asyncio.run(send_steady(port, args.rate, seconds))
        expected = len(warm) + len(acked)
        deadline = time.monotonic() + 60
        while len(project.records()) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        records = {k: v for k, v in project.records().items() if k not in warm}
        cpu = [b - a for a, b in zip(cpu_before, project.cpu_seconds(), strict=True)]
    finally:
        project.stop()
    if len(records) < len(acked):
        note(f"e2e: only {len(records)} of {len(acked)} accepted messages were handled in time")
    if not records or not acked:
        raise SystemExit(f"e2e: no message made it through; logs kept in {base}")
    lat = [(done - sent) * 1000 for sent, done in records.items()]
    extra = {"messages": len(lat), "rate": args.rate, "seconds": seconds, "sessions": SESSIONS}
    emit("achieved send rate", achieved, "msg/s", goal=f"{args.rate:.0f} msg/s steady", **extra)
    # CPU per message shows whether a missed rate is the CPU (2 cores, client included).
    emit("serve CPU per message", cpu[1] * 1000 / len(acked), "ms", **extra)
    emit("worker CPU per message", cpu[0] * 1000 / len(acked), "ms", **extra)
    emit("send start after its slot p99", percentile(lag, 99), "ms", **extra)
    for p in (50, 99):
        emit(f"SMTP send start -> 250 p{p}", percentile(acked, p), "ms", **extra)
    for p in (50, 99):
        emit(f"SMTP send start -> worker handler done p{p}", percentile(lat, p), "ms", **extra)
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
