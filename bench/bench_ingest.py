"""Ingest throughput: messages/s through `serve` vs Postfix, a bare and a naive aiosmtpd server.

These servers, each in its own process on 127.0.0.1, measured in the same run:

- ``maildefer``: the real ``Server`` with a handler that ``await Queue(...).push(message)``
  (durable: file and directory fsync'd before the 250; group commit across sessions), on
  the stdlib asyncio loop and, as ``maildefer_uvloop``, on uvloop (``[runtime] loop``,
  issue 7);
- ``bare``: aiosmtpd on asyncio whose handler only returns 250 (the ceiling of this stack);
- ``naive``: aiosmtpd whose handler writes each message with its own fsyncs (file, then
  directory) in a thread, one ``to_thread`` per message;
- ``postfix``: a private Postfix instance (``bench/postfix_instance.py``) that queues each
  message durably and then discards it: what an operator would otherwise put in front of a
  script, the anchor maildefer has to match. Left out, with the reason on stderr, when it
  cannot run (not installed, not root).

Every server runs in alternating rounds (all in one order, then in the reverse order),
each round half of the messages, so that the shared machine's drift and the state of the
disk hit all of them alike; a rate is the server's messages over its seconds in all rounds.

Driven by Postfix's ``smtp-source`` (``-s 10 -m 5000 -l 4096``, with ``-d``: kept
connections, and without: one connection per message). Without ``/usr/sbin/smtp-source``
(Debian package ``postfix``) an asyncio client does the same and says so on stderr.
Postfix's ``smtp-sink`` (same package; it answers and discards, in C) driven the same way
is the native ceiling: one more figure, with maildefer's ratio to it. This script
installs nothing (``make bench-deps`` installs the package).

Usage: ``python bench/bench_ingest.py [--quick]``; one JSON object per figure on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import postfix_instance  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
SESSIONS = 10
BASE_NAMES = {"naive": "naive_durable", "sink": "smtp_sink"}
# maildefer on asyncio (A) and on uvloop (B) alternate: A B B A, each round a share of the run.
CYCLES = 2
ROUND_SHARE = 0.5
SIZE = 4096

HANDLER = """
from maildefer import Queue, route, stateless

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    await Queue("run/posts").push(message)
"""


# -- the servers (run in child processes) ------------------------------------------------


async def _serve_maildefer(port: int, workdir: Path) -> None:
    """The real Server (on whichever loop runs this coroutine)."""
    from maildefer.settings import Settings
    from maildefer.smtp.server import Server

    (workdir / "bench_handlers.py").write_text(textwrap.dedent(HANDLER))
    sys.path.insert(0, str(workdir))
    os.chdir(workdir)
    settings = Settings(
        root=workdir,
        server={
            "port": port,
            "hostname": "bench.test",
            "handlers": ["bench_handlers"],
            "max_connections_per_ip": 1000,
        },
        router={"defaults": {"host": ".+"}},
        logging={"level": "warning"},
    )
    server = Server(settings)
    server.on_ready = lambda: print("READY", flush=True)
    await server.serve()


class _Bare:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


def _write_durably(directory: Path, name: str, data: bytes) -> None:
    tmp = directory / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, directory / "new" / name)
    dfd = os.open(directory / "new", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class _Naive:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.n = 0
        for sub in ("tmp", "new"):
            (directory / sub).mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.n += 1
        name = f"{time.time():.6f}.{os.getpid()}.{self.n}"
        await asyncio.to_thread(_write_durably, self.directory, name, envelope.original_content)
        return "250 OK"


async def _serve_aiosmtpd(port: int, handler: Any) -> None:
    from aiosmtpd.smtp import SMTP

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        partial(SMTP, handler, hostname="bench.test"), "127.0.0.1", port, backlog=1000
    )
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


def serve_child(kind: str, port: int, workdir: Path) -> None:
    import logging

    logging.getLogger("mail.log").setLevel(logging.ERROR)
    if kind in ("maildefer", "maildefer_uvloop"):
        from maildefer import logs, loops

        logs.configure(level="warning", fmt="json")
        # What `serve` does with [runtime] loop = "asyncio" / "uvloop".
        loop = "uvloop" if kind == "maildefer_uvloop" else "asyncio"
        loops.run(_serve_maildefer(port, workdir), loop)
    elif kind == "bare":
        asyncio.run(_serve_aiosmtpd(port, _Bare()))
    else:
        asyncio.run(_serve_aiosmtpd(port, _Naive(workdir / "naive")))


# -- the clients -------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _asyncio_client(port: int, messages: int, keep: bool) -> None:
    body = b"Subject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * (SIZE // 80) + b".\r\n"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(messages):
        queue.put_nowait(i)

    async def reply(reader: asyncio.StreamReader) -> bytes:
        while True:
            line = await reader.readline()
            if line[3:4] != b"-":
                return line

    async def session() -> None:
        reader = writer = None
        while not queue.empty():
            queue.get_nowait()
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                await reply(reader)
                writer.write(b"EHLO bench\r\n")
                await reply(reader)
            assert reader is not None
            for cmd in (b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<post@bench.test>\r\n", b"DATA\r\n"):
                writer.write(cmd)
                await reply(reader)
            writer.write(body)
            assert (await reply(reader)).startswith(b"250")
            if not keep:
                writer.write(b"QUIT\r\n")
                await reply(reader)
                writer.close()
                await writer.wait_closed()
                reader = writer = None
        if writer is not None:
            writer.write(b"QUIT\r\n")
            writer.close()

    await asyncio.gather(*(session() for _ in range(SESSIONS)))


def drive(port: int, messages: int, keep: bool) -> float:
    """Send ``messages`` messages; returns the seconds it took."""
    started = time.perf_counter()
    if os.path.exists(SMTP_SOURCE):
        argv = [SMTP_SOURCE, "-s", str(SESSIONS), "-m", str(messages), "-l", str(SIZE)]
        argv += ["-f", "a@b.test", "-t", "post@bench.test"]
        if keep:
            argv.append("-d")
        subprocess.run([*argv, f"127.0.0.1:{port}"], check=True, capture_output=True)
    else:
        asyncio.run(_asyncio_client(port, messages, keep))
    return time.perf_counter() - started


def _start_sink(port: int) -> subprocess.Popen[bytes]:
    """Postfix's smtp-sink on 127.0.0.1:port, once it accepts connections."""
    import pwd
    import socket

    argv = [SMTP_SINK]
    if os.geteuid() == 0:  # smtp-sink refuses to run as root without a user to drop to
        try:
            user = pwd.getpwnam("postfix").pw_name
        except KeyError:
            user = "nobody"
        argv += ["-u", user]
    proc = subprocess.Popen(
        [*argv, f"127.0.0.1:{port}", "1000"],
        stdout=subprocess.DEVNULL,
        preexec_fn=postfix_instance.die_with_parent,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("smtp-sink did not start")


def measure(kind: str, messages: int, keep: bool) -> tuple[int, float]:
    """Run ``kind``'s server and send ``messages`` through it: (messages, seconds)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))
    port = _free_port()
    if kind == "postfix":
        return _measure_postfix(port, messages, keep, workdir)
    if kind == "sink":
        proc = _start_sink(port)
    else:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", kind, "--port", str(port), "--dir", str(workdir)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            preexec_fn=postfix_instance.die_with_parent,
        )
    try:
        if kind != "sink":
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"READY":
                raise RuntimeError(f"{kind} server did not start")
        drive(port, min(50, messages), keep)  # warm-up
        seconds = drive(port, messages, keep)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)
    return messages, seconds


def _measure_postfix(port: int, messages: int, keep: bool, workdir: Path) -> tuple[int, float]:
    """A fresh private Postfix per round, like the other servers' fresh processes."""
    shutil.rmtree(workdir, ignore_errors=True)
    instance = postfix_instance.PostfixInstance(port)
    try:
        instance.start()
        drive(port, min(50, messages), keep)  # warm-up
        seconds = drive(port, messages, keep)
    finally:
        instance.stop()
    return messages, seconds


def baseline_name(base: str | None, mode: str) -> str | None:
    """The figure name of a baseline (maildefer on asyncio is ``maildefer_<mode>_vs_naive``)."""
    if base is None:
        return None
    if base == "maildefer":
        return f"maildefer_{mode}_vs_naive"
    return f"{BASE_NAMES.get(base, base)}_{mode}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="1,000 messages instead of 5,000")
    parser.add_argument(
        "--child",
        choices=("maildefer", "maildefer_uvloop", "bare", "naive"),
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve_child(args.child, args.port, args.dir)
        return
    messages = 1000 if args.quick else 5000
    client = "smtp-source" if os.path.exists(SMTP_SOURCE) else "asyncio client"
    if client != "smtp-source":
        print(
            f"{SMTP_SOURCE} not found (Debian package: postfix); using an asyncio client",
            file=sys.stderr,
        )
    postfix_missing = postfix_instance.missing()
    if postfix_missing is not None:
        print(f"no Postfix figure: {postfix_missing}", file=sys.stderr)
    for keep in (True, False):
        mode = "kept" if keep else "reconnect"
        kinds = ["bare", "naive"]
        # The native ceiling needs smtp-source too: the asyncio client would be the limit.
        if client == "smtp-source" and os.path.exists(SMTP_SINK):
            kinds.insert(0, "sink")
        if postfix_missing is None:
            kinds.insert(1 if "sink" in kinds else 0, "postfix")
        kinds += ["maildefer", "maildefer_uvloop"]
        # Every server in alternating rounds (one order, then the reverse), each round
        # half of the messages: the shared machine's drift hits all of them alike.
        totals = {kind: [0, 0.0] for kind in kinds}
        per_round = max(50, int(messages * ROUND_SHARE))
        for cycle in range(CYCLES):
            for kind in kinds if cycle % 2 == 0 else reversed(kinds):
                sent, seconds = measure(kind, per_round, keep)
                totals[kind][0] += sent
                totals[kind][1] += seconds
                print(f"{mode} round {kind}: {sent / seconds:.0f} msg/s", file=sys.stderr)
        rates = {kind: sent / seconds for kind, (sent, seconds) in totals.items()}
        print(f"{mode}: {json.dumps({k: round(v) for k, v in rates.items()})}", file=sys.stderr)
        figures = [
            (f"bare_{mode}", rates["bare"], None, None),
            (f"naive_durable_{mode}", rates["naive"], None, None),
            (f"maildefer_{mode}_vs_naive", rates["maildefer"], "naive", ">= 1.5x naive durable"),
            (f"maildefer_{mode}_vs_bare", rates["maildefer"], "bare", ">= 0.6x bare"),
            # uvloop is the default loop ([runtime] loop = "auto" with uvloop installed):
            # the goals hold for it as for the stdlib loop.
            (
                f"maildefer_uvloop_{mode}_vs_naive",
                rates["maildefer_uvloop"],
                "naive",
                ">= 1.5x naive durable",
            ),
            (f"maildefer_uvloop_{mode}_vs_bare", rates["maildefer_uvloop"], "bare", ">= 0.6x bare"),
            (
                f"maildefer_uvloop_{mode}_vs_asyncio",
                rates["maildefer_uvloop"],
                "maildefer",
                "> 1x: uvloop is the default (auto)",
            ),
        ]
        if "postfix" in rates:
            # The anchor: a durable queue in C that operators already run. Goal: match it.
            figures[:0] = [(f"postfix_{mode}", rates["postfix"], None, None)]
            figures += [
                (f"maildefer_{mode}_vs_postfix", rates["maildefer"], "postfix", ">= 1x Postfix"),
                (
                    f"maildefer_uvloop_{mode}_vs_postfix",
                    rates["maildefer_uvloop"],
                    "postfix",
                    ">= 1x Postfix",
                ),
            ]
        if "sink" in rates:
            figures[:0] = [(f"smtp_sink_{mode}", rates["sink"], None, None)]
            figures.append(
                (f"maildefer_{mode}_vs_smtp_sink", rates["maildefer"], "sink", None),
            )
        for figure, value, base, goal in figures:
            ratio = value / rates[base] if base else None
            kind = next(k for k, v in rates.items() if v == value)
            print(
                json.dumps(
                    {
                        "bench": "ingest",
                        "figure": figure,
                        "value": round(value, 1),
                        "unit": "msg/s",
                        "baseline": baseline_name(base, mode),
                        "ratio": round(ratio, 3) if ratio is not None else None,
                        "goal": goal,
                        "client": client,
                        "sessions": SESSIONS,
                        "size": SIZE,
                        "messages": totals[kind][0],
                        "rounds": CYCLES,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
