"""Pushing from any code: ``Queue.push_sync``, cheap leak-free ``Queue`` objects, ``close()``.

Real maildirs under ``tmp_path``, a real full tmpfs for ENOSPC, the real RabbitMQ on
127.0.0.1:5672 for the amqp cases (skipped without one), and the README's generic-work
example run end to end through a real in-process ``Worker``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import sys
import threading
import time
import uuid
from email.message import EmailMessage
from pathlib import Path

import pytest
from helpers.broker import needs_broker
from helpers.spy_os import SpyOS
from test_disk_faults import fill, tmpfs

import maildefer.queue.maildir.writer as writer_module
from maildefer import MailRequest
from maildefer.errors import QueueError
from maildefer.queue import Queue
from maildefer.queue.amqp import AmqpQueue
from maildefer.queue.config import QueueRegistry
from maildefer.queue.envelope import unwrap
from maildefer.queue.maildir import MaildirQueue
from maildefer.routing import Router
from maildefer.worker import Worker

N = 300
README = Path(__file__).resolve().parent.parent / "README.md"


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def message(i: int) -> bytes:
    return f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode()


def subjects(queue: Path) -> set[str]:
    """The subjects of the whole, well-formed messages in ``new/``."""
    found = set()
    for name in os.listdir(queue / "new"):
        envelope, raw = unwrap((queue / "new" / name).read_bytes())
        assert envelope is not None, name
        found.add(raw.split(b"\r\n", 1)[0].decode())
    return found


def settled(start: int, within: float = 5.0) -> int:
    """The thread count once it is back to ``start`` (or at the deadline)."""
    deadline = time.monotonic() + within
    while threading.active_count() > start and time.monotonic() < deadline:
        time.sleep(0.01)
    return threading.active_count()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A queue directory whose name no other test's writer threads carry."""
    return tmp_path / f"q{uuid.uuid4().hex[:10]}"


def writer_threads(queue: Path) -> list[threading.Thread]:
    mine = f"maildefer-writer:{queue.name}:"
    return [t for t in threading.enumerate() if t.name.startswith(mine)]


class Peak:
    """The most threads and open fds seen at the samples taken."""

    def __init__(self) -> None:
        self.threads, self.fds = threading.active_count(), fds()
        self.start_threads, self.start_fds = self.threads, self.fds

    def sample(self) -> None:
        self.threads = max(self.threads, threading.active_count())
        self.fds = max(self.fds, fds())


# -- a new Queue per push: everything stored, nothing piles up ------------------------------


def test_new_queue_per_push_sync_from_sync_code(path: Path) -> None:
    peak = Peak()
    for i in range(N):
        Queue(path).push_sync(message(i))
        peak.sample()
    assert subjects(path) == {f"Subject: m{i}" for i in range(N)}
    assert peak.threads <= peak.start_threads + 1, peak.threads  # push_sync starts none
    assert peak.fds <= peak.start_fds + 2, peak.fds
    assert os.listdir(path / "tmp") == []


def test_new_queue_per_push_sync_from_four_threads(path: Path) -> None:
    peak = Peak()
    errors: list[BaseException] = []

    def pusher(t: int) -> None:
        try:
            for i in range(t, N, 4):
                Queue(path).push_sync(message(i))
                peak.sample()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pusher, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert subjects(path) == {f"Subject: m{i}" for i in range(N)}
    assert peak.threads <= peak.start_threads + 4 + 1, peak.threads  # the 4 pushers
    assert peak.fds <= peak.start_fds + 8, peak.fds
    assert settled(peak.start_threads) == peak.start_threads


async def test_new_queue_per_push_from_one_event_loop(path: Path) -> None:
    peak = Peak()
    for i in range(N):
        await Queue(path).push(message(i))
        peak.sample()
    assert subjects(path) == {f"Subject: m{i}" for i in range(N)}
    # Each dropped Queue ends its writer thread at once (a thread lingering for its idle
    # second would make this a few hundred).
    assert peak.threads <= peak.start_threads + 3, peak.threads
    assert peak.fds <= peak.start_fds + 6, peak.fds
    assert await asyncio.to_thread(settled, peak.start_threads + 1) <= peak.start_threads + 1
    assert writer_threads(path) == []


# -- close(), async with, with --------------------------------------------------------------


async def test_async_with_releases_at_once(path: Path) -> None:
    start_fds = fds()
    async with Queue(path) as q:
        keys = await asyncio.gather(*(q.push(message(i)) for i in range(40)))
        assert writer_threads(path)  # idle writer threads wait for more pushes
    assert writer_threads(path) == []  # at once: no idle wait
    assert fds() == start_fds
    assert set(os.listdir(path / "new")) == set(keys)


def test_with_releases_at_once_without_a_loop(path: Path) -> None:

    async def push_some(q: Queue) -> list[str]:
        return await asyncio.gather(*(q.push(message(i)) for i in range(20)))

    with Queue(path) as q:
        keys = asyncio.run(push_some(q))  # leaves idle writer threads behind it
        keys.append(q.push_sync(message(99)))
        assert writer_threads(path)
    assert writer_threads(path) == []
    assert set(os.listdir(path / "new")) == set(keys)
    assert len(keys) == 21


async def test_close_then_push_again(path: Path) -> None:
    q = Queue(path)
    await q.push(message(1))
    await q.close()
    assert writer_threads(path) == []
    key = await q.push(message(2))  # a closed Queue opens what it needs again
    await q.close()
    assert (path / "new" / key).exists()


async def test_a_registry_queue_leaves_the_shared_backend_open(path: Path) -> None:
    registry = QueueRegistry()
    with registry.active():
        async with Queue(path) as q:
            await asyncio.gather(*(q.push(message(i)) for i in range(10)))
        assert writer_threads(path)  # a handler's `async with` closed nothing shared
        assert Queue(path).backend is q.backend
        await Queue(path).push(message(10))
    await registry.close()  # the owner closes it
    assert writer_threads(path) == []
    assert len(os.listdir(path / "new")) == 11


# -- push_sync: what it accepts, where it refuses, how it fails ------------------------------


def test_push_sync_accepts_what_push_accepts(tmp_path: Path) -> None:
    q = Queue(tmp_path / "posts")
    request = MailRequest(
        b"Subject: req\r\n\r\nx\r\n",
        mail_from="ann@example.org",
        rcpt_tos=["a@example.com", "bcc@example.com"],
        peer="192.0.2.1:25",
    )
    email = EmailMessage()
    email["From"], email["To"], email["Subject"] = "bob@example.org", "c@example.com", "em"
    email.set_content("hello")
    keys = [q.push_sync(request), q.push_sync(email), q.push_sync(b"Subject: raw\r\n\r\n")]
    got = [asyncio.run(q.get(key)) for key in keys]
    assert [m["Subject"] if m else None for m in got] == ["req", "em", "raw"]
    assert got[0] is not None and got[0].mail_from == "ann@example.org"
    assert got[0].rcpt_tos == ["a@example.com", "bcc@example.com"]  # the Bcc survives
    assert got[0].raw == request.raw
    assert got[1] is not None and got[1].mail_from == "bob@example.org"


async def test_push_sync_on_the_loop_thread_says_to_await_push(tmp_path: Path) -> None:
    q = Queue(tmp_path / "posts")
    with pytest.raises(RuntimeError, match=re.escape("use `await queue.push(message)`")):
        q.push_sync(message(1))
    amqp = Queue("amqp://guest:guest@127.0.0.1:1/?queue=never")
    with pytest.raises(RuntimeError, match="running event loop"):
        amqp.push_sync(message(1))  # refused before any connection is tried
    new = tmp_path / "posts" / "new"
    assert not new.exists() or os.listdir(new) == []  # refused before anything was written
    # From another thread of the same program it is fine.
    key = await asyncio.to_thread(q.push_sync, message(2))
    assert os.listdir(tmp_path / "posts" / "new") == [key]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_push_sync_on_a_full_disk_raises_and_leaves_no_debris(project: Path) -> None:
    queue = project / "run" / "posts"
    with tmpfs(queue):
        q = Queue(queue)
        q.push_sync(message(0))  # the directories exist, one message is in
        filler = fill(queue)
        big = b"Subject: big\r\n\r\n" + b"x" * 100_000 + b"\r\n"
        with pytest.raises(QueueError, match="No space left on device"):
            q.push_sync(big)
        assert os.listdir(queue / "tmp") == []
        assert len(os.listdir(queue / "new")) == 1
        filler.unlink()  # space again: the same Queue object pushes
        key = q.push_sync(big)
        assert unwrap((queue / "new" / key).read_bytes())[1] == big


def test_push_sync_dir_fsync_failure_takes_the_entry_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SpyOS()
    monkeypatch.setattr(writer_module, "os", spy)
    q = Queue(tmp_path / "posts")
    newdir = str(tmp_path / "posts" / "new")

    def eio(path: str) -> BaseException | None:
        return OSError(errno.EIO, os.strerror(errno.EIO)) if path == newdir else None

    spy.faults["fsync"] = eio
    with pytest.raises(QueueError, match="Input/output error"):
        q.push_sync(message(1))
    assert [e for e in spy.events if e[0] == "link"]  # it was linked, then taken back
    assert os.listdir(newdir) == [] and os.listdir(tmp_path / "posts" / "tmp") == []
    del spy.faults["fsync"]
    key = q.push_sync(message(2))
    assert os.listdir(newdir) == [key]


# -- the README's generic work, end to end ---------------------------------------------------


def readme_blocks() -> dict[str, str]:
    """The python blocks of the README's "Pushing from any code", by their first line."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Pushing from any code\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return {block.splitlines()[0]: block for block in blocks}


async def test_readme_generic_work_runs(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = readme_blocks()
    handler = blocks["# app/handlers/jobs.py: the worker's handlers for run/jobs"]
    pusher = blocks["# anywhere: a view, a script, a cron job"]
    (project / "app" / "handlers").mkdir(parents=True)
    for init in ("app/__init__.py", "app/handlers/__init__.py"):
        (project / init).write_text("")
    (project / "app" / "handlers" / "jobs.py").write_text(handler)
    monkeypatch.syspath_prepend(str(project))
    for name in [m for m in sys.modules if m == "app" or m.startswith("app.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        await asyncio.to_thread(exec, pusher, {})  # synchronous code, as in a view
        router = Router.from_modules(["app.handlers.jobs"])
        q = MaildirQueue(project / "run" / "jobs")
        stats = await Worker(q, router.deliver, burst=True).serve()
    finally:
        # This project's `app` package must not outlive the test: a later test importing
        # the repository's app.handlers.posting would find it in sys.modules first.
        for name in [m for m in sys.modules if m == "app" or m.startswith("app.")]:
            del sys.modules[name]
    assert stats.handled == 1
    assert "resizing uploads/cat.png to 640 px" in capsys.readouterr().out
    assert await q.count() == 0


# -- amqp ------------------------------------------------------------------------------------


def sync_threads(url: str) -> list[threading.Thread]:
    """push_sync's private-loop threads of the queue ``url`` names."""
    mine = f"maildefer-amqp-sync:{url.rsplit('=', 1)[1]}"
    return [t for t in threading.enumerate() if t.name == mine]


@needs_broker
def test_amqp_push_sync_is_confirmed_and_poppable(amqp_url: str) -> None:
    request = MailRequest(
        b"Subject: via broker\r\n\r\nx\r\n", mail_from="ann@example.org", rcpt_tos=["a@x.org"]
    )
    with Queue(amqp_url) as q:
        key = q.push_sync(request)
        assert isinstance(q.backend, AmqpQueue)
        assert sync_threads(amqp_url)  # its private loop, kept for the next push
    assert sync_threads(amqp_url) == []  # `with` closed it at once

    async def pop_it() -> tuple[int, tuple[str, MailRequest] | None]:
        async with Queue(amqp_url) as q:
            return await q.count(), await q.pop()

    count, popped = asyncio.run(pop_it())
    assert count == 1 and popped is not None
    assert popped[0] == key
    assert popped[1]["Subject"] == "via broker" and popped[1].mail_from == "ann@example.org"


@needs_broker
def test_amqp_push_sync_from_threads_then_idle_end(amqp_url: str) -> None:
    q = Queue(amqp_url)
    keys: list[str] = []
    errors: list[BaseException] = []

    def pusher(t: int) -> None:
        try:
            for i in range(5):
                keys.append(q.push_sync(message(t * 10 + i)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pusher, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(set(keys)) == 20
    assert len(sync_threads(amqp_url)) == 1  # one private loop for every calling thread
    deadline = time.monotonic() + 10  # idle for a second: the thread and connection end
    while sync_threads(amqp_url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sync_threads(amqp_url) == []
    assert q.push_sync(message(99))  # and come back for the next push

    async def count_and_close() -> int:
        n = await q.backend.count()
        await q.close()  # the async link and push_sync's both
        return n

    assert asyncio.run(count_and_close()) == 21
    assert sync_threads(amqp_url) == []


def test_amqp_push_sync_without_a_broker_is_a_queue_error() -> None:
    url = "amqp://guest:guest@127.0.0.1:1/?queue=none"
    q = AmqpQueue(url, connect_timeout=1)
    started = time.monotonic()
    with pytest.raises(QueueError, match="cannot connect to the broker"):
        q.push_sync(message(1))
    assert time.monotonic() - started < 10  # bounded by the connect timeout
    q.close_sync()
    assert sync_threads(url) == []
