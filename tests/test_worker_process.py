"""``maildefer worker`` as real processes on real maildirs: latency, crashes, signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers.ops import wait_for

from maildefer.queue.envelope import Envelope, wrap
from maildefer.queue.maildir import MaildirQueue

PROJECT_ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "worker_apps"


def message(i: int | str) -> bytes:
    return f"From: a@x\r\nTo: u@example.com\r\nSubject: {i}\r\n\r\nbody\r\n".encode()


class Project:
    """A maildefer project directory with one queue, ``posts``, run by worker_recorder."""

    def __init__(self, root: Path, **queue: object) -> None:
        self.root = root
        (root / "config").mkdir(parents=True, exist_ok=True)
        options = {"rescan_interval": 1.0, "retry_delay": 0.1, **queue}
        lines = [
            "[queues.posts]",
            'path = "run/posts"',
            'handlers = ["worker_recorder"]',
            *(f"{k} = {json.dumps(v)}" for k, v in options.items()),
            "[undeliverable]",
            'path = "run/undeliverable"',
        ]
        (root / "config" / "settings.toml").write_text("\n".join(lines) + "\n")
        self.queue = MaildirQueue(root / "run" / "posts")
        self.queue.ensure()
        self.dead = MaildirQueue(root / "run" / "undeliverable")
        self.record = root / "record"
        self.started = root / "started"
        self._runs = 0

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILDEFER_", "RECORDER"))}
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), str(APPS)])
        env["MAILDEFER_LOGGING__FORMAT"] = "json"
        env["RECORDER_LOG"] = str(self.record)
        env["RECORDER_STARTED"] = str(self.started)
        env.update(extra)
        return env

    def worker(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        self._runs += 1
        log = open(self.root / f"worker-{self._runs}.log", "wb")  # noqa: SIM115
        with log:
            return subprocess.Popen(
                [sys.executable, "-m", "maildefer", "worker", "--queue", "posts", *args],
                cwd=self.root,
                env=self.env(**env),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "maildefer", *args],
            cwd=self.root,
            env=self.env(**env),
            capture_output=True,
            timeout=60,
            check=False,
        )

    def drop(self, subjects: list[str]) -> None:
        """Files into new/ fast (tmp, rename; no fsync), with push's envelope."""
        envelope = Envelope("a@x", ["u@example.com"], "", time.time(), "u@example.com")
        tmp, new = self.queue.dir("tmp"), self.queue.dir("new")
        for n, subject in enumerate(subjects):
            name = f"{int(time.time())}.M{n}P{os.getpid()}Q{n}R{subject}.test"
            (tmp / name).write_bytes(wrap(message(subject), envelope))
            os.rename(tmp / name, new / name)

    def handled(self) -> list[str]:
        return _lines(self.record, 0)

    def starts(self) -> list[str]:
        return _lines(self.started, 0)

    def logs(self) -> list[dict[str, object]]:
        out = []
        for path in sorted(self.root.glob("worker-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    out.append(json.loads(line))
        return out


def _lines(path: Path, column: int) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [line.split("\t")[column] for line in text.splitlines() if line]


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


async def test_pickup_latency_of_an_idle_worker(project: Project) -> None:
    proc = project.worker()
    try:
        await project.queue.push(message("warmup"))
        wait_for(lambda: "warmup" in project.handled(), what="the worker to start")
        pushed: dict[str, float] = {}
        for i in range(200):
            await project.queue.push(message(f"m{i}"))
            pushed[f"m{i}"] = time.time()  # the file is in new/ (and durable) by now
            await asyncio.sleep(0.02)
        wait_for(lambda: len(project.handled()) == 201, what="200 messages")
    finally:
        assert stop(proc) == 0
    starts = {
        subject: float(t)
        for subject, t, *_ in (line.split("\t") for line in project.record.read_text().splitlines())
    }
    latencies = sorted((starts[s] - t) * 1000 for s, t in pushed.items())
    p50, p99 = latencies[100], latencies[197]
    print(f"pickup latency p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    assert p99 < 200, latencies[-10:]


def test_three_workers_handle_each_message_exactly_once(fast_dir: Path) -> None:
    project = Project(fast_dir, concurrency=8)
    procs = [project.worker() for _ in range(3)]
    try:
        subjects = [f"m{i}" for i in range(5000)]
        time.sleep(0.5)  # let them start; what arrives before they watch is found by the scan
        project.drop(subjects)
        wait_for(lambda: len(project.handled()) >= 5000, timeout=90, what="5000 messages")
        time.sleep(0.3)  # a duplicate, if any, would land now
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0, 0]
    counts = Counter(project.handled())
    assert set(counts) == set(subjects)
    assert max(counts.values()) == 1
    assert not [line for line in project.logs() if line.get("level") == "error"]


@pytest.mark.parametrize("rounds", [5, pytest.param(20, marks=pytest.mark.slow)])
def test_sigkill_mid_handler_loses_nothing(project: Project, rounds: int) -> None:
    # The handler sleeps, so a kill soon after a start lands inside one. Many recoveries
    # are expected here: lift the poison cap so it does not quarantine a message.
    project = Project(project.root, concurrency=4, max_recoveries=1000)
    subjects = [f"m{i}" for i in range(100 + 10 * rounds)]
    project.drop(subjects[:100])
    killed_while_started: set[str] = set()
    for round_ in range(rounds):
        project.drop(subjects[100 + round_ * 10 : 110 + round_ * 10])  # messages keep flowing
        before = len(project.starts())
        proc = project.worker(RECORDER_SLEEP="0.05")
        wait_for(lambda: len(project.starts()) > before, what="a handler to start")  # noqa: B023
        proc.kill()
        proc.wait()
        # In flight when killed: started this round (perhaps done, but maybe not acked).
        killed_while_started |= set(project.starts()[before:])
    proc = project.worker()
    try:
        wait_for(lambda: set(project.handled()) >= set(subjects), timeout=60, what="all handled")
    finally:
        assert stop(proc) == 0
    counts = Counter(project.handled())
    assert set(counts) == set(subjects)  # lost = 0
    duplicates = {s for s, n in counts.items() if n > 1}
    assert duplicates <= killed_while_started
    assert not [n for batch in project.dead.scan_new() for n in batch]


def test_poison_message_is_quarantined_after_three_crashes(project: Project) -> None:
    project = Project(project.root, concurrency=1, max_recoveries=3)
    subjects = [f"m{i}" for i in range(20)]
    project.drop([*subjects[:10], "poison", *subjects[10:]])
    deaths = 0
    for _ in range(6):
        proc = project.worker(RECORDER_EXIT_ON="poison")

        def finished() -> bool:
            if proc.poll() is not None:  # noqa: B023
                return True
            quarantined = any(project.dead.scan_new())
            return quarantined and set(project.handled()) >= set(subjects)

        wait_for(finished, what="a crash or the end")
        if proc.poll() is None:
            assert stop(proc) == 0
            break
        assert proc.returncode == 1
        deaths += 1
    assert deaths == 3
    assert Counter(project.handled()) == Counter(subjects)
    buried = [n for batch in project.dead.scan_new() for n in batch]
    assert len(buried) == 1
    record = project.dead.error_record(buried[0].split(",")[0])
    assert record is not None and record["reason"] == "poison"
    assert project.dead.read_sync("new", buried[0])["Subject"] == "poison"


def test_sigterm_lets_in_flight_handlers_finish(project: Project) -> None:
    project = Project(project.root, concurrency=4, grace_period=20.0)
    subjects = [f"m{i}" for i in range(10)]
    project.drop(subjects)
    proc = project.worker(RECORDER_SLEEP="1.0")
    wait_for(lambda: len(project.starts()) == 4, what="four handlers in flight")
    code = stop(proc)
    assert code == 0
    assert sorted(project.handled()) == sorted(project.starts())
    assert len(project.handled()) == 4
    left = [n for batch in project.queue.scan_new() for n in batch]
    assert len(left) == 6 and not os.listdir(project.queue.dir("cur"))
    summary = [line for line in project.logs() if line["event"] == "worker_stopped"]
    assert len(summary) == 1
    assert summary[0]["handled"] == 4 and summary[0]["released"] == 0


def test_second_signal_exits_at_once_and_the_claims_come_back(project: Project) -> None:
    project = Project(project.root, concurrency=2, grace_period=30.0)
    project.drop(["a", "b"])
    proc = project.worker(RECORDER_SLEEP="30")
    wait_for(lambda: len(project.starts()) == 2, what="two handlers in flight")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 1
    assert time.monotonic() - t0 < 5
    assert len(os.listdir(project.queue.dir("cur"))) == 2
    burst = project.worker("--burst")
    assert burst.wait(timeout=60) == 0
    assert sorted(project.handled()) == ["a", "b"]


def test_failing_handler_is_buried_then_requeued_and_succeeds(project: Project) -> None:
    project = Project(project.root, max_attempts=3, retry_delay=0.1, retry_max_delay=0.2)
    marker = project.root / "fail"
    marker.touch()
    project.drop(["flaky"])
    key = next(iter(project.queue.scan_new()))[0]
    proc = project.worker(RECORDER_FAIL_WHILE=str(marker))
    try:
        wait_for(lambda: project.dead.locate(key) is not None, what="the message buried")
    finally:
        assert stop(proc) == 0
    record = project.dead.error_record(key)
    assert record is not None
    assert record["reason"] == "failed" and record["attempts"] == 3
    assert "RuntimeError: failing on purpose: flaky" in record["error"]
    assert project.starts() == ["flaky"] * 3
    marker.unlink()
    requeue = project.cli("queue", "posts", "requeue")
    assert requeue.returncode == 0, requeue.stderr
    burst = project.worker("--burst")
    assert burst.wait(timeout=60) == 0
    assert project.handled() == ["flaky"]
    assert project.dead.locate(key) is None


def test_bad_settings_exit_2_with_one_line(project: Project) -> None:
    no_handlers = project.cli("worker", "--queue", "run/elsewhere", "--burst")
    assert no_handlers.returncode == 2
    assert no_handlers.stderr.decode().count("\n") == 1
    assert b"no handlers" in no_handlers.stderr
    (project.root / "config" / "settings.toml").write_text(
        '[queues.posts]\npath = "run/posts"\nhandlers = ["no_such_handler_module"]\n'
    )
    bad_module = project.cli("worker", "--queue", "posts", "--burst")
    assert bad_module.returncode == 2
    assert b"no_such_handler_module" in bad_module.stderr
    bad_concurrency = project.cli("worker", "--queue", "posts", "--concurrency", "0")
    assert bad_concurrency.returncode == 2
