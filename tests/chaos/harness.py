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
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

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
    # Pause of each session between two messages: spreads the traffic over the faults.
    send_interval: float = 0.0


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
    refused: dict[int, str] = field(default_factory=dict)
    acked_at: dict[int, float] = field(default_factory=dict)
    deferrals: int = 0
    self_exits: int = 0
    # Warnings and errors the daemons logged, by event and error type (to explain a failure).
    events: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        return (
            f"seed={self.seed} messages={self.messages} acked={self.acked} "
            f"handled={self.handled} duplicates={self.duplicates} "
            f"undeliverable={self.undeliverable} lost={len(self.lost)} "
            f"reasons={dict(self.reasons)} kills={dict(self.kills)} "
            f"leftovers={len(self.leftovers)} refused={len(self.refused)} "
            f"deferrals={self.deferrals} self_exits={self.self_exits} "
            f"events={dict(self.events.most_common(8))}"
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
            "CHAOS_QUEUE": project.queue,
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
        # When each number got its 250 (monotonic): shows the flow resuming after a fault.
        self.acked_at: dict[int, float] = {}
        self.refused: dict[int, str] = {}
        # Every 4xx answer (the MTA keeps the message and tries again).
        self.deferrals = 0
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
                    self.acked_at[seq] = time.monotonic()
                return
            except smtplib.SMTPResponseException as exc:
                if exc.smtp_code >= 500:
                    self.refused[seq] = f"{exc.smtp_code} {exc.smtp_error!r}"
                    return
                with self._lock:
                    self.deferrals += 1
            except (smtplib.SMTPException, OSError):
                pass  # server down or connection cut: like an MTA, try again later
            time.sleep(0.1)
        self.refused[seq] = "gave up: deadline"

    def run(self, deadline: float) -> None:
        def session() -> None:
            while (seq := self._take()) is not None:
                self._send_one(seq, deadline)
                time.sleep(self.profile.send_interval)

        threads = [threading.Thread(target=session) for _ in range(self.profile.sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


class Faults(Protocol):
    """What a run does to the system meanwhile: its kinds of fault and the loop doing them."""

    kinds: tuple[str, ...]

    def run(
        self, cluster: Cluster, rng: random.Random, stop: threading.Event, kills: Counter[str]
    ) -> None:
        """Inject faults until ``stop`` is set, counting each in ``kills`` by kind."""


class Probe(Protocol):
    """The queue seen from outside: whether work is left, and what was set aside."""

    def pending(self) -> bool:
        """Whether messages are still queued, waiting for a retry or held by a worker."""

    def settle(self) -> tuple[set[int], Counter[str], list[str]]:
        """After the run: numbers set aside, their reasons, anything left in the queue."""


def kill_worker(cluster: Cluster, index: int, sig: signal.Signals) -> bool:
    """Stop worker ``index`` with ``sig`` (SIGKILL if it lingers), then start a new one."""
    proc = cluster.workers[index]
    if proc is None:
        return False
    proc.send_signal(sig)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    cluster.start_worker(index)
    return True


class ProcessKills:
    """Kill and restart serve and workers at random moments (the maildir runs)."""

    kinds: tuple[str, ...] = ("kill-serve", "kill-worker", "term-worker")

    def run(
        self, cluster: Cluster, rng: random.Random, stop: threading.Event, kills: Counter[str]
    ) -> None:
        """Until ``stop`` is set; ``kills`` is counted as it goes (the main thread watches)."""
        lo, hi = cluster.profile.fault_interval
        while not stop.wait(rng.uniform(lo, hi)):
            action = rng.choice(["kill-serve", "kill-worker", "kill-worker", "term-worker"])
            if action == "kill-serve" and cluster.serve is not None:
                cluster.serve.kill()
                cluster.serve.wait()
                kills[action] += 1
                cluster.start_serve()
                continue
            sig = signal.SIGKILL if action == "kill-worker" else signal.SIGTERM
            if kill_worker(cluster, rng.randrange(len(cluster.workers)), sig):
                kills[action] += 1


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


class MaildirProbe:
    """The maildir queue of a chaos project, read from its directories."""

    def __init__(self, project: ChaosProject) -> None:
        self.project = project

    def pending(self) -> bool:
        """Whether a message is still in new/, cur/ or later/."""
        return bool(queue_files(self.project.work, ("new", "cur", "later")))

    def settle(self) -> tuple[set[int], Counter[str], list[str]]:
        """Recover dead claims, then read the undeliverable maildir and what is left."""
        project = self.project
        # What the next worker start would do: return dead claims, drop dead writers' tmp/.
        MaildirQueue(project.work, undeliverable=project.undeliverable).recover_sync()
        dead = {s for p in queue_files(project.undeliverable, ("new", "cur")) if (s := seq_of(p))}
        reasons: Counter[str] = Counter()
        for record in (project.undeliverable / "errors").glob("*.json"):
            reasons[json.loads(record.read_text()).get("reason", "?")] += 1
        leftovers = [str(p) for p in queue_files(project.work, ("tmp", "new", "cur", "later"))]
        return dead, reasons, leftovers


def run_chaos(
    project: ChaosProject,
    profile: Profile,
    seed: int,
    *,
    faults: Faults | None = None,
    probe: Probe | None = None,
) -> Result:
    """One whole chaos run (process kills on a maildir queue unless told otherwise)."""
    injector: Faults = faults or ProcessKills()
    observer: Probe = probe or MaildirProbe(project)
    rng = random.Random(seed)
    cluster = Cluster(project, profile, seed)
    cluster.start()
    client = Client(project.port, profile)
    stop = threading.Event()
    # Every key present from the start: the fault thread only updates values, so the main
    # thread can sum them safely meanwhile.
    kills: Counter[str] = Counter(dict.fromkeys(injector.kinds, 0))
    started = time.monotonic()
    deadline = started + profile.deadline

    fault_thread = threading.Thread(target=injector.run, args=(cluster, rng, stop, kills))
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
        # Quiesce: everything up, wait for the queue to empty (retries, recoveries). A
        # process found dead here died by itself: the fault loop restarts what it kills.
        self_exits = 0
        if cluster.serve is not None and cluster.serve.poll() is not None:
            self_exits += 1
            cluster.start_serve()
        for i, p in enumerate(cluster.workers):
            if p is None or p.poll() is not None:
                self_exits += p is not None
                cluster.start_worker(i)
        quiet_deadline = time.monotonic() + 60
        while time.monotonic() < quiet_deadline:
            if not observer.pending():
                break
            time.sleep(0.2)
    finally:
        cluster.stop()
    handled = handled_counts(project)
    dead, reasons, leftovers = observer.settle()
    keep = os.environ.get("CHAOS_KEEP_LOGS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(project.root / "processes.log", Path(keep) / f"processes-{seed}.log")
    lost = sorted(client.acked - set(handled) - dead)
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
        refused=dict(client.refused),
        acked_at=dict(client.acked_at),
        deferrals=client.deferrals,
        self_exits=self_exits,
        events=logged_events(project.root / "processes.log"),
    )


def logged_events(log: Path) -> Counter[str]:
    """Warning and error lines of the daemons' JSON logs, counted by event and error type."""
    events: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("level") in ("warning", "error"):
                error = str(event.get("error") or event.get("reason") or "")
                # Numbers (ports, delivery tags, queue ids) would split one kind into many.
                error = re.sub(r"[0-9a-f]{6,}|\d+", "N", error)[-90:]
                events[f"{event.get('event')}: {error}"] += 1
    return events


def handled_counts(project: ChaosProject) -> Counter[int]:
    """How many times each number was handled so far (the record handler's log)."""
    log = project.handled_log
    return Counter(int(x) for x in (log.read_text().split() if log.exists() else []))
