"""maildefer beside salmon-mail (Lamson's maintained fork), measured in the same run.

salmon-mail runs in its own venv (``bench/.venv-salmon/``, made by ``bench/salmon_venv.py``
on first use; never a project dependency), as a subprocess running a small script written
to a temp file, which prints its results as JSON. Figures:

- **push**, 1 pusher, 4 KiB: ``salmon.queue.Queue(path).push(bytes)`` vs
  ``MaildirQueue.push``, alternating rounds, medians, on the real disk under ``run/``.
  salmon's push is stdlib ``mailbox.Maildir.add``: no fsync of the file nor of ``new/``,
  so it does less work than a durable push (see the notes in docs/benchmarks.md).
- **pickup latency** p50/p99, file landed in ``new/`` to handler start: salmon's
  ``QueueReceiver`` with its default ``sleep=10`` (a few messages at random moments over
  two periods) vs ``maildefer worker`` (messages 20 ms apart), both running at once.
- **drain** msg/s with a no-op handler over N queued (1k, 10k; 100k without ``--quick``)
  and peak RSS: ``QueueReceiver.start(one_shot=True)`` (10 pool threads, its default) vs
  ``maildefer worker --burst``. salmon re-lists the maildir on every pop (O(n^2)), so its
  run is stopped at a time bound and the rate it reached is reported, marked "stopped".

Queues for latency and drain live on tmpfs (``/dev/shm``), as in bench_worker.py.
Usage: ``python bench/bench_salmon.py [--quick]``; one JSON object per figure on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import bench_worker as bw  # noqa: E402
import salmon_venv  # noqa: E402
from bench_queue import md_push  # noqa: E402

SIZE = 4096

# Runs in salmon's venv: `push DIR N SIZE`, `latency DIR RECORD`, `drain DIR N BOUND`.
SALMON_SCRIPT = r"""
import json, logging, os, resource, sys, threading, time
from salmon.queue import Queue
from salmon.routing import Router, route, stateless
from salmon.server import QueueReceiver

logging.basicConfig(level=logging.WARNING)
STATE = {"n": 0, "record": None}
Router.defaults(user=".+", host=".+")


@route("(user)@(host)")
@stateless
def START(message, user, host):  # the no-op handler (records a time when asked to)
    STATE["n"] += 1
    if STATE["record"]:
        line = f"{message['Subject']}\t{time.time():.6f}\n".encode()
        fd = os.open(STATE["record"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, line)
        os.close(fd)


def result(**extra):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"handled": STATE["n"], "rss_kb": rss, **extra}), flush=True)


mode = sys.argv[1]
if mode == "push":
    path, n, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    head = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: bench\r\n\r\n"
    data = head + b"x" * max(0, size - len(head) - 2) + b"\r\n"
    queue = Queue(path)
    t0 = time.perf_counter()
    for _ in range(n):
        queue.push(data)
    result(rate=n / (time.perf_counter() - t0))
elif mode == "latency":
    STATE["record"] = sys.argv[3]
    receiver = QueueReceiver(sys.argv[2])  # its default sleep (10 s)
    print("READY", flush=True)
    receiver.start()
elif mode == "drain":
    path, n, bound = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    receiver = QueueReceiver(path)
    t0 = time.perf_counter()

    def stop():
        time.sleep(bound)
        result(seconds=time.perf_counter() - t0, bounded=True)
        os._exit(0)

    threading.Thread(target=stop, daemon=True).start()
    receiver.start(one_shot=True)
    result(seconds=time.perf_counter() - t0, bounded=False)
"""


def emit(
    figure: str,
    value: float,
    unit: str,
    baseline: str | None = None,
    base_value: float | None = None,
    goal: str | None = None,
    **extra: Any,
) -> None:
    record = {
        "bench": "salmon",
        "figure": figure,
        "value": round(value, 3),
        "unit": unit,
        "baseline": baseline,
        "ratio": round(value / base_value, 4) if base_value else None,
        "goal": goal,
        **extra,
    }
    print(json.dumps(record), flush=True)


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Salmon:
    """The salmon venv's python running ``SALMON_SCRIPT``."""

    def __init__(self, python: Path, workdir: Path) -> None:
        self.python = python
        self.script = workdir / "salmon_bench_child.py"
        self.script.write_text(SALMON_SCRIPT)

    def argv(self, *args: object) -> list[str]:
        return [str(self.python), str(self.script), *map(str, args)]

    def run(self, *args: object, timeout: float = 600) -> dict[str, Any]:
        proc = subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise SystemExit(f"salmon {args[0]} failed: {proc.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result


# -- push ----------------------------------------------------------------------------------


def push(salmon: Salmon, disk: Path, n: int, rounds: int) -> None:
    md_rates: list[float] = []
    sal_rates: list[float] = []
    # A B B A ...; every round writes into a fresh directory and nothing is deleted until
    # the end (file creation on this ext4 slows down right after mass deletions).
    for r in range(rounds):
        order = ("md", "salmon") if r % 2 == 0 else ("salmon", "md")
        for who in order:
            target = disk / f"{who}-{r}"
            if who == "md":
                md_rates.append(md_push(target, n, SIZE, 1))
            else:
                sal_rates.append(salmon.run("push", target, n, SIZE)["rate"])
    md, sal = statistics.median(md_rates), statistics.median(sal_rates)
    note(f"push: maildefer {[round(x) for x in md_rates]}, salmon {[round(x) for x in sal_rates]}")
    base = "salmon Queue.push, 1 pusher, 4 KiB (no fsync)"
    emit(base, sal, "msg/s", rounds=rounds, messages=n)
    emit(
        "maildefer push, 1 pusher, 4 KiB (durable)",
        md,
        "msg/s",
        baseline=base,
        base_value=sal,
        goal="never behind salmon-mail",
        rounds=rounds,
        messages=n,
    )


# -- pickup latency ------------------------------------------------------------------------


def plain_land(queue: Path, names: list[str], gaps: list[float]) -> dict[str, float]:
    """Plain RFC 822 files (what salmon queues hold) landed in ``new/`` after each gap."""
    landed = {}
    for name, gap in zip(names, gaps, strict=True):
        time.sleep(gap)
        body = f"To: u@example.com\r\nSubject: {name}\r\n\r\nx\r\n".encode()
        landed[name] = bw.land(queue, name, body)
    return landed


def latency(salmon: Salmon, base: Path, n: int, samples: int) -> None:
    md = bw.Project(base, "latency-maildefer")
    sal = bw.Project(base, "latency-salmon")
    md_record, sal_record = md.root / "rec", sal.root / "rec"
    worker = md.worker(BENCH_RECORD=str(md_record))
    receiver = subprocess.Popen(
        salmon.argv("latency", sal.queue, sal_record), stdout=subprocess.PIPE
    )
    try:
        assert receiver.stdout is not None
        if receiver.stdout.readline().strip() != b"READY":
            raise SystemExit("salmon QueueReceiver did not start")
        bw.trickle(md.queue, ["warmup"], [0.0])
        bw.wait_lines(md_record, 1, 60)
        # salmon gets a few messages at random moments over two of its periods, in a
        # thread, while maildefer is measured.
        rng = random.Random(11)
        sal_names = [f"s{i}" for i in range(samples)]
        sal_gaps = [rng.uniform(0, 20.0 / samples) for _ in sal_names]
        sal_landed: dict[str, float] = {}
        thread = threading.Thread(
            target=lambda: sal_landed.update(plain_land(sal.queue, sal_names, sal_gaps))
        )
        thread.start()
        names = [f"m{i}" for i in range(n)]
        md_landed = bw.trickle(md.queue, names, [0.02] * n)
        bw.wait_lines(md_record, n + 1, 60)
        thread.join()
        bw.wait_lines(sal_record, samples, 30)
    finally:
        for proc in (worker, receiver):
            proc.terminate()
            proc.wait()
    md_start, sal_start = bw.read_times(md_record), bw.read_times(sal_record)
    md_lat = [(md_start[k] - t) * 1000 for k, t in md_landed.items()]
    sal_lat = [(sal_start[k] - t) * 1000 for k, t in sal_landed.items()]
    for p in (50, 99):
        base_name = f"salmon QueueReceiver (sleep=10) pickup p{p}"
        sal_p, md_p = bw.percentile(sal_lat, p), bw.percentile(md_lat, p)
        emit(base_name, sal_p, "ms", samples=samples)
        emit(
            f"maildefer worker pickup p{p}",
            md_p,
            "ms",
            baseline=base_name,
            base_value=sal_p,
            goal="never behind salmon-mail",
            samples=n,
        )
    note(f"latency: maildefer {n} messages 20 ms apart; salmon {samples} at random moments")


# -- drain ---------------------------------------------------------------------------------


def plain_fill(queue: Path, n: int) -> None:
    tmp, new = queue / "tmp", queue / "new"
    for i in range(n):
        name = f"{int(time.time())}.M{i}P{os.getpid()}Q{i}.bench"
        with open(tmp / name, "wb") as f:
            f.write(f"To: u@example.com\r\nSubject: m{i}\r\n\r\nx\r\n".encode())
        os.rename(tmp / name, new / name)


def drain(salmon: Salmon, base: Path, n: int, bound: float) -> None:
    label = f"{n // 1000}k"
    project = bw.Project(base, f"salmon-drain-{n}")
    plain_fill(project.queue, n)
    result = salmon.run("drain", project.queue, n, bound, timeout=bound + 600)
    shutil.rmtree(project.root)
    sal_rate = result["handled"] / result["seconds"]
    sal_rss = result["rss_kb"] / 1024
    stopped = result["bounded"] or result["handled"] < n
    suffix = (
        f" (stopped at {result['seconds']:.0f} s, {result['handled']:,} done)" if stopped else ""
    )
    md_rate, md_rss = bw.drain(base, n)
    note(f"drain {label}: salmon {sal_rate:.0f}/s{suffix}, maildefer {md_rate:.0f}/s")
    sal_name = f"salmon QueueReceiver drain {label}{suffix}"
    emit(sal_name, sal_rate, "msg/s", stopped=stopped, handled=result["handled"])
    emit(
        f"maildefer worker drain {label}",
        md_rate,
        "msg/s",
        baseline=sal_name,
        base_value=sal_rate,
        goal="never behind salmon-mail",
    )
    rss_name = f"salmon QueueReceiver peak RSS {label}{' (at the stop)' if stopped else ''}"
    emit(rss_name, sal_rss, "MB")
    emit(
        f"maildefer worker peak RSS {label}",
        md_rss,
        "MB",
        baseline=rss_name,
        base_value=sal_rss,
        goal="<= 100 MB",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer messages, ~1.5 minutes")
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = parser.parse_args()
    python, what = salmon_venv.ensure()
    if python is None:
        note(what)
        print(
            json.dumps(
                {
                    "bench": "salmon",
                    "figure": "skipped",
                    "value": 0,
                    "unit": "-",
                    "baseline": None,
                    "ratio": None,
                    "goal": None,
                    "skipped": what,
                }
            )
        )
        return
    note(f"contender: {what} ({python})")
    base = Path(tempfile.mkdtemp(prefix="bench-salmon-", dir=args.dir))
    (ROOT / "run").mkdir(exist_ok=True)
    disk = Path(tempfile.mkdtemp(prefix="bench-salmon-push-", dir=ROOT / "run"))
    salmon = Salmon(python, base)
    try:
        push(salmon, disk, 300 if args.quick else 1000, 2 if args.quick else 4)
        latency(salmon, base, 50 if args.quick else 100, 4 if args.quick else 8)
        # salmon's time bound per drain: at 100k it manages well under 1 msg/s, so a
        # longer run would only repeat the point and push `make bench` past 10 minutes.
        bounds = {1_000: 30.0, 10_000: 30.0, 100_000: 20.0}
        for n in [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]:
            drain(salmon, base, n, 10.0 if args.quick else bounds[n])
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)


if __name__ == "__main__":
    main()
