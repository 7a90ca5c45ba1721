"""Several processes claiming from one maildir queue: each message exactly once (R9)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from maildefer.queue.envelope import Envelope, wrap
from maildefer.queue.keys import NameGenerator
from maildefer.queue.maildir import MaildirQueue

WORKER = Path(__file__).parent / "helpers" / "claim_worker.py"


def fill(q: MaildirQueue, n: int) -> set[str]:
    """n messages written straight into new/ (no fsync: this tests claiming, not push)."""
    q.ensure()
    names = NameGenerator(host="filler")
    keys = set()
    for i in range(n):
        key = names.next_key()
        data = wrap(f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode(), Envelope("a@x", [f"r{i}@y"]))
        (q.dir("new") / key).write_bytes(data)
        keys.add(key)
    return keys


@pytest.mark.parametrize("workers", [2, 4])
def test_every_message_claimed_exactly_once(tmp_path: Path, workers: int) -> None:
    q = MaildirQueue(tmp_path / "q")
    keys = fill(q, 5000)
    procs = []
    for i in range(workers):
        proc = subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(q.path),
                str(tmp_path / f"out{i}"),
                "rev" if i % 2 else "fwd",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).parent.parent,
        )
        procs.append(proc)
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    for proc in procs:  # start them together
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
    lost = 0
    for proc in procs:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        assert err == b""
        lost += int(out.split()[-1])
    claimed = Counter(
        key for i in range(workers) for key in (tmp_path / f"out{i}").read_text().split()
    )
    assert set(claimed) == keys
    assert max(claimed.values()) == 1
    assert sum(claimed.values()) == 5000
    assert [p.name for p in q.path.glob("*/*")] == []
    print(f"{workers} workers: {lost} claims lost to another worker (ENOENT, no error)")
