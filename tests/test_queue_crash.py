"""Crash tests with real processes: SIGKILL a pusher or a claimer at random moments (R1, R3).

The pusher is killed both in ``await push`` (the writer threads) and in ``push_sync``
(the calling thread writes).
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from maildefer.queue.envelope import unwrap
from maildefer.queue.maildir import MaildirQueue
from maildefer.queue.maildir.names import MaildirName

ZYGOTE = Path(__file__).parent / "helpers" / "queue_zygote.py"


class Zygote:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ZYGOTE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).parent.parent,
        )
        self._buf = b""
        assert self.line(timeout=30) == "ready"

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def line(self, timeout: float = 10.0) -> str | None:
        """The next line, or None if none arrives within ``timeout``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def until(self, prefix: str, collect: list[str]) -> str:
        while True:
            line = self.line()
            assert line is not None, f"no {prefix!r} from the zygote"
            if line.startswith(prefix):
                return line
            collect.append(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def zygote() -> Iterator[Zygote]:
    z = Zygote()
    yield z
    z.close()


@pytest.mark.parametrize("push", ["push", "push_sync"])
def test_sigkilled_pusher_loses_nothing_it_returned(
    tmp_path: Path, zygote: Zygote, push: str
) -> None:
    rng = random.Random(20240611)
    q = MaildirQueue(tmp_path / "q")
    q.ensure()
    promised: dict[str, str] = {}
    killed_mid_write = 0
    for round_ in range(50):
        zygote.send(f"{push} {q.path} {round_}")
        pid = int(zygote.until("pid ", []).split()[1])
        time.sleep(rng.uniform(0, 0.2))
        os.kill(pid, signal.SIGKILL)
        lines: list[str] = []
        zygote.send(f"wait {pid}")
        zygote.until("reaped ", lines)
        for line in lines:
            _, key, digest = line.split()
            promised[key] = digest
        debris = len(os.listdir(q.dir("tmp")))
        assert debris - killed_mid_write <= 1  # only the write the kill interrupted
        killed_mid_write = debris
    in_new = set(os.listdir(q.dir("new")))
    assert set(promised) <= in_new, set(promised) - in_new
    for name in in_new:  # nothing partial is visible, returned or not
        envelope, raw = unwrap((q.dir("new") / name).read_bytes())
        assert envelope is not None
        if name in promised:
            assert hashlib.sha256(raw).hexdigest() == promised[name]
    print(f"{len(promised)} returned keys, {killed_mid_write} writes killed midway")
    assert len(promised) > 10
    # The debris of killed writes goes at the next recovery: its writer is gone.
    assert q.recover_sync().tmp_removed == killed_mid_write
    assert os.listdir(q.dir("tmp")) == []


async def test_sigkilled_claimer_message_comes_back(tmp_path: Path, zygote: Zygote) -> None:
    q = MaildirQueue(tmp_path / "q")
    key = await q.push(b"Subject: claimed then killed\r\n\r\nx\r\n")
    zygote.send(f"claim {q.path} {key}")
    pid = int(zygote.until("pid ", []).split()[1])
    assert zygote.until("claimed ", []) == f"claimed {key}"
    assert os.listdir(q.dir("new")) == []
    assert (await q.recover()).returned == 0  # alive: its claim stands
    os.kill(pid, signal.SIGKILL)
    zygote.send(f"wait {pid}")
    zygote.until("reaped ", [])
    report = await q.recover()
    assert report.returned == 1
    [back] = os.listdir(q.dir("new"))
    assert MaildirName.parse(back).key == key and MaildirName.parse(back).attempts == 1
    claim = q.claim_sync(back)
    assert claim is not None and claim.message["Subject"] == "claimed then killed"
