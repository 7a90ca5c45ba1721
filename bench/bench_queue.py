"""Maildir queue throughput beside raw-syscall ceilings measured in the same run.

Prints one JSON object per figure on stdout (see bench/README.md); progress on stderr.
Each maildefer figure and its ceiling are measured in alternating rounds and the median
of each is kept, so a noisy neighbour hurts both about equally.

The ceilings are the same work in a few lines of raw ``os`` calls, nothing else:

- durable create (``naive_push``), per message: ``open(tmp/N, O_WRONLY|O_CREAT|O_EXCL)``,
  one ``write``, ``fsync``, ``close``, ``rename`` into ``new/``, then ``open(new/)``,
  ``fsync``, ``close``: 8 system calls, from 1 or 8 threads;
- drain (``raw_drain``), per message: ``rename`` from ``new/`` to ``cur/``, ``open``,
  ``read`` until it returns nothing, ``close``, ``unlink``: the same calls maildefer's
  ``claim_sync`` + ``ack_sync`` make, without maildefer's checks.

Queues are made under ``run/`` of the checkout (``--dir`` to change): a real disk, where
``/tmp`` may be a tmpfs.

    .venv/bin/python bench/bench_queue.py [--quick] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mailbox
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from maildefer.mail import MailRequest
from maildefer.queue.envelope import Envelope, wrap
from maildefer.queue.maildir import MaildirQueue

KIB = 1024


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(
    figure: str,
    value: float,
    unit: str = "msg/s",
    baseline: str | None = None,
    base_value: float | None = None,
    goal: str | None = None,
) -> None:
    ratio = round(value / base_value, 3) if base_value else None
    record = {
        "bench": "queue",
        "figure": figure,
        "value": round(value, 1),
        "unit": unit,
        "baseline": baseline,
        "ratio": ratio,
        "goal": goal,
    }
    print(json.dumps(record), flush=True)


def message(size: int) -> bytes:
    head = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: bench\r\n\r\n"
    return head + b"x" * max(0, size - len(head) - 2) + b"\r\n"


def request(size: int) -> MailRequest:
    """What ``serve`` pushes: the raw bytes with their SMTP envelope (nothing to parse)."""
    return MailRequest(
        message(size), mail_from="a@example.org", rcpt_tos=["b@example.org"], peer="127.0.0.1:1"
    )


# -- ceilings: the same durable write in a few lines of raw os calls ---------------------


def naive_push(root: Path, n: int, size: int, threads: int) -> float:
    """Per message: open O_EXCL in tmp/, write, fsync, close, rename into new/, fsync new/.

    ``rename`` rather than maildefer's ``link`` + ``unlink``: one call fewer, so the
    ceiling is if anything a little high (the two measured the same within noise here).
    """
    for sub in ("tmp", "new"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    data = message(size)
    tmp, new = str(root / "tmp"), str(root / "new")
    per = n // threads

    def work(t: int) -> None:
        for i in range(per):
            name = f"{t}.{i}"
            fd = os.open(f"{tmp}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            os.rename(f"{tmp}/{name}", f"{new}/{name}")
            dfd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)

    start = time.perf_counter()
    if threads == 1:
        work(0)
    else:
        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
    return per * threads / (time.perf_counter() - start)


def md_push(root: Path, n: int, size: int, pushers: int) -> float:
    """maildefer: ``pushers`` coroutines pushing concurrently on one event loop."""
    data = request(size)
    q = MaildirQueue(root)
    q.ensure()
    per = n // pushers

    async def loop() -> None:
        for _ in range(per):
            await q.push(data)

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(pushers)))
        elapsed = time.perf_counter() - start
        await q.close()
        return per * pushers / elapsed

    return asyncio.run(main())


def md_push_sync(root: Path, n: int, size: int) -> float:
    """maildefer: ``push_sync`` from plain synchronous code, one caller, no event loop."""
    data = request(size)
    q = MaildirQueue(root)
    q.ensure()
    start = time.perf_counter()
    for _ in range(n):
        q.push_sync(data)
    elapsed = time.perf_counter() - start
    q.close_sync()
    return n / elapsed


def stdlib_add(root: Path, n: int, size: int) -> float:
    box = mailbox.Maildir(str(root / "box"), create=True)
    data = message(size)
    start = time.perf_counter()
    for _ in range(n):
        box.add(data)
    return n / (time.perf_counter() - start)


# -- draining ------------------------------------------------------------------------------


def fill(root: Path, start: int, n: int, size: int) -> None:
    """n envelope-wrapped files written straight into new/ (no fsync: setup only)."""
    data = wrap(message(size), Envelope("a@example.org", ["b@example.org"]))
    new = str(root / "new")
    for i in range(start, start + n):
        fd = os.open(f"{new}/{i}.M0P0Q{i}R0.fill", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)


def first_names(root: Path, m: int) -> list[str]:
    names: list[str] = []
    with os.scandir(root / "new") as it:
        for entry in it:
            names.append(entry.name)
            if len(names) == m:
                break
    return names


def raw_drain(root: Path, m: int) -> float:
    """The ceiling: scandir, then rename into cur/, open, read, close, unlink.

    One ``read`` when it comes back short (on a local disk a short read of a regular file
    is its end), as ``claim_sync`` does; reads on to EOF otherwise.
    """
    start = time.perf_counter()
    names = first_names(root, m)
    new, cur = str(root / "new"), str(root / "cur")
    for name in names:
        os.rename(f"{new}/{name}", f"{cur}/{name}")
        fd = os.open(f"{cur}/{name}", os.O_RDONLY)
        if len(os.read(fd, 65536)) == 65536:
            while os.read(fd, 65536):
                pass
        os.close(fd)
        os.unlink(f"{cur}/{name}")
    return len(names) / (time.perf_counter() - start)


def md_drain(q: MaildirQueue, m: int) -> float:
    """maildefer: scan_new, claim_sync (rename, read, envelope check), ack_sync."""
    start = time.perf_counter()
    done = 0
    for batch in q.scan_new():
        for filename in batch:
            claim = q.claim_sync(filename)
            assert claim is not None
            q.ack_sync(claim)
            done += 1
            if done == m:
                return done / (time.perf_counter() - start)
    return done / (time.perf_counter() - start)


def rotate(rounds: int, *fns: Callable[[int], float]) -> list[float]:
    """Median rate of each of ``fns`` over rounds that rotate their order."""
    rates: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for i in range(len(fns)):
            j = (i + r) % len(fns)
            rates[j].append(fns[j](r))
    return [statistics.median(out) for out in rates]


def alternate(
    rounds: int, a: Callable[[int], float], b: Callable[[int], float]
) -> tuple[float, float]:
    """Median rate of a and b over alternating rounds (a, b, b, a, ...)."""
    ra: list[float] = []
    rb: list[float] = []
    for r in range(rounds):
        order = [(a, ra), (b, rb)] if r % 2 == 0 else [(b, rb), (a, ra)]
        for fn, out in order:
            out.append(fn(r))
    return statistics.median(ra), statistics.median(rb)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer messages and rounds")
    parser.add_argument(
        "--dir",
        default=str(Path(__file__).resolve().parent.parent / "run"),
        help="where to create queues, on the disk to measure (default: run/ of the checkout)",
    )
    args = parser.parse_args()
    quick = args.quick
    rounds = 3 if quick else 4
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="bench-queue-", dir=args.dir))
    counter = iter(range(10**9))

    def fresh() -> Path:
        path = base / f"q{next(counter)}"
        path.mkdir()
        return path

    def done(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def run(fn: Callable[[Path], float]) -> Callable[[int], float]:
        # Every round in a new directory, none deleted before the figure is done: on ext4
        # without a journal, creating a file skips every inode freed in the last 1-5
        # minutes ("recently_deleted"), so deleting one round's files between rounds made
        # the next round's creates cost up to 1 ms of CPU each (see docs/benchmarks.md).
        def once(_: int) -> float:
            return fn(fresh())

        return once

    def figure_done() -> None:
        for path in list(base.iterdir()):
            done(path)

    try:
        n1 = 300 if quick else 1000
        log(f"push and push_sync 4 KiB, 1 pusher, {n1} messages x {rounds} rounds")
        md1, sync1, naive1 = rotate(
            rounds,
            run(lambda p: md_push(p, n1, 4 * KIB, 1)),
            run(lambda p: md_push_sync(p, n1, 4 * KIB)),
            run(lambda p: naive_push(p, n1, 4 * KIB, 1)),
        )
        figure_done()
        emit("naive durable create, 1 thread, 4 KiB", naive1)
        emit(
            "push, 1 pusher, 4 KiB",
            md1,
            baseline="naive durable create, 1 thread, 4 KiB",
            base_value=naive1,
        )
        emit(
            "push_sync, 1 pusher, 4 KiB",
            sync1,
            baseline="naive durable create, 1 thread, 4 KiB",
            base_value=naive1,
        )

        n10 = 800 if quick else 2400
        log(f"push 4 KiB, 10 pushers vs 8 threads, {n10} messages x {rounds} rounds")
        md10, naive8 = alternate(
            rounds,
            run(lambda p: md_push(p, n10, 4 * KIB, 10)),
            run(lambda p: naive_push(p, n10, 4 * KIB, 8)),
        )
        figure_done()
        emit("naive durable create, 8 threads, 4 KiB", naive8)
        emit(
            "push, 10 concurrent pushers, 4 KiB",
            md10,
            baseline="naive durable create, 8 threads, 4 KiB",
            base_value=naive8,
            goal=">= 1.3x (group commit)",
        )

        nbig = 100 if quick else 300
        log(f"push 100 KiB, 1 pusher, {nbig} messages x {rounds} rounds")
        mdbig, naivebig = alternate(
            rounds,
            run(lambda p: md_push(p, nbig, 100 * KIB, 1)),
            run(lambda p: naive_push(p, nbig, 100 * KIB, 1)),
        )
        figure_done()
        emit("naive durable create, 1 thread, 100 KiB", naivebig)
        emit(
            "push, 1 pusher, 100 KiB",
            mdbig,
            baseline="naive durable create, 1 thread, 100 KiB",
            base_value=naivebig,
        )

        log(f"stdlib mailbox.Maildir.add, {n1} messages x {rounds} rounds")
        box, _ = alternate(rounds, run(lambda p: stdlib_add(p, n1, 4 * KIB)), lambda _: 0.0)
        figure_done()
        emit(
            "stdlib mailbox.Maildir.add, 4 KiB (no dir fsync)",
            box,
            baseline="naive durable create, 1 thread, 4 KiB",
            base_value=naive1,
        )

        m = 500 if quick else 2000
        drain_rounds = 3 if quick else 5
        depths = (1000, 20_000) if quick else (1000, 100_000)
        drains: dict[int, tuple[float, float]] = {}
        for depth in depths:
            path = fresh()
            q = MaildirQueue(path)
            q.ensure()
            t = time.perf_counter()
            # Keep the queue at ~depth while measuring: drain m at a time from depth + m.
            fill(path, 0, depth + m, 4 * KIB)
            log(f"filled {depth + m} files in {time.perf_counter() - t:.1f} s")
            nxt = depth + m
            raws: list[float] = []
            mds: list[float] = []
            for r in range(drain_rounds):
                for which in ("raw", "md") if r % 2 == 0 else ("md", "raw"):
                    if which == "raw":
                        raws.append(raw_drain(path, m))
                    else:
                        mds.append(md_drain(q, m))
                    fill(path, nxt, m, 4 * KIB)
                    nxt += m
            drains[depth] = statistics.median(mds), statistics.median(raws)
            done(path)
        for depth, (md, raw) in drains.items():
            label = f"{depth // 1000}k"
            emit(f"raw rename+read+unlink, {label} queued", raw)
            emit(
                f"claim+read+ack drain, {label} queued",
                md,
                baseline=f"raw rename+read+unlink, {label} queued",
                base_value=raw,
                goal=">= 0.7x",
            )
        small, large = depths
        emit(
            f"claim+read+ack drain, {large // 1000}k vs {small // 1000}k queued",
            drains[large][0],
            baseline=f"claim+read+ack drain, {small // 1000}k queued",
            base_value=drains[small][0],
            goal="0.8x-1.2x (flat)",
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
