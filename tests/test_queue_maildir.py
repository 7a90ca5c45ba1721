"""MaildirQueue: durable push (R1, R4, R7), real maildir, claim/ack/retry/bury, recovery."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import mailbox
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.spy_os import SpyOS

import maildefer.queue.maildir.queue as maildir_module
import maildefer.queue.maildir.writer as writer_module
from maildefer.errors import ConfigError, QueueError
from maildefer.mail import MailRequest
from maildefer.queue.backend import QueueOptions
from maildefer.queue.envelope import unwrap
from maildefer.queue.keys import escape_host
from maildefer.queue.maildir import MaildirQueue
from maildefer.queue.maildir.names import MaildirName

FSYNC = QueueOptions(sync="fsync")
SYNCFS = QueueOptions(sync="syncfs")
needs_syncfs = pytest.mark.skipif(
    not writer_module.syncfs_available(), reason="syncfs(2) with error reporting needs Linux >= 5.8"
)

MSG = b"From: a@x.org\r\nTo: b@y.org\r\nSubject: test\r\n\r\nbody\r\n"
KEY_RE = re.compile(r"^(\d+)\.M(\d{1,6})P(\d+)Q(\d+)R([0-9a-f]{16})\.(.+)$")


def files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> SpyOS:
    spy = SpyOS()
    monkeypatch.setattr(maildir_module, "os", spy)
    monkeypatch.setattr(writer_module, "os", spy)
    monkeypatch.setattr(writer_module, "sync_filesystem", spy.syncfs)
    return spy


# -- push: names, O_EXCL, durability order ----------------------------------------------


async def test_key_format_and_escaped_host(tmp_path: Path, spy: SpyOS) -> None:
    host = "mx/1:2,3~4\\5"
    q = MaildirQueue(tmp_path / "q", host=host)
    before = time.time()
    key = await q.push(MSG)
    match = KEY_RE.match(key)
    assert match, key
    sec, usec, pid, seq, _rand, hostpart = match.groups()
    assert before - 1 <= int(sec) <= time.time()
    assert 0 <= int(usec) < 1_000_000
    assert int(pid) == os.getpid()
    assert int(seq) >= 1
    assert hostpart == escape_host(host)
    assert not set("/:,") & set(key)
    assert files(q.dir("new")) == [key]
    # Created with O_EXCL|O_CREAT, never truncating anything that exists.
    flags = spy.flags[str(q.dir("tmp") / key)]
    assert flags & os.O_EXCL and flags & os.O_CREAT and not flags & os.O_TRUNC


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(FSYNC, id="fsync"),
        # In syncfs mode a lone push (a batch of one file) is flushed by its own fsync.
        pytest.param(SYNCFS, id="syncfs-lone-push", marks=needs_syncfs),
    ],
)
async def test_push_syscall_order(tmp_path: Path, spy: SpyOS, options: QueueOptions) -> None:
    q = MaildirQueue(tmp_path / "q", options=options)
    key = await q.push(MSG)
    spy.events.append(("returned", key))
    tmp, new, newdir = str(q.dir("tmp") / key), str(q.dir("new") / key), str(q.dir("new"))
    ours = [e for e in spy.events if e[1] in (tmp, new, newdir, key)]
    order = [
        ("open", tmp),
        ("write", tmp),
        ("fsync-start", tmp),
        ("fsync", tmp),
        ("link", new),
        ("fsync-start", newdir),
        ("fsync", newdir),
        ("returned", key),
    ]
    positions = [ours.index(e) for e in order]
    assert positions == sorted(positions), ours
    assert not [e for e in spy.events if e[0].startswith("syncfs")]  # one file: no syncfs
    assert ours.index(("unlink", tmp)) < ours.index(("returned", key))
    assert files(q.dir("tmp")) == []


def hold_first_flush(spy: SpyOS, tmpdir: str, n: int) -> Callable[[str], None]:
    """A fault that holds the first flush of a tmp/ file until ``n`` files are written.

    The first push is then flushed alone while the other ``n - 1`` are written: they
    form one batch, which syncfs mode flushes with one ``syncfs``.
    """

    def gate(path: str) -> None:
        if path.startswith(tmpdir):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                written = [e for e in spy.events if e[0] == "write" and e[1].startswith(tmpdir)]
                if len(written) >= n:
                    return
                time.sleep(0.001)

    return gate


async def test_sync_auto_is_syncfs_where_it_reports_errors(tmp_path: Path) -> None:
    auto = MaildirQueue(tmp_path / "a")
    shared = MaildirQueue(tmp_path / "b", options=QueueOptions(shared_fs=True))
    expected = "syncfs" if writer_module.syncfs_available() else "fsync"
    assert auto._writer.sync == expected
    assert shared._writer.sync == "fsync"  # NFS: the per-file fsync is what it honours


async def test_syncfs_asked_for_on_an_old_kernel_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.uname()
    fake = os.uname_result((real.sysname, real.nodename, "5.4.0-42", real.version, real.machine))
    monkeypatch.setattr(os, "uname", lambda: fake)
    assert not writer_module.syncfs_available()
    with pytest.raises(ConfigError, match=re.escape("sync = 'syncfs' needs Linux 5.8")):
        MaildirQueue(tmp_path / "q", options=SYNCFS)
    assert MaildirQueue(tmp_path / "q")._writer.sync == "fsync"  # auto falls back


async def test_o_excl_never_overwrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    q = MaildirQueue(tmp_path / "q")
    q.ensure()
    (q.dir("tmp") / "taken-tmp").write_bytes(b"someone else's tmp file")
    (q.dir("new") / "taken-new").write_bytes(b"someone else's message")
    names = iter(["taken-tmp", "taken-new", "free"])
    monkeypatch.setattr(q._names, "next_key", lambda: next(names))
    assert await q.push(MSG) == "free"
    assert (q.dir("tmp") / "taken-tmp").read_bytes() == b"someone else's tmp file"
    assert (q.dir("new") / "taken-new").read_bytes() == b"someone else's message"
    assert files(q.dir("tmp")) == ["taken-tmp"]
    assert unwrap((q.dir("new") / "free").read_bytes())[1] == MSG


async def test_group_commit(tmp_path: Path, spy: SpyOS) -> None:
    q = MaildirQueue(tmp_path / "q", options=FSYNC)
    q.ensure()
    newdir = str(q.dir("new"))

    def slow_dir_fsync(path: str) -> None:
        if path == newdir:
            time.sleep(0.02)  # a slow disk: lets links pile up behind one fsync

    spy.faults["fsync"] = slow_dir_fsync  # type: ignore[assignment]

    async def one(i: int) -> None:
        key = await q.push(MSG + str(i).encode())
        spy.events.append(("returned", key))

    n = 30
    await asyncio.gather(*(one(i) for i in range(n)))
    events = spy.events
    dir_syncs = [i for i, e in enumerate(events) if e == ("fsync-start", newdir)]
    assert 0 < len(dir_syncs) < n, len(dir_syncs)
    ends = [i for i, e in enumerate(events) if e == ("fsync", newdir)]
    spans = list(zip(dir_syncs, ends, strict=True))
    returned = {e[1]: i for i, e in enumerate(events) if e[0] == "returned"}
    assert len(returned) == n
    for key, ret in returned.items():
        link = events.index(("link", str(q.dir("new") / key)))
        assert any(link < start and end < ret for start, end in spans), key


@needs_syncfs
async def test_group_commit_syncfs(tmp_path: Path, spy: SpyOS) -> None:
    q = MaildirQueue(tmp_path / "q", options=SYNCFS)
    q.ensure()
    tmpdir, newdir = str(q.dir("tmp")), str(q.dir("new"))
    n = 12
    gate = hold_first_flush(spy, tmpdir, n)
    spy.faults["fsync"] = gate  # type: ignore[assignment]
    spy.faults["syncfs"] = gate  # type: ignore[assignment]

    async def one(i: int) -> None:
        key = await q.push(MSG + str(i).encode())
        spy.events.append(("returned", key))

    await asyncio.gather(*(one(i) for i in range(n)))
    events = spy.events

    def spans(op: str, path: str) -> list[tuple[int, int]]:
        starts = [i for i, e in enumerate(events) if e == (f"{op}-start", path)]
        ends = [i for i, e in enumerate(events) if e == (op, path)]
        return list(zip(starts, ends, strict=True))

    syncs, dir_syncs = spans("syncfs", tmpdir), spans("fsync", newdir)
    assert 0 < len(syncs) < n - 1, len(syncs)  # one syncfs covered several files
    returned = {e[1]: i for i, e in enumerate(events) if e[0] == "returned"}
    assert len(returned) == n
    for key, ret in returned.items():
        tmp = f"{tmpdir}/{key}"
        wrote = events.index(("write", tmp))
        link = events.index(("link", f"{newdir}/{key}"))
        # Its data flushed (a syncfs begun after its write, or its own fsync) before its
        # name is in new/; its name flushed (the next batch's syncfs, or a new/ fsync)
        # before it returns.
        flushes = syncs + spans("fsync", tmp)
        assert any(wrote < start and end < link for start, end in flushes), key
        assert any(link < start and end < ret for start, end in syncs + dir_syncs), key


@needs_syncfs
async def test_syncfs_failure_fails_the_batch_and_leaves_nothing(
    tmp_path: Path, spy: SpyOS
) -> None:
    q = MaildirQueue(tmp_path / "q", options=SYNCFS)
    q.ensure()
    tmpdir = str(q.dir("tmp"))
    gate = hold_first_flush(spy, tmpdir, 5)

    def fail(path: str) -> OSError | None:
        gate(path)
        return OSError(errno.EIO, "Input/output error") if path.startswith(tmpdir) else None

    spy.faults["syncfs"] = fail
    spy.faults["fsync"] = fail  # the first push is flushed alone, by its own fsync
    results = await asyncio.gather(*(q.push(MSG) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, QueueError) for r in results), results
    assert all("Input/output error" in str(r) for r in results)
    assert ("syncfs-start", tmpdir) in spy.events  # the other four, as one batch
    assert files(q.dir("new")) == [] and files(q.dir("tmp")) == []
    del spy.faults["syncfs"], spy.faults["fsync"]
    assert await q.push(MSG)  # and the queue works again


# -- push failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "err"),
    [("write", errno.ENOSPC), ("write", errno.EIO), ("fsync", errno.ENOSPC), ("fsync", errno.EIO)],
)
async def test_write_errors_raise_queue_error_and_leave_nothing(
    tmp_path: Path, spy: SpyOS, op: str, err: int
) -> None:
    q = MaildirQueue(tmp_path / "q", options=FSYNC if op == "fsync" else None)
    q.ensure()
    tmpdir = str(q.dir("tmp"))

    def fail(path: str) -> OSError | None:
        return OSError(err, os.strerror(err)) if path.startswith(tmpdir) else None

    spy.faults[op] = fail
    with pytest.raises(QueueError, match=re.escape(os.strerror(err))) as info:
        await q.push(MSG)
    assert str(q.path) in str(info.value) and "push failed" in str(info.value)
    assert files(q.dir("new")) == [] and files(q.dir("tmp")) == []
    del spy.faults[op]
    assert await q.push(MSG)  # and the queue works again


async def test_dir_fsync_failure_removes_the_new_entry(tmp_path: Path, spy: SpyOS) -> None:
    q = MaildirQueue(tmp_path / "q")
    q.ensure()
    newdir = str(q.dir("new"))
    spy.faults["fsync"] = lambda p: (
        OSError(errno.EIO, "Input/output error") if p == newdir else None
    )
    with pytest.raises(QueueError, match="Input/output error"):
        await q.push(MSG)
    assert files(q.dir("new")) == [] and files(q.dir("tmp")) == []


@pytest.fixture
def small_fs(tmp_path: Path) -> Path:
    mnt = tmp_path / "fs"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs: {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_real_full_filesystem(small_fs: Path) -> None:
    q = MaildirQueue(small_fs / "q")
    big = b"Subject: big\r\n\r\n" + b"x" * 600_000
    first = await q.push(big)
    with pytest.raises(QueueError, match="No space left on device"):
        await q.push(big)
    assert files(q.dir("tmp")) == []
    assert files(q.dir("new")) == [first]
    assert await q.remove(first)
    second = await q.push(big)
    assert unwrap((q.dir("new") / second).read_bytes())[1] == big


# -- cancellation (R7) ------------------------------------------------------------------


async def _settle(q: MaildirQueue) -> None:
    await q.close()  # waits for the push threads to finish what they started


def _assert_none_or_one_whole(q: MaildirQueue, raw: bytes) -> None:
    assert files(q.dir("tmp")) == []
    new = files(q.dir("new"))
    assert len(new) <= 1
    for name in new:
        assert unwrap((q.dir("new") / name).read_bytes())[1] == raw


@pytest.mark.parametrize("iterations", [0, 1, 2, 3, 5, 8])
async def test_cancel_push_after_n_loop_iterations(tmp_path: Path, iterations: int) -> None:
    q = MaildirQueue(tmp_path / "q")
    q.ensure()
    task = asyncio.create_task(q.push(MSG))
    for _ in range(iterations):
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await _settle(q)
    _assert_none_or_one_whole(q, MSG)


@pytest.mark.parametrize("hold", ["file", "dir", "syncfs-file", "syncfs-dir"])
async def test_cancel_push_while_the_thread_runs(tmp_path: Path, spy: SpyOS, hold: str) -> None:
    if hold.startswith("syncfs") and not writer_module.syncfs_available():
        pytest.skip("syncfs(2) with error reporting needs Linux >= 5.8")
    q = MaildirQueue(tmp_path / "q", options=SYNCFS if hold.startswith("syncfs") else FSYNC)
    q.ensure()
    entered, release = threading.Event(), threading.Event()
    target = str(q.dir("new")) if hold.endswith("dir") else str(q.dir("tmp"))

    def gate(path: str) -> None:
        if path.startswith(target) and (not hold.endswith("dir") or path == target):
            entered.set()
            release.wait(10)

    spy.faults["fsync"] = gate  # type: ignore[assignment]
    task = asyncio.create_task(q.push(MSG))
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _settle(q)
    _assert_none_or_one_whole(q, MSG)
    assert len(files(q.dir("new"))) == 1  # the thread had begun: it finished the message


# -- a real maildir ---------------------------------------------------------------------


async def test_stdlib_mailbox_reads_pushed_messages(tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q")
    keys = [await q.push(MSG.replace(b"test", f"n{i}".encode())) for i in range(3)]
    box = mailbox.Maildir(str(q.path), create=False)
    assert sorted(box.keys()) == sorted(keys)
    for i, key in enumerate(keys):
        assert box[key]["Subject"] == f"n{i}"
        assert box.get_bytes(key).endswith(MSG.replace(b"test", f"n{i}".encode()))


async def test_dropped_in_files_are_claimed_with_header_envelope(tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q")
    q.ensure()
    raw = b"From: Ann <ann@x.org>\nTo: bob@y.org\nCc: cat@z.org\nBcc: dan@w.org\n\nhi\n"
    for name in ("1700000000.foo.swp", "message~", "plain"):
        (q.dir("new") / name).write_bytes(raw)
    (q.dir("new") / ".hidden").write_bytes(raw)
    scanned = sorted(n for batch in q.scan_new() for n in batch)
    assert scanned == ["1700000000.foo.swp", "message~", "plain"]
    assert await q.count() == 3
    for name in scanned:
        claim = q.claim_sync(name)
        assert claim is not None and claim.key == name
        assert claim.message.mail_from == "ann@x.org"
        assert claim.message.rcpt_tos == ["bob@y.org", "cat@z.org"]
        assert claim.message.raw == raw
        q.ack_sync(claim)
    assert files(q.dir("new")) == [".hidden"]


# -- claim, ack, retry, bury, requeue ----------------------------------------------------


async def test_exactly_one_of_two_claimers_wins(tmp_path: Path) -> None:
    a = MaildirQueue(tmp_path / "q")
    b = MaildirQueue(tmp_path / "q")
    for _ in range(50):
        key = await a.push(MSG)
        results = [a.claim_sync(key), b.claim_sync(key)]
        assert sum(r is not None for r in results) == 1
    assert len(files(a.dir("cur"))) == 50


async def test_ack_deletes(tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q")
    key = await q.push(MSG)
    claim = await q.claim(key)
    assert claim is not None and files(q.dir("cur")) and not files(q.dir("new"))
    await q.ack(claim)
    assert await q.count() == 0 and files(q.dir("cur")) == []


async def test_retry_backoff_survives_restart(tmp_path: Path) -> None:
    opts = QueueOptions(max_attempts=10, retry_delay=10.0, retry_max_delay=50.0)
    q = MaildirQueue(tmp_path / "q", options=opts)
    key = await q.push(MSG)
    for attempt in range(1, 6):
        claim = q.claim_sync(MaildirName.parse(files(q.dir("new"))[0]).filename)
        assert claim is not None and claim.attempts == attempt - 1
        before = time.time()
        assert await q.retry(claim, f"boom {attempt}") is True
        assert files(q.dir("new")) == []
        [later] = files(q.dir("later"))
        name = MaildirName.parse(later)
        assert name.key == key and name.attempts == attempt
        delay = name.due_ms / 1000 - before
        base = 10.0 * 2 ** (attempt - 1)
        assert min(50.0, base * 0.8) - 0.05 <= delay <= min(50.0, base * 1.2) + 0.5, delay
        record = q.error_record(key)
        assert record is not None and record["error"] == f"boom {attempt}"
        # A fresh instance (a restart) sees the same state.
        q = MaildirQueue(tmp_path / "q", options=opts)
        assert q.promote_due(now=name.due_ms / 1000 - 0.01)[0] == 0
        assert files(q.dir("new")) == []
        assert q.promote_due(now=name.due_ms / 1000)[0] == 1
    assert MaildirName.parse(files(q.dir("new"))[0]).attempts == 5


async def test_jitter_spreads_delays(tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q", options=QueueOptions(retry_delay=100.0))
    delays = set()
    for _ in range(20):
        claim = q.claim_sync(await q.push(MSG))
        assert claim is not None
        t = time.time()
        await q.retry(claim, "x")
        delays.add(round(MaildirName.parse(files(q.dir("later"))[-1]).due_ms / 1000 - t, 1))
        await q.clear()
    assert len(delays) > 5 and all(79 <= d <= 121 for d in delays)


async def test_max_attempts_buries_and_requeue_restores(tmp_path: Path) -> None:
    opts = QueueOptions(max_attempts=3, retry_delay=0.0)
    q = MaildirQueue(tmp_path / "q", options=opts, undeliverable=tmp_path / "dead")
    dead = MaildirQueue(tmp_path / "dead")
    key = await q.push(MailRequest(MSG, mail_from="s@x", rcpt_tos=["bcc@y"]))
    original = (q.dir("new") / key).read_bytes()
    results = []
    for _ in range(3):
        [name] = files(q.dir("new"))
        claim = q.claim_sync(name)
        assert claim is not None
        results.append(await q.retry(claim, "handler raised ValueError"))
    assert results == [True, True, False]
    assert await q.count() == 0
    [buried] = files(dead.dir("new"))
    assert MaildirName.parse(buried).key == key
    record = json.loads((dead.dir("errors") / f"{key}.json").read_bytes())
    assert record["queue"] == str(q.path)
    assert record["reason"] == "failed"
    assert record["attempts"] == 3
    assert record["error"] == "handler raised ValueError"
    assert not (q.dir("errors") / f"{key}.json").exists()
    assert await dead.requeue() == 1
    assert files(dead.dir("new")) == [] and not (dead.dir("errors") / f"{key}.json").exists()
    assert files(q.dir("new")) == [key]  # attempts reset: no ,A= field
    assert (q.dir("new") / key).read_bytes() == original
    claim = q.claim_sync(key)
    assert claim is not None and claim.attempts == 0 and claim.message.rcpt_tos == ["bcc@y"]


async def test_release_counts_no_attempt(tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q")
    key = await q.push(MSG)
    claim = q.claim_sync(key)
    assert claim is not None
    await q.release(claim)
    assert files(q.dir("new")) == [key]


# -- recovery (R10, R11, R5) ------------------------------------------------------------

CLAIM_AND_EXIT = """
import sys, os, signal
from maildefer.queue.maildir import MaildirQueue
q = MaildirQueue(sys.argv[1])
assert q.claim_sync(sys.argv[2]) is not None
print("claimed", flush=True)
if sys.argv[3] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _claim_in_child(q: MaildirQueue, key: str, how: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CLAIM_AND_EXIT, str(q.path), key, how],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert b"claimed" in proc.stdout, proc.stderr


@pytest.mark.parametrize("how", ["exit", "kill"])
async def test_dead_owner_claim_returns_to_new(tmp_path: Path, how: str) -> None:
    q = MaildirQueue(tmp_path / "q")
    key = await q.push(MSG)
    _claim_in_child(q, key, how)
    assert files(q.dir("new")) == [] and len(files(q.dir("cur"))) == 1
    report = await q.recover()
    assert report.returned == 1
    [back] = files(q.dir("new"))
    name = MaildirName.parse(back)
    assert (name.key, name.attempts, name.recoveries, name.field("W")) == (key, 1, 1, None)


async def test_live_owner_claim_is_left_alone(tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q")
    key = await q.push(MSG)
    assert q.claim_sync(key) is not None
    report = MaildirQueue(tmp_path / "q").recover_sync()
    assert report.returned == 0 and files(q.dir("new")) == [] and len(files(q.dir("cur"))) == 1


async def test_other_hosts_claims_use_the_lease(tmp_path: Path) -> None:
    other = MaildirQueue(tmp_path / "q", host="elsewhere", options=QueueOptions(lease=600))
    mine = MaildirQueue(tmp_path / "q", host=socket.gethostname(), options=QueueOptions(lease=600))
    old, fresh = await other.push(MSG), await other.push(MSG)
    assert other.claim_sync(old) and other.claim_sync(fresh)
    stale = next(f for f in files(other.dir("cur")) if f.startswith(old))
    t = time.time() - 601
    os.utime(other.dir("cur") / stale, (t, t))
    report = mine.recover_sync()
    assert report.returned == 1
    assert [MaildirName.parse(f).key for f in files(mine.dir("new"))] == [old]
    assert [MaildirName.parse(f).key for f in files(mine.dir("cur"))] == [fresh]


async def test_poison_message_is_quarantined(tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q", undeliverable=tmp_path / "dead")
    key = await q.push(MSG)
    for round_ in range(1, 4):
        [name] = files(q.dir("new"))
        _claim_in_child(q, name, "kill")
        report = q.recover_sync()
        if round_ < 3:
            assert report.returned == 1 and report.quarantined == 0
        else:
            assert report.quarantined == 1 and report.returned == 0
    assert await q.count() == 0
    dead = MaildirQueue(tmp_path / "dead")
    [buried] = files(dead.dir("new"))
    assert MaildirName.parse(buried).key == key
    record = dead.error_record(key)
    assert record is not None and record["reason"] == "poison"
    assert unwrap((dead.dir("new") / buried).read_bytes())[1] == MSG


async def test_tmp_debris_older_than_36h_is_removed(tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q")
    q.ensure()
    now = time.time()
    for name, hours in (("h35", 35), ("h37", 37), ("fresh", 0)):
        path = q.dir("tmp") / name
        path.write_bytes(b"partial")
        os.utime(path, (now - hours * 3600, now - hours * 3600))
    report = q.recover_sync(now=now)
    assert report.tmp_removed == 1
    assert files(q.dir("tmp")) == ["fresh", "h35"]


def test_tmp_files_of_a_dead_writer_on_this_host_go_at_once(tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q", host="mx.example")
    q.ensure()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names nobody now
    names = {
        "dead": f"1700000000.M1P{child.pid}Q1R00ff.mx.example",
        "alive": f"1700000000.M1P{os.getpid()}Q2R00ff.mx.example",
        "elsewhere": f"1700000000.M1P{child.pid}Q3R00ff.other.example",
    }
    for name in names.values():
        (q.dir("tmp") / name).write_bytes(b"partial")
    assert q.recover_sync().tmp_removed == 1
    assert files(q.dir("tmp")) == sorted([names["alive"], names["elsewhere"]])


# -- O(1): no directory listing per message ----------------------------------------------


async def test_push_claim_ack_never_list_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = MaildirQueue(tmp_path / "q")
    q.ensure()
    for i in range(1000):
        (q.dir("new") / f"pre{i}").write_bytes(MSG)
    calls: list[str] = []
    real_scandir, real_listdir = os.scandir, os.listdir

    def scandir(path: object = ".") -> object:
        calls.append("scandir")
        return real_scandir(path)  # type: ignore[arg-type]

    def listdir(path: object = ".") -> list[str]:
        calls.append("listdir")
        return real_listdir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)
    for _ in range(100):
        key = await q.push(MSG)
        claim = await q.claim(key)
        assert claim is not None
        await q.ack(claim)
    assert calls == []
    monkeypatch.undo()
    assert len(files(q.dir("new"))) == 1000
