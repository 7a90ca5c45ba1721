"""The disk guard (R8): 452 4.3.1 at MAIL FROM while the queue's disk is nearly full.

The end-to-end case is real: a 16 MiB tmpfs mounted as the maildir queue of a real
``Server`` on port 0 (skipped, with the reason, where mounting is not permitted), filled
with one ``fallocate``'d file to just below the threshold, then completely, then emptied.
The guard's own logic (threshold, SIZE, caching, one log line per change) is tested with
a fake clock and the ``statvfs`` seam.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.smtp_server import RawClient, make_settings, running, write_handlers

from maildefer.errors import ConfigError
from maildefer.mail import MailRequest
from maildefer.queue.envelope import unwrap
from maildefer.queue.maildir import MaildirQueue
from maildefer.settings import Settings, load_settings
from maildefer.smtp.diskguard import REPLY_NO_SPACE, DiskGuard
from maildefer.worker import Worker

MiB = 1024 * 1024
THRESHOLD = 2 * MiB


def events(out: io.StringIO, name: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == name]


# -- the guard alone: threshold, SIZE, caching, log lines -------------------------------------


class FakeDisk:
    """``statvfs`` of one filesystem whose free space the test sets; counts the calls."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0

    def statvfs(self, path: Path) -> os.statvfs_result:
        self.calls += 1
        stats = types.SimpleNamespace(f_bavail=self.free // 4096, f_frsize=4096)
        return stats  # type: ignore[return-value]


def test_threshold_size_and_caching(tmp_path: Path, log_out: io.StringIO) -> None:
    disk = FakeDisk(free=10 * MiB)
    now = [100.0]
    guard = DiskGuard(
        [tmp_path / "a", tmp_path / "b", tmp_path / "not" / "yet"],  # one filesystem
        min_free=4 * MiB,
        interval=1.0,
        clock=lambda: now[0],
        statvfs=disk.statvfs,
    )
    assert guard.refusal() is None
    assert disk.calls == 1  # three paths, one filesystem: measured once
    # SIZE counts on top of the threshold: 4 + 6 fits in 10, 4 + 6.5 does not.
    assert guard.refusal(size=6 * MiB) is None
    assert guard.refusal(size=6 * MiB + MiB // 2) == REPLY_NO_SPACE
    # Within the interval the measurement is reused, however many checks.
    disk.free = 1 * MiB
    for _ in range(1000):
        assert guard.refusal() is None
    assert disk.calls == 1
    now[0] += 1.0
    assert guard.refusal() == REPLY_NO_SPACE
    assert disk.calls == 2
    # Refusals while low log nothing more; the way back logs once.
    for _ in range(5):
        now[0] += 1.0
        assert guard.refusal() == REPLY_NO_SPACE
    disk.free = 5 * MiB
    now[0] += 1.0
    assert guard.refusal() is None
    now[0] += 1.0
    assert guard.refusal() is None
    low, ok = events(log_out, "disk_low"), events(log_out, "disk_ok")
    assert len(low) == 1 and len(ok) == 1, log_out.getvalue()
    assert low[0]["free"] == 1 * MiB and low[0]["min_free"] == 4 * MiB


def test_the_lowest_filesystem_decides(tmp_path: Path) -> None:
    # Two filesystems (tmp_path and /proc are never the same one); the fuller one counts.
    frees = {"/proc": 1 * MiB}

    def statvfs(path: Path) -> os.statvfs_result:
        free = frees.get(str(path), 100 * MiB)
        return types.SimpleNamespace(f_bavail=free, f_frsize=1)  # type: ignore[return-value]

    assert os.stat("/proc").st_dev != os.stat(tmp_path).st_dev
    guard = DiskGuard([tmp_path, "/proc"], min_free=2 * MiB, statvfs=statvfs)
    assert guard.refusal() == REPLY_NO_SPACE and guard.free() == 1 * MiB
    assert DiskGuard([tmp_path], min_free=2 * MiB, statvfs=statvfs).refusal() is None


def test_a_failing_statvfs_does_not_refuse_mail(tmp_path: Path, log_out: io.StringIO) -> None:
    def statvfs(path: Path) -> os.statvfs_result:
        raise OSError(5, "Input/output error")

    assert DiskGuard([tmp_path], min_free=2**40, statvfs=statvfs).refusal() is None
    assert events(log_out, "disk_check_failed")


def test_settings_default_and_validation(tmp_path: Path) -> None:
    assert Settings().server.min_free_bytes == 2 * Settings().server.max_message_size
    assert Settings(server={"min_free_space": 12345}).server.min_free_bytes == 12345
    (tmp_path / "settings.toml").write_text("[server]\nmin_free_space = -1\n")
    with pytest.raises(ConfigError, match="min_free_space"):
        load_settings(tmp_path / "settings.toml")
    # 0 turns the guard off: the server builds none.
    from maildefer.smtp.server import Server

    assert Server(Settings(server={"min_free_space": 0})).disk_guard is None
    assert Server(Settings(root=tmp_path)).disk_guard is not None


# -- a real serve on a real small tmpfs ---------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "16m") -> Iterator[Path]:
    """A tmpfs mounted at ``where``, unmounted afterwards (skips if mounting is refused)."""
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs: {proc.stderr.decode().strip() or proc}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


def leave_free(fs: Path, free: int) -> Path:
    """Grow one filler file until ``fs`` has about ``free`` bytes left (0: completely full)."""
    filler = fs / ".filler"
    have = filler.stat().st_size if filler.exists() else 0
    stats = os.statvfs(fs)
    want = max(0, have + stats.f_bavail * stats.f_frsize - free)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, min(have, want))
        if want > have:
            with contextlib.suppress(OSError):  # ENOSPC at the last page: full is the aim
                os.posix_fallocate(fd, 0, want)
    finally:
        os.close(fd)
    return filler


def listing(queue: Path) -> dict[str, list[str]]:
    return {d: sorted(os.listdir(queue / d)) for d in ("tmp", "new", "cur") if (queue / d).exists()}


async def mail_reply(client: RawClient, options: str = "") -> tuple[int, str]:
    """MAIL FROM (then RSET, so the session can MAIL again)."""
    code, text = await client.cmd(f"MAIL FROM:<ann@sender.org>{options}")
    assert (await client.cmd("RSET"))[0] == 250
    return code, text


async def until(client: RawClient, code: int, options: str = "") -> tuple[int, str]:
    """MAIL until it gets ``code``: the guard measures again within its interval."""
    deadline = time.monotonic() + 10
    while True:
        got = await mail_reply(client, options)
        if got[0] == code or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.1)


MESSAGE = b"From: ann@sender.org\r\nSubject: disk\r\n\r\n" + b"x" * 70 + b"\r\n.\r\n"


async def test_low_disk_452_at_mail_from_then_250_without_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_out: io.StringIO
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    queue = tmp_path / "run" / "posts"
    settings = make_settings(
        tmp_path,
        write_handlers(tmp_path),
        queues={"posts": {"path": "run/posts"}},
        max_message_size=MiB,
        min_free_space=THRESHOLD,
    )
    with tmpfs(queue) as fs:
        async with running(settings) as server:
            # Measured every 0.25 s instead of 1 s: the same mechanism, a shorter test.
            assert server.disk_guard is not None
            server.disk_guard.interval = 0.25
            client = await RawClient.connect(server.port)
            assert (await client.cmd("EHLO disk.test"))[0] == 250
            # Room: mail is accepted and stored.
            for _ in range(3):
                code, text = await client.transaction("ann@sender.org", ["ok@example.com"], MESSAGE)
                assert code == 250, text

            # Above the threshold, but not by a SIZE=900000 message: only that one is refused.
            filler = leave_free(fs, THRESHOLD + 512 * 1024)
            code, text = await until(client, 452, " SIZE=900000")
            assert (code, text) == (452, REPLY_NO_SPACE)
            assert (await mail_reply(client, " SIZE=1000"))[0] == 250
            assert (await mail_reply(client))[0] == 250

            # Below the threshold (there is room for a small message, so a 452 here is the
            # guard, not ENOSPC): refused at MAIL FROM, with or without SIZE=.
            before = listing(queue)
            leave_free(fs, THRESHOLD // 2)
            assert await until(client, 452) == (452, REPLY_NO_SPACE)
            assert await mail_reply(client, " SIZE=1000") == (452, REPLY_NO_SPACE)
            # The sender was not recorded: the client cannot go on to RCPT and DATA.
            assert (await client.cmd("MAIL FROM:<ann@sender.org>"))[0] == 452
            assert (await client.cmd("RCPT TO:<ok@example.com>"))[0] == 503
            assert (await client.cmd("DATA"))[0] == 503
            assert (await client.cmd("RSET"))[0] == 250
            other = await RawClient.connect(server.port)  # a new session alike
            await other.cmd("EHLO other.test")
            assert (await other.cmd("MAIL FROM:<b@sender.org> SIZE=10"))[0] == 452
            await other.close()
            assert listing(queue) == before  # nothing half-written in tmp/ or new/

            # Completely full: the worker still drains (claims are renames, acks unlinks).
            leave_free(fs, 0)
            assert os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize < 64 * 1024
            drained: list[bytes] = []

            async def handle(message: MailRequest) -> None:
                drained.append(message.raw)

            stats = await Worker(MaildirQueue(queue), handle, burst=True).serve()
            assert stats.handled == 3 and stats.failed == 0 and drained == [MESSAGE[:-3]] * 3
            assert listing(queue)["new"] == [] and listing(queue)["cur"] == []
            assert (await mail_reply(client))[0] == 452  # still full: the filler is there

            # Space freed: 250 again on the same session, no restart, and stored.
            filler.unlink()
            assert (await until(client, 250))[0] == 250
            code, text = await client.transaction("ann@sender.org", ["ok@example.com"], MESSAGE)
            assert code == 250, text
            assert (await client.cmd("MAIL FROM:<ann@sender.org> SIZE=900000"))[0] == 250
            await client.close()
            new = listing(queue)["new"]
            assert len(new) == 1 and listing(queue)["tmp"] == []
            assert unwrap((queue / "new" / new[0]).read_bytes())[1] == MESSAGE[:-3]
    # One line when it tripped, one when it cleared, however many refusals in between.
    assert len(events(log_out, "disk_low")) == 1, log_out.getvalue()
    assert len(events(log_out, "disk_ok")) == 1, log_out.getvalue()
