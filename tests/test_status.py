"""``maildefer status`` against real maildirs: figures, thresholds, exit codes, --json."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from maildefer.queue.backend import QueueOptions
from maildefer.queue.keys import key_time
from maildefer.queue.maildir import MaildirQueue
from maildefer.queue.maildir.inspect import UNDELIVERABLE, collect
from maildefer.settings import load_settings
from tests.conftest import RunCli

SETTINGS = """
[queues.posts]
path = "run/posts"

[queues.index]
path = "run/index"

[queues.remote]
path = "amqp://guest:guest@127.0.0.1:5672/?queue=remote"

[undeliverable]
path = "run/undeliverable"
"""

MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: s\r\n\r\nbody\r\n"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project with two maildir queues, one broker queue, and mail in every state.

    posts: 4 waiting (one queued 3 h ago, one dropped in by another program), 1 claimed,
    1 in retry backoff, 2 buried.
    index: empty (its directory does not even exist yet).
    """
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "settings.toml").write_text(SETTINGS)
    run = tmp_path / "run"
    posts = MaildirQueue(
        run / "posts", undeliverable=run / "undeliverable", options=QueueOptions(max_attempts=5)
    )

    async def fill() -> None:
        keys = [await posts.push(MESSAGE) for _ in range(6)]
        claimed = await posts.claim(keys[0])
        retried = await posts.claim(keys[1])
        dead1 = await posts.claim(keys[2])
        dead2 = await posts.claim(keys[3])
        assert claimed and retried and dead1 and dead2
        assert await posts.retry(retried, "smtp relay down")  # to later/
        await posts.bury(dead1, "boom", "failed")
        await posts.bury(dead2, "boom", "poison")

    asyncio.run(fill())
    # A message queued three hours ago (a key as NameGenerator makes), and one that another
    # program dropped in with a name that carries no time: its mtime counts.
    hours_ago = int(time.time()) - 3 * 3600
    (run / "posts" / "new" / f"{hours_ago}.M5P1Q1R00.mx").write_bytes(MESSAGE)
    dropped = run / "posts" / "new" / "dropped-by-procmail"
    dropped.write_bytes(MESSAGE)
    os.utime(dropped, (time.time() - 60, time.time() - 60))
    (run / "posts" / "new" / ".hidden-in-progress").write_bytes(b"")  # skipped: dot-file
    return tmp_path


def test_key_time_reads_the_maildir_key() -> None:
    assert key_time("1700000000.M123456P7Q1Rab.mx,A=1,W=mx~1~2") == pytest.approx(1700000000.123456)
    assert key_time("1700000000.host") == 1700000000
    assert key_time("cur-file:2,S") is None


def test_collect_counts_every_state(project: Path) -> None:
    settings = load_settings(project / "config" / "settings.toml")
    reports = {r.name: r for r in collect(settings)}
    assert list(reports) == ["index", "posts", UNDELIVERABLE]  # the amqp queue is skipped
    posts = reports["posts"]
    # 2 pushed and untouched + the old one + the dropped one (not the dot-file).
    assert (posts.new, posts.delayed, posts.claimed, posts.undeliverable) == (4, 1, 1, 2)
    assert posts.oldest_age is not None and 3 * 3600 - 10 < posts.oldest_age < 3 * 3600 + 100
    index = reports["index"]
    assert (index.new, index.delayed, index.claimed, index.oldest_age) == (0, 0, 0, None)
    assert not (project / "run" / "index").exists()  # status creates nothing
    dead = reports[UNDELIVERABLE]
    assert (dead.new, dead.undeliverable) == (2, None)


def test_within_thresholds_exits_zero(project: Path, run_cli: RunCli) -> None:
    result = run_cli(
        "status", "--max-depth", "4", "--max-age", "20000", "--max-undeliverable", "2", cwd=project
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "EXCEEDED" not in out
    posts = next(line for line in out.splitlines() if line.startswith("posts"))
    assert posts.split() == ["posts", "4", "1", "1", "3.0h", "2"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--max-depth", "3"], "posts: 4 messages waiting > --max-depth 3"),
        (["--max-age", "600"], "posts: oldest waiting message 10"),
        (["--max-undeliverable", "1"], f"{UNDELIVERABLE}: 2 messages > --max-undeliverable 1"),
    ],
)
def test_each_threshold_exits_one(
    project: Path, run_cli: RunCli, flags: list[str], expected: str
) -> None:
    result = run_cli("status", *flags, cwd=project)
    assert result.returncode == 1, result.stderr
    exceeded = [line for line in result.stdout.decode().splitlines() if "EXCEEDED" in line]
    assert len(exceeded) == 1 and exceeded[0].startswith(f"EXCEEDED {expected}")


def test_json_output(project: Path, run_cli: RunCli) -> None:
    result = run_cli("status", "--json", "--max-depth", "3", cwd=project)
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert document["ok"] is False
    assert document["exceeded"] == ["posts: 4 messages waiting > --max-depth 3"]
    queues = {q["name"]: q for q in document["queues"]}
    assert queues["posts"]["new"] == 4 and queues["posts"]["claimed"] == 1
    assert queues["posts"]["delayed"] == 1 and queues["posts"]["undeliverable"] == 2
    assert queues["posts"]["path"] == str(project / "run" / "posts")
    assert queues[UNDELIVERABLE]["new"] == 2


def test_no_thresholds_never_fails_and_bad_usage_exits_two(project: Path, run_cli: RunCli) -> None:
    assert run_cli("status", cwd=project).returncode == 0
    bad = run_cli("status", "--max-depth", "many", cwd=project)
    assert bad.returncode == 2 and b"--max-depth" in bad.stderr
