"""A throwaway maildefer project for the chaos suite: settings and handler modules on disk.

The ingest handler (run by ``serve``) pushes every message to ``run/work``; the record
handler (run by the workers) appends the message's number to ``run/handled.log`` with an
fsync, fails at random (seeded) and sometimes hangs past its timeout.
"""

from __future__ import annotations

import socket
import textwrap
from dataclasses import dataclass
from pathlib import Path

INGEST = """
import os

from maildefer import Queue, route, stateless

# The work queue's path or URL (a maildir by default; an amqp:// URL for the broker runs).
WORK = os.environ.get("CHAOS_QUEUE", "run/work")


@route("(user)@(host)")
@stateless
async def START(message, user, host):
    await Queue(WORK).push(message)
"""

RECORD = """
import asyncio
import itertools
import os
import random

from maildefer import route, stateless

FAIL_RATE = float(os.environ.get("CHAOS_FAIL_RATE", "0"))
HANG_RATE = float(os.environ.get("CHAOS_HANG_RATE", "0"))
SEED = os.environ.get("CHAOS_SEED", "0")
CALLS = itertools.count()


@route("(user)@(host)")
@stateless
async def START(message, user, host):
    seq = message["X-Chaos-Seq"]
    # A new draw for every call (a retry must not repeat its failure); the seed keeps a
    # replay close to the original.
    rng = random.Random(f"{SEED}:{seq}:{os.getpid()}:{next(CALLS)}")
    draw = rng.random()
    if draw < HANG_RATE:
        await asyncio.sleep(3600)
    if draw < HANG_RATE + FAIL_RATE:
        raise RuntimeError(f"chaos: injected failure for {seq}")
    line = f"{seq}\\n".encode()
    fd = os.open("run/handled.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
"""


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ChaosProject:
    """Paths and settings of one chaos project."""

    root: Path
    port: int
    queue: str = "run/work"

    @property
    def config(self) -> Path:
        return self.root / "config" / "settings.toml"

    @property
    def work(self) -> Path:
        return self.root / "run" / "work"

    @property
    def undeliverable(self) -> Path:
        return self.root / "run" / "undeliverable"

    @property
    def handled_log(self) -> Path:
        return self.root / "run" / "handled.log"


def make_project(
    root: Path, *, handler_timeout: float = 2.0, queue: str = "run/work"
) -> ChaosProject:
    """Write settings and handlers for a chaos run under ``root``.

    ``queue`` is the work queue's path or URL; serve's handler gets it from the
    ``CHAOS_QUEUE`` environment variable, which :class:`~tests.chaos.harness.Cluster` sets.
    """
    port = free_port()
    (root / "config").mkdir(parents=True)
    (root / "run").mkdir()
    pkg = root / "chaos_app"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ingest.py").write_text(INGEST)
    (pkg / "record.py").write_text(RECORD)
    (root / "config" / "settings.toml").write_text(
        textwrap.dedent(
            f"""
            [server]
            host = "127.0.0.1"
            port = {port}
            hostname = "chaos.test"
            handlers = ["chaos_app.ingest"]
            handler_timeout = 10.0
            grace_period = 5.0

            [router]
            defaults = {{ host = "chaos\\\\.test" }}

            [queues.work]
            path = "{queue}"
            handlers = ["chaos_app.record"]
            concurrency = 4
            max_attempts = 6
            retry_delay = 0.05
            retry_max_delay = 0.5
            handler_timeout = {handler_timeout}
            rescan_interval = 0.5
            grace_period = 3.0

            [undeliverable]
            path = "run/undeliverable"

            [logging]
            level = "warning"
            format = "json"
            """
        )
    )
    return ChaosProject(root, port, queue)
