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

``--loop both`` (the default, issue 7) runs two such projects side by side, one whose serve
and worker run on the stdlib asyncio loop and one on uvloop (``--loop uvloop``), and sends to
them in alternating rounds (asyncio, uvloop, uvloop, asyncio; 5 s each, 2.5 s with
``--quick``): the asyncio figures keep their names, the uvloop ones end in ``(uvloop)`` with
the asyncio figure as baseline. ``--loop asyncio`` or ``--loop uvloop`` measures one loop,
in one round of 15 s (5 s with ``--quick``).

Usage: ``python bench/bench_e2e.py [--quick] [--rate 200] [--seconds S] [--loop both]``;
``--seconds`` is the length of one round. One JSON object per figure on stdout, progress on
stderr.
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
    baseline: tuple[str, float] | None = None,
    **extra: Any,
) -> None:
    record = {
        "bench": "e2e",
        "figure": figure,
        "value": round(value, 3),
        "unit": unit,
        "baseline": baseline[0] if baseline else None,
        "ratio": round(value / baseline[1], 3) if baseline and baseline[1] else None,
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

    def __init__(self, base: Path, port: int, loop: str = "asyncio") -> None:
        self.root = base
        self.port = port
        self.loop = loop
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
                    [sys.executable, "-m", "maildefer", *argv, "--loop", self.loop],
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


class Tally:
    """One loop's measurements, summed over its rounds."""

    def __init__(self) -> None:
        self.acked: list[float] = []
        self.lag: list[float] = []
        self.latency: list[float] = []
        self.sent = 0
        self.send_seconds = 0.0
        self.cpu = [0.0, 0.0]  # worker, serve


def start_project(base_dir: str, loop: str) -> tuple[Project, set[float]]:
    """A project on ``loop``, started and warmed up; the send times of the warm-up."""
    # Absolute: the processes run in the project and BENCH_RECORD must name the same file.
    base = Path(tempfile.mkdtemp(prefix=f"bench-e2e-{loop}-", dir=base_dir)).resolve()
    port = free_port()
    project = Project(base, port, loop)
    project.start("worker", "--queue", "q", log="worker.log")
    project.start("serve", log="serve.log")
    project.wait_log("worker.log", "worker_started", 60)
    wait_connectable(port, 60)
    # Warm-up: messages through the whole path before measuring.
    asyncio.run(send_steady(port, 10.0, 0.5))
    deadline = time.monotonic() + 30
    while len(project.records()) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    warm = set(project.records())
    if not warm:
        raise SystemExit(f"e2e: the warm-up messages never reached the worker; see {base}")
    return project, warm


def one_round(project: Project, tally: Tally, rate: float, seconds: float) -> None:
    """Send to ``project`` for ``seconds``; wait for its worker; add it all to ``tally``."""
    done_before = len(project.records())
    cpu_before = project.cpu_seconds()
    acked, lag, achieved = asyncio.run(send_steady(project.port, rate, seconds))
    expected = done_before + len(acked)
    deadline = time.monotonic() + 60
    while len(project.records()) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    # CPU of the round includes the worker catching up: its share of the same messages.
    for i, (a, b) in enumerate(zip(cpu_before, project.cpu_seconds(), strict=True)):
        tally.cpu[i] += b - a
    tally.acked += acked
    tally.lag += lag
    tally.sent += len(acked)
    tally.send_seconds += len(acked) / achieved
    note(f"e2e: {project.loop} round: {achieved:.0f} msg/s, 250 p50 {percentile(acked, 50):.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter rounds")
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=None, help="how long one round sends")
    parser.add_argument("--dir", default=str(ROOT / "run"), help="where the projects go")
    parser.add_argument(
        "--loop",
        choices=("both", "asyncio", "uvloop"),
        default="both",
        help="event loop of serve and worker; both: alternating rounds (default)",
    )
    args = parser.parse_args()
    both = args.loop == "both"
    schedule = ["asyncio", "uvloop", "uvloop", "asyncio"] if both else [args.loop]
    if args.seconds:
        seconds = args.seconds
    elif both:  # four rounds: 20 s of sending in all, 5 s more than one loop alone took
        seconds = 2.5 if args.quick else 5.0
    else:
        seconds = 5.0 if args.quick else 15.0
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    projects: dict[str, Project] = {}
    warm: dict[str, set[float]] = {}
    tallies = {loop: Tally() for loop in dict.fromkeys(schedule)}
    try:
        for loop in tallies:
            projects[loop], warm[loop] = start_project(args.dir, loop)
        note(
            f"e2e: sending {args.rate:.0f} msg/s over {SESSIONS} sessions, rounds of "
            f"{seconds:g} s: {' '.join(schedule)}"
        )
        for loop in schedule:
            one_round(projects[loop], tallies[loop], args.rate, seconds)
        for loop, tally in tallies.items():
            records = {k: v for k, v in projects[loop].records().items() if k not in warm[loop]}
            if len(records) < tally.sent:
                note(f"e2e: {loop}: only {len(records)} of {tally.sent} accepted were handled")
            tally.latency = [(done - sent) * 1000 for sent, done in records.items()]
    finally:
        for project in projects.values():
            project.stop()
    for loop, tally in tallies.items():
        if not tally.latency or not tally.acked:
            raise SystemExit(f"e2e: {loop}: no message made it through; logs kept in {args.dir}")
    base = tallies.get("asyncio")
    for loop, tally in tallies.items():
        rounds = schedule.count(loop)
        extra = {
            "messages": len(tally.latency),
            "rate": args.rate,
            "seconds": seconds * rounds,
            "rounds": rounds,
            "sessions": SESSIONS,
            "loop": loop,
        }
        suffix = "" if loop == "asyncio" else f" ({loop})"
        compare = base is not None and tally is not base

        def figures(t: Tally) -> list[tuple[str, float, str, str | None]]:
            out: list[tuple[str, float, str, str | None]] = [
                (
                    "achieved send rate",
                    t.sent / t.send_seconds,
                    "msg/s",
                    f"{args.rate:.0f} msg/s steady",
                ),
                # CPU per message: is a missed rate the CPU (2 cores, client included)?
                ("serve CPU per message", t.cpu[1] * 1000 / t.sent, "ms", None),
                ("worker CPU per message", t.cpu[0] * 1000 / t.sent, "ms", None),
                ("send start after its slot p99", percentile(t.lag, 99), "ms", None),
            ]
            for p in (50, 99):
                out.append((f"SMTP send start -> 250 p{p}", percentile(t.acked, p), "ms", None))
            for p in (50, 99):
                name = f"SMTP send start -> worker handler done p{p}"
                out.append((name, percentile(t.latency, p), "ms", None))
            return out

        baselines = figures(base) if compare and base is not None else None
        for i, (name, value, unit, goal) in enumerate(figures(tally)):
            reference = (baselines[i][0], baselines[i][1]) if baselines else None
            emit(name + suffix, value, unit, goal=goal, baseline=reference, **extra)
    for project in projects.values():
        shutil.rmtree(project.root, ignore_errors=True)


if __name__ == "__main__":
    main()
