"""``python -m maildefer queue QUEUE ACTION`` through real subprocesses."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from maildefer.mail import MailRequest
from maildefer.queue.backend import QueueOptions
from maildefer.queue.maildir import MaildirQueue
from maildefer.queue.maildir.names import MaildirName

RunCli = Callable[..., subprocess.CompletedProcess[bytes]]
RAW = b"From: ann@x.org\r\nTo: bob@y.org\r\nSubject: cli test\r\n\r\nhello\r\n"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / "config").mkdir(parents=True)
    (root / "config" / "settings.toml").write_text(
        '[queues.posts]\npath = "run/posts"\nmax_attempts = 2\nretry_delay = 0.0\n'
    )
    return root


def queue(project: Path) -> MaildirQueue:
    return MaildirQueue(
        project / "run" / "posts",
        options=QueueOptions(max_attempts=2, retry_delay=0.0),
        undeliverable=project / "run" / "undeliverable",
    )


def push(q: MaildirQueue, n: int = 1) -> list[str]:
    async def go() -> list[str]:
        return [
            await q.push(
                MailRequest(
                    RAW,
                    mail_from="ann@x.org",
                    rcpt_tos=["bob@y.org", "bcc@z.org"],
                    peer="127.0.0.1:4000",
                    received_at=1_700_000_000.0,
                )
            )
            for _ in range(n)
        ]

    return asyncio.run(go())


def test_count_and_keys(project: Path, run_cli: RunCli) -> None:
    keys = push(queue(project), 3)
    proc = run_cli("queue", "posts", "count", cwd=project)
    assert (proc.returncode, proc.stdout) == (0, b"3\n"), proc.stderr
    proc = run_cli("queue", "run/posts", "keys", cwd=project)
    assert proc.returncode == 0 and sorted(proc.stdout.decode().split()) == sorted(keys)
    # --config from elsewhere: the queue name resolves against the project root.
    proc = run_cli("--config", project / "config" / "settings.toml", "queue", "posts", "count")
    assert proc.stdout == b"3\n"


def test_show_envelope_headers_attempts_and_last_error(project: Path, run_cli: RunCli) -> None:
    q = queue(project)
    [key] = push(q)
    claim = q.claim_sync(key)
    assert claim is not None
    asyncio.run(q.retry(claim, "handler raised RuntimeError('db down')"))
    proc = run_cli("queue", "posts", "show", key, cwd=project)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert f"key:        {key}" in out
    assert "attempts:   1" in out
    assert "from:       ann@x.org" in out
    assert "to:         bob@y.org, bcc@z.org" in out
    assert "peer:       127.0.0.1:4000" in out
    assert "received:   2023-11-14T22:13:20Z" in out
    assert "db down" in out and '"reason": "retry"' in out
    assert "Subject: cli test" in out
    missing = run_cli("queue", "posts", "show", "nope", cwd=project)
    assert missing.returncode == 1 and b"no message nope" in missing.stderr
    usage = run_cli("queue", "posts", "show", cwd=project)
    assert usage.returncode == 2 and len(usage.stderr.splitlines()) == 1


def test_pop_prints_the_message_and_removes_it(project: Path, run_cli: RunCli) -> None:
    [key] = push(queue(project))
    proc = run_cli("queue", "posts", "pop", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"key: {key}\n".encode() + RAW
    empty = run_cli("queue", "posts", "pop", cwd=project)
    assert empty.returncode == 1 and b"empty" in empty.stderr


def test_remove_and_clear(project: Path, run_cli: RunCli) -> None:
    q = queue(project)
    keys = push(q, 3)
    assert run_cli("queue", "posts", "remove", keys[0], cwd=project).returncode == 0
    assert sorted(asyncio.run(q.keys())) == sorted(keys[1:])
    again = run_cli("queue", "posts", "remove", keys[0], cwd=project)
    assert again.returncode == 1
    proc = run_cli("queue", "posts", "clear", cwd=project)
    assert proc.returncode == 0 and proc.stdout == b"removed 2 messages\n"
    assert asyncio.run(q.count()) == 0


@pytest.mark.parametrize("where", ["posts", "run/undeliverable"])
def test_requeue_buried_messages(project: Path, run_cli: RunCli, where: str) -> None:
    q = queue(project)
    [key] = push(q)
    original = (q.dir("new") / key).read_bytes()
    for _ in range(2):
        [name] = [p.name for p in q.dir("new").iterdir()]
        claim = q.claim_sync(name)
        assert claim is not None
        asyncio.run(q.retry(claim, "boom"))
    dead = MaildirQueue(project / "run" / "undeliverable")
    assert asyncio.run(dead.count()) == 1 and asyncio.run(q.count()) == 0
    record = json.loads((dead.dir("errors") / f"{key}.json").read_text())
    assert record["attempts"] == 2 and record["reason"] == "failed"
    proc = run_cli("queue", where, "requeue", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"requeued 1 messages\n"
    assert asyncio.run(dead.count()) == 0
    [back] = [p.name for p in q.dir("new").iterdir()]
    assert back == key and MaildirName.parse(back).attempts == 0
    assert (q.dir("new") / back).read_bytes() == original


def test_unknown_action_is_a_usage_error(project: Path, run_cli: RunCli) -> None:
    proc = run_cli("queue", "posts", "explode", cwd=project)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and b"explode" in proc.stderr
