"""The chaos run: serve and workers as real processes, a retrying client, a fault loop.

Jepsen's method: uniquely numbered messages, a record of which got ``250``, faults at random
(seeded) moments, quiesce, then check that every acknowledged number was handled or set
aside with a reason (lost = 0) and count duplicates.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from maildefer.queue.maildir import MaildirQueue
from tests.chaos.project import ChaosProject

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Profile:
    """How hard to shake: message count, kills, sessions, fault rates."""

    messages: int
    min_kills: int
    sessions: int = 4
    workers: int = 3
    fault_interval: tuple[float, float] = (0.2, 0.6)
    fail_rate: float = 0.05
    hang_rate: float = 0.01
    deadline: float = 100.0


SHORT = Profile(messages=300, min_kills=12, fault_interval=(0.5, 1.2))
LONG = Profile(messages=5000, min_kills=60, sessions=8, deadline=600.0)


@dataclass
class Result:
    """What the checker found."""

    seed: int
    messages: int
    acked: int
    handled: int
    duplicates: int
    undeliverable: int
    lost: list[int]
    kills: Counter[str] = field(default_factory=Counter)
    leftovers: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        return (
            f"seed={self.seed} messages={self.messages} acked={self.acked} "
            f"handled={self.handled} duplicates={self.duplicates} "
            f"undeliverable={self.undeliverable} lost={len(self.lost)} "
            f"reasons={dict(self.reasons)} kills={dict(self.kills)} "
            f"leftovers={len(self.leftovers)}"
        )


class Cluster:
    """serve plus N workers as subprocesses of one chaos project, restartable."""

    def __init__(self, project: ChaosProject, profile: Profile, seed: int) -> None:
        self.project = project
        self.profile = profile
        self.env = {
            **os.environ,
            "PYTHONPATH": f"{project.root}{os.pathsep}{REPO}",
            "CHAOS_SEED": str(seed),
            "CHAOS_FAIL_RATE": str(profile.fail_rate),
            "CHAOS_HANG_RATE": str(profile.hang_rate),
        }
        self.serve: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * profile.workers
        self.log = open(project.root / "processes.log", "ab")  # noqa: SIM115 - closed in stop()

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "maildefer", *args, "--config", str(self.project.config)],
            cwd=self.project.root,
            env=self.env,
            stdout=self.log,
            stderr=self.log,
        )

    def start_serve(self) -> None:
        self.serve = self._spawn("serve")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                smtplib.SMTP("127.0.0.1", self.project.port, timeout=2) as s,
            ):
                s.noop()
                return
            if self.serve.poll() is not None:
                raise RuntimeError(f"serve exited with {self.serve.returncode}")
            time.sleep(0.05)
        raise RuntimeError("serve did not start listening within 20 s")

    def start_worker(self, index: int) -> None:
        self.workers[index] = self._spawn("worker", "--queue", "work")

    def start(self) -> None:
        self.start_serve()
        for i in range(len(self.workers)):
            self.start_worker(i)

    def stop(self) -> None:
        procs = [p for p in [self.serve, *self.workers] if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.log.close()


class Client:
    """Sends numbered messages over several sessions, retrying 4xx like an MTA."""

    def __init__(self, port: int, profile: Profile) -> None:
        self.port = port
        self.profile = profile
        self.acked: set[int] = set()
        self.refused: dict[int, str] = {}
        self._lock = threading.Lock()
        self._next = 0

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= self.profile.messages:
                return None
            self._next += 1
            return self._next

    def _send_one(self, seq: int, deadline: float) -> None:
        body = (
            f"From: client@chaos.test\r\nTo: user{seq % 7}@chaos.test\r\n"
            f"Subject: chaos {seq}\r\nX-Chaos-Seq: {seq}\r\n\r\nmessage {seq}\r\n"
        )
        while time.monotonic() < deadline:
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=15) as s:
                    s.sendmail("client@chaos.test", [f"user{seq % 7}@chaos.test"], body)
                with self._lock:
                    self.acked.add(seq)
                return
            except smtplib.SMTPResponseException as exc:
                if exc.smtp_code >= 500:
                    self.refused[seq] = f"{exc.smtp_code} {exc.smtp_error!r}"
                    return
            except (smtplib.SMTPException, OSError):
                pass  # server down or connection cut: like an MTA, try again later
            time.sleep(0.1)
        self.refused[seq] = "gave up: deadline"

    def run(self, deadline: float) -> None:
        def session() -> None:
            while (seq := self._take()) is not None:
                self._send_one(seq, deadline)

        threads = [threading.Thread(target=session) for _ in range(self.profile.sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def fault_loop(
    cluster: Cluster, rng: random.Random, stop: threading.Event, kills: Counter[str]
) -> None:
    """Kill and restart processes at random moments until ``stop`` is set.

    ``kills`` is counted as it goes: the main thread watches it to know when enough
    faults have happened.
    """
    lo, hi = cluster.profile.fault_interval
    while not stop.wait(rng.uniform(lo, hi)):
        action = rng.choice(["kill-serve", "kill-worker", "kill-worker", "term-worker"])
        if action == "kill-serve" and cluster.serve is not None:
            cluster.serve.kill()
            cluster.serve.wait()
            kills[action] += 1
            cluster.start_serve()
        else:
            index = rng.randrange(len(cluster.workers))
            proc = cluster.workers[index]
            if proc is None:
                continue
            if action == "kill-worker":
                proc.kill()
            else:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            kills[action] += 1
            cluster.start_worker(index)


def queue_files(path: Path, subdirs: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for sub in subdirs:
        d = path / sub
        if d.is_dir():
            out += [p for p in d.iterdir() if not p.name.startswith(".")]
    return out


def seq_of(path: Path) -> int | None:
    for line in path.read_bytes().split(b"\n"):
        if line.startswith(b"X-Chaos-Seq:"):
            return int(line.split(b":", 1)[1].strip())
    return None


def run_chaos(project: ChaosProject, profile: Profile, seed: int) -> Result:
    """One whole chaos run; returns what the checker found."""
    rng = random.Random(seed)
    cluster = Cluster(project, profile, seed)
    cluster.start()
    client = Client(project.port, profile)
    stop = threading.Event()
    # Every key present from the start: the fault thread only updates values, so the main
    # thread can sum them safely meanwhile.
    kills: Counter[str] = Counter({"kill-serve": 0, "kill-worker": 0, "term-worker": 0})
    started = time.monotonic()
    deadline = started + profile.deadline

    fault_thread = threading.Thread(target=fault_loop, args=(cluster, rng, stop, kills))
    fault_thread.start()
    # However the run ends (a failure, a test timeout), no process of it outlives it.
    try:
        try:
            client.run(deadline)
            # Keep shaking until enough faults happened, then quiesce.
            while sum(kills.values()) < profile.min_kills and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            fault_thread.join()
        # Quiesce: everything up, wait for the queue to empty (retries, recoveries).
        for i, p in enumerate(cluster.workers):
            if p is None or p.poll() is not None:
                cluster.start_worker(i)
        quiet_deadline = time.monotonic() + 60
        while time.monotonic() < quiet_deadline:
            if not queue_files(project.work, ("new", "cur", "later")):
                break
            time.sleep(0.2)
    finally:
        cluster.stop()
    # What the next worker start would do: return dead claims, drop dead writers' tmp/ files.
    MaildirQueue(project.work, undeliverable=project.undeliverable).recover_sync()
    handled_lines = project.handled_log.read_text().split() if project.handled_log.exists() else []
    handled = Counter(int(x) for x in handled_lines)
    dead = {s for p in queue_files(project.undeliverable, ("new", "cur")) if (s := seq_of(p))}
    lost = sorted(client.acked - set(handled) - dead)
    reasons: Counter[str] = Counter()
    for record in (project.undeliverable / "errors").glob("*.json"):
        reasons[json.loads(record.read_text()).get("reason", "?")] += 1
    leftovers = [str(p) for p in queue_files(project.work, ("tmp", "new", "cur", "later"))]
    return Result(
        seed=seed,
        messages=profile.messages,
        acked=len(client.acked),
        handled=len(handled),
        duplicates=sum(c - 1 for c in handled.values() if c > 1),
        undeliverable=len(dead),
        lost=lost,
        kills=kills,
        leftovers=leftovers,
        reasons=reasons,
    )
