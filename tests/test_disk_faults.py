"""Disk faults under a running ``serve`` and a worker: 451, no debris, nothing lost (R2, R12).

The full-disk cases are real: a 256 KiB tmpfs mounted as the queue directory (skipped, with
the reason, where mounting is not permitted). EIO cannot be produced on demand by a real
filesystem here, so it is injected at the OS-call seam: ``os.fsync`` fails for the queue's
files only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from helpers.smtp_server import RawClient, make_settings, running, write_handlers

import maildefer.queue.maildir.writer as writer_module
from maildefer import logs
from maildefer.errors import NoRouteError
from maildefer.mail import MailRequest
from maildefer.queue.envelope import unwrap
from maildefer.queue.maildir import MaildirQueue
from maildefer.worker import Worker

PAGE = 4096


def message(n: int, size: int) -> bytes:
    """A message of about ``size`` bytes, CRLF lines of 76 octets, no line starting '.'."""
    head = f"From: ann@sender.org\r\nSubject: m{n}\r\n\r\n".encode()
    line = (f"{n:08d}" + "x" * 66 + "\r\n").encode()
    return head + line * max(1, (size - len(head)) // len(line))


def files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "256k") -> Iterator[Path]:
    """A small tmpfs mounted at ``where`` (skips the test if mounting is not permitted)."""
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


def fill(fs: Path, leave: int = 0) -> Path:
    """Fill a filesystem with one file until ENOSPC; then give back ``leave`` bytes."""
    filler = fs / ".filler"
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * PAGE
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.fixture
def quiet_logs() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure(level="info", fmt="json", stream=out)
    yield out
    structlog.reset_defaults()


async def send(port: int, body: bytes, rcpt: str = "ok@example.com") -> tuple[int, str]:
    client = await RawClient.connect(port)
    try:
        await client.cmd("EHLO disk.test")
        return await client.transaction("ann@sender.org", [rcpt], body + b".\r\n")
    finally:
        await client.close()


def stored(queue: Path) -> list[bytes]:
    return sorted(unwrap((queue / "new" / name).read_bytes())[1] for name in files(queue / "new"))


# -- ENOSPC: a real full filesystem -----------------------------------------------------------


async def test_full_queue_filesystem_451_then_service_resumes(project: Path) -> None:
    queue = project / "run" / "posts"
    with tmpfs(queue):
        async with running(make_settings(project, write_handlers(project))) as server:
            # Fill it with deliveries: every 250 is stored whole, the first refusal is 451.
            acked: list[bytes] = []
            for n in range(40):
                body = message(n, 40_000)
                code, text = await send(server.port, body)
                if code != 250:
                    break
                acked.append(body)
            assert (code, text[4:9]) == (451, "4.3.0"), text
            assert 3 <= len(acked) < 40
            assert files(queue / "tmp") == []
            assert stored(queue) == sorted(acked)  # the refused one is not in new/

            # Completely full: even a tiny message is refused, on a session that goes on.
            filler = fill(queue)
            client = await RawClient.connect(server.port)
            await client.cmd("EHLO disk.test")
            tiny = b"Subject: tiny\r\n\r\nhi\r\n"
            code, text = await client.transaction("a@b.org", ["ok@example.com"], tiny + b".\r\n")
            assert code == 451, text
            assert (await client.cmd("NOOP"))[0] == 250
            assert files(queue / "tmp") == [] and stored(queue) == sorted(acked)

            # Space comes back (a worker took messages): the same session delivers again.
            filler.unlink()
            (queue / "new" / files(queue / "new")[0]).unlink()
            code, text = await client.transaction("a@b.org", ["ok@example.com"], tiny + b".\r\n")
            assert code == 250, text
            big = message(99, 40_000)
            assert (await send(server.port, big))[0] == 250
            await client.close()
            now = stored(queue)
            assert tiny in now and big in now
            assert files(queue / "tmp") == []


# -- EIO: injected at the fsync seam ------------------------------------------------------------


def failing_fsync(
    monkeypatch: pytest.MonkeyPatch, queue: Path, which: Callable[[str], bool]
) -> list[str]:
    """Make ``os.fsync`` fail with EIO for the queue paths ``which`` selects.

    Patched on the ``os`` module itself, so it holds wherever the queue code calls it
    from (queue.py, store.py or the writer); every other fsync goes through untouched.
    """
    real = os.fsync
    failed: list[str] = []

    def fsync(fd: int) -> None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if path.startswith(f"{queue}/") and which(path[len(str(queue)) + 1 :]):
            failed.append(path)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed


def failing_syncfs(monkeypatch: pytest.MonkeyPatch, queue: Path) -> list[str]:
    """Make the writer's ``syncfs`` (its OS-call seam) fail with EIO for ``queue``."""
    real = writer_module.sync_filesystem
    failed: list[str] = []

    def syncfs(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path == f"{queue}/tmp":
            failed.append(path)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(writer_module, "sync_filesystem", syncfs)
    return failed


@pytest.mark.parametrize("target", ["file", "directory", "syncfs"])
async def test_eio_on_fsync_451_and_no_debris(
    project: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    if target == "syncfs" and not writer_module.syncfs_available():
        pytest.skip("syncfs(2) with error reporting needs Linux >= 5.8")
    queue = project / "run" / "posts"
    # "file": the per-file fsync of sync = "fsync"; "syncfs": the batch flush instead.
    sync = "fsync" if target == "file" else "syncfs" if target == "syncfs" else "auto"
    settings = make_settings(
        project, write_handlers(project), queues={"posts": {"path": "run/posts", "sync": sync}}
    )
    async with running(settings) as server:
        first = message(1, 2_000)
        assert (await send(server.port, first))[0] == 250
        # The message file in tmp/, or the new/ directory (paths relative to the queue).
        which = (lambda p: p.startswith("tmp/")) if target == "file" else (lambda p: p == "new")
        with monkeypatch.context() as patch:
            if target == "syncfs":
                # A lone message is flushed by its own fsync in syncfs mode; a batch by
                # syncfs: either failing must give a 451.
                batches = failing_syncfs(patch, queue)
                files_ = failing_fsync(patch, queue, lambda p: p.startswith("tmp/"))
            else:
                batches, files_ = [], failing_fsync(patch, queue, which)
            code, text = await send(server.port, message(2, 2_000))
            assert (code, text[4:9]) == (451, "4.3.0"), text
            failed = batches + files_
            assert len(failed) == 1, failed  # injected once, where intended
        assert files(queue / "tmp") == []
        assert stored(queue) == [first]  # the refused message is not in new/
        third = message(3, 2_000)
        assert (await send(server.port, third))[0] == 250
        assert stored(queue) == sorted([first, third])


# -- bury on a full undeliverable queue ---------------------------------------------------------


async def no_route(message: MailRequest) -> None:
    raise NoRouteError(f"no route matches {message.rcpt_to!r}")


@pytest.mark.parametrize("layout", ["same filesystem", "undeliverable elsewhere"])
async def test_bury_on_a_full_disk_keeps_the_original(
    tmp_path: Path, quiet_logs: io.StringIO, layout: str
) -> None:
    fs = tmp_path / "fs"
    with tmpfs(fs):
        dead = MaildirQueue(fs / "dead")
        dead.ensure()
        home = fs if layout == "same filesystem" else tmp_path
        q = MaildirQueue(home / "q", undeliverable=dead.path)
        raw = message(1, 60_000)
        key = await q.push(raw)
        # Same filesystem: nothing left at all. Elsewhere: room for the error record, not
        # for the copy of the message (a rename across filesystems is a copy).
        fill(fs, leave=0 if layout == "same filesystem" else 2 * PAGE)
        stats = await Worker(q, no_route, burst=True).serve()
        assert stats.buried == 0
        assert "queue_op_failed" in quiet_logs.getvalue()
        # Not lost: the original was given back to new/ when the worker stopped (it is not
        # stranded in cur/), byte for byte, and nothing reached the undeliverable new/.
        where = q.locate(key)
        assert where is not None and where[0] == "new"
        assert unwrap((q.dir("new") / where[1]).read_bytes())[1] == raw
        assert list(dead.dir("new").iterdir()) == []


async def test_bury_across_filesystems_leaves_no_partial_copy(
    tmp_path: Path, quiet_logs: io.StringIO
) -> None:
    fs = tmp_path / "fs"
    with tmpfs(fs):
        dead = MaildirQueue(fs / "dead")
        dead.ensure()
        q = MaildirQueue(tmp_path / "q", undeliverable=dead.path)
        await q.push(message(1, 60_000))
        fill(fs, leave=2 * PAGE)
        await Worker(q, no_route, burst=True).serve()
        assert files(dead.dir("new")) == [] and files(dead.dir("tmp")) == []


async def test_tmpfs_helper_really_fills(tmp_path: Path) -> None:
    # The checks above mean something only if the filesystem is really full.
    with tmpfs(tmp_path / "fs") as fs:
        fill(fs)
        with pytest.raises(OSError) as info:
            (fs / "x").write_bytes(b"y" * PAGE)
        assert info.value.errno == errno.ENOSPC
        await asyncio.sleep(0)
