"""Handler modules' ``lifespan`` hooks in ``serve`` and ``worker`` processes.

The processes run ``tests/worker_apps/lifespan_app.py`` and ``lifespan_other.py``, which
write every event (startup, handler, shutdown) with its time and pid to one file; a
stand-in notify socket shows when ``READY=1`` came. In-process cases: test_lifespan.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.ops import Notify, wait_for

from maildefer.queue.envelope import Envelope, wrap
from maildefer.queue.maildir import MaildirQueue

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "worker_apps"
MSG = b"From: a@b.org\r\nTo: u@example.com\r\nSubject: one\r\n\r\nbody\r\n"


class Project:
    """A project dir: serve and the ``posts`` queue run the given handler modules."""

    def __init__(self, root: Path, modules: list[str], *, port: int = 0) -> None:
        self.root = root
        mods = json.dumps(modules)
        lines = [
            "[server]",
            f"port = {port}",
            'hostname = "mx.test"',
            f"handlers = {mods}",
            "grace_period = 10.0",
            "[queues.posts]",
            'path = "run/posts"',
            f"handlers = {mods}",
            "grace_period = 10.0",
            "rescan_interval = 1.0",
        ]
        (root / "config").mkdir(parents=True, exist_ok=True)
        (root / "config" / "settings.toml").write_text("\n".join(lines) + "\n")
        self.queue = MaildirQueue(root / "run" / "posts")
        self.queue.ensure()
        self.record = root / "lifespan.log"
        self._runs = 0

    def start(self, command: str, *args: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
        """``maildefer COMMAND`` in the project; its JSON log goes to a file of its own."""
        self._runs += 1
        log = self.root / f"{command}-{self._runs}.log"
        environ = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MAILDEFER_", "LIFESPAN_", "NOTIFY_", "WATCHDOG_", "LISTEN_"))
        }
        environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(APPS)])
        environ["MAILDEFER_LOGGING__FORMAT"] = "json"
        environ["LIFESPAN_LOG"] = str(self.record)
        environ.update(env)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "maildefer", command, *args],
                cwd=self.root,
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return proc, log

    def events(self, event: str | None = None) -> list[dict[str, str]]:
        """The lifespan apps' events, in the order they were written."""
        try:
            text = self.record.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            name, module, at, pid, detail = line.split("\t")
            row = {"event": name, "module": module, "at": at, "pid": pid, "detail": detail}
            if event is None or name == event:
                out.append(row)
        return out

    def drop(self, *subjects: str) -> list[str]:
        """Messages straight into new/ (as push leaves them); returns their file names."""
        envelope = Envelope("a@b.org", ["u@example.com"], "", time.time(), "u@example.com")
        names = []
        for n, subject in enumerate(subjects):
            name = f"{int(time.time())}.M{n}P{os.getpid()}Q{n}R{uuid.uuid4().hex[:6]}.test"
            raw = MSG.replace(b"Subject: one", f"Subject: {subject}".encode())
            (self.queue.dir("tmp") / name).write_bytes(wrap(raw, envelope))
            os.rename(self.queue.dir("tmp") / name, self.queue.dir("new") / name)
            names.append(name)
        return names


def log_lines(path: Path) -> list[dict[str, object]]:
    """Every line of a JSON log; a line that is not JSON (a traceback) fails the test."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines), "\n".join(lines)
    return [json.loads(line) for line in lines]


def received(notify: Notify) -> list[str]:
    """Every datagram the notify socket holds now (the daemon has exited)."""
    notify.sock.settimeout(0.2)
    out = []
    with contextlib.suppress(TimeoutError):
        while True:
            out.append(notify.sock.recv(4096).decode())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_serve_starts_lifespans_before_ready_and_stops_them_after_the_drain(
    tmp_path: Path, notify: Notify
) -> None:
    project = Project(tmp_path, ["lifespan_app"])
    proc, _ = project.start(
        "serve",
        NOTIFY_SOCKET=notify.path,
        LIFESPAN_STARTUP_SLEEP="0.3",  # READY=1 sent early would beat the startup line
        LIFESPAN_SLEEP="1.5",
    )
    with reaped(proc):
        ready = notify.wait("READY=1")
        ready_at = time.time()
        # At READY=1 the startup has finished (it took 0.3 s), and nothing was handled yet.
        (startup,) = project.events("startup")
        assert float(startup["at"]) < ready_at
        assert [e["event"] for e in project.events()] == ["startup-begin", "startup"]
        port = int(ready.rsplit("listening on port ", 1)[1].split()[0])

        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        with contextlib.closing(client):
            client.ehlo("c")
            client.mail("a@b.org")
            assert client.rcpt("u@example.com")[0] == 250
            client.putcmd("data")
            assert client.getreply()[0] == 354
            client.send(MSG + b".\r\n")
            wait_for(lambda: project.events("handler-start"), what="the handler to start")
            proc.send_signal(signal.SIGTERM)
            # The handler in flight finishes first: its client gets its 250.
            assert client.getreply()[0] == 250
        assert proc.wait(timeout=30) == 0

    events = project.events()
    assert [e["event"] for e in events] == [
        "startup-begin",
        "startup",
        "handler-start",
        "handled",
        "shutdown",
    ]
    token = startup["detail"]
    # The handler reached the very resource the startup opened, still open, in this pid.
    assert events[3]["detail"] == f"one {token} True"
    assert {e["pid"] for e in events} == {str(proc.pid)}
    assert events[4]["detail"] == token
    assert float(events[3]["at"]) <= float(events[4]["at"])


def test_worker_starts_lifespans_before_the_first_message_and_ready_then_drains(
    tmp_path: Path, notify: Notify
) -> None:
    project = Project(tmp_path, ["lifespan_app"])
    project.drop("first")  # already queued: the worker would take it at once
    proc, _ = project.start(
        "worker",
        "--queue",
        "posts",
        NOTIFY_SOCKET=notify.path,
        LIFESPAN_STARTUP_SLEEP="0.3",
        LIFESPAN_SLEEP="1.5",
    )
    with reaped(proc):
        notify.wait("READY=1")
        ready_at = time.time()
        (startup,) = project.events("startup")
        assert float(startup["at"]) < ready_at
        wait_for(lambda: project.events("handler-start"), what="the handler to start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    events = project.events()
    assert [e["event"] for e in events] == [
        "startup-begin",
        "startup",
        "handler-start",
        "handled",
        "shutdown",
    ]
    assert float(events[1]["at"]) <= float(events[2]["at"])  # before the first message
    assert events[3]["detail"] == f"first {startup['detail']} True"
    assert float(events[3]["at"]) <= float(events[4]["at"])  # after the last one
    # Handled to the end, so acked: not released back to new/ by the shutdown.
    assert list(project.queue.dir("new").iterdir()) == []
    assert list(project.queue.dir("cur").iterdir()) == []


def test_a_module_of_serve_and_of_a_worker_runs_its_lifespan_in_each_process(
    tmp_path: Path,
) -> None:
    project = Project(tmp_path, ["lifespan_app"])
    serve, serve_log = project.start("serve", LIFESPAN_PUSH="run/posts")
    worker, _ = project.start("worker", "--queue", "posts")
    with reaped(serve), reaped(worker):
        wait_for(
            lambda: any(e.get("event") == "listening" for e in log_lines(serve_log)),
            what="serve to listen",
        )
        port = next(int(str(e["port"])) for e in log_lines(serve_log) if e["event"] == "listening")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("a@b.org", ["u@example.com"], MSG)
        wait_for(lambda: len(project.events("handled")) == 2, what="serve and worker handlers")
        for proc in (serve, worker):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0

    by_pid: dict[str, list[dict[str, str]]] = {}
    for e in project.events():
        by_pid.setdefault(e["pid"], []).append(e)
    assert set(by_pid) == {str(serve.pid), str(worker.pid)}
    tokens = set()
    for events in by_pid.values():
        assert [e["event"] for e in events] == [
            "startup-begin",
            "startup",
            "handler-start",
            "handled",
            "shutdown",
        ]
        token = events[1]["detail"]
        assert events[3]["detail"] == f"one {token} True"  # its own process's resource
        tokens.add(token)
    assert len(tokens) == 2


def test_serve_startup_failure_exits_1_with_one_line_and_never_binds(
    tmp_path: Path, notify: Notify
) -> None:
    port = free_port()
    project = Project(tmp_path, ["lifespan_app", "lifespan_other"], port=port)
    proc, log = project.start(
        "serve",
        NOTIFY_SOCKET=notify.path,
        LIFESPAN_PROBE_PORT=str(port),
        LIFESPAN_FAIL_STARTUP="lifespan_other",
    )
    with reaped(proc):
        assert proc.wait(timeout=30) == 1

    lines = log_lines(log)
    errors = [e for e in lines if e.get("level") == "error"]
    assert len(errors) == 1, lines
    assert errors[0]["event"] == "lifespan_failed"
    assert errors[0]["module"] == "lifespan_other"
    assert "ConnectionRefusedError: lifespan_other: the database is unreachable" in str(
        errors[0]["error"]
    )
    assert not any(e.get("event") == "listening" for e in lines)
    assert not any("READY=1" in d for d in received(notify))
    # Both startups found the port closed; the module started first was shut down again.
    assert [(e["event"], e["module"], e["detail"]) for e in project.events()] == [
        ("startup-begin", "lifespan_app", ""),
        ("probe", "lifespan_app", "refused"),
        ("startup", "lifespan_app", project.events("startup")[0]["detail"]),
        ("startup-begin", "lifespan_other", ""),
        ("probe", "lifespan_other", "refused"),
        ("shutdown", "lifespan_app", project.events("startup")[0]["detail"]),
    ]


def test_worker_startup_failure_exits_1_with_one_line_and_claims_nothing(
    tmp_path: Path, notify: Notify
) -> None:
    project = Project(tmp_path, ["lifespan_app"])
    names = project.drop("first", "second")
    proc, log = project.start(
        "worker",
        "--queue",
        "posts",
        NOTIFY_SOCKET=notify.path,
        LIFESPAN_FAIL_STARTUP="lifespan_app",
    )
    with reaped(proc):
        assert proc.wait(timeout=30) == 1

    lines = log_lines(log)
    errors = [e for e in lines if e.get("level") == "error"]
    assert len(errors) == 1, lines
    assert (errors[0]["event"], errors[0]["module"]) == ("lifespan_failed", "lifespan_app")
    assert "ConnectionRefusedError" in str(errors[0]["error"])
    assert not any("READY=1" in d for d in received(notify))
    assert not any(e.get("event") == "worker_started" for e in lines)  # no recovery either
    assert sorted(p.name for p in project.queue.dir("new").iterdir()) == sorted(names)
    assert list(project.queue.dir("cur").iterdir()) == []
    assert project.events("handler-start") == []


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_failing_shutdown_is_logged_the_others_still_run_exit_0(
    tmp_path: Path, notify: Notify, command: str
) -> None:
    project = Project(tmp_path, ["lifespan_app", "lifespan_other"])
    args = ["--queue", "posts"] if command == "worker" else []
    proc, log = project.start(
        command, *args, NOTIFY_SOCKET=notify.path, LIFESPAN_FAIL_SHUTDOWN="lifespan_other"
    )
    with reaped(proc):
        notify.wait("READY=1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    # Started in the order of the setting, shut down in reverse; the failure stops nothing.
    assert [
        (e["event"], e["module"]) for e in project.events() if e["event"] != "startup-begin"
    ] == [
        ("startup", "lifespan_app"),
        ("startup", "lifespan_other"),
        ("shutdown", "lifespan_other"),
        ("shutdown", "lifespan_app"),
    ]
    errors = [e for e in log_lines(log) if e.get("level") == "error"]
    assert [(e["event"], e["module"]) for e in errors] == [
        ("lifespan_shutdown_failed", "lifespan_other")
    ]
    assert "RuntimeError: lifespan_other: the pool did not close" in str(errors[0]["error"])


def test_a_lifespan_that_is_not_a_hook_is_a_bad_setting_exit_2(tmp_path: Path) -> None:
    (tmp_path / "bare_generator.py").write_text(
        textwrap.dedent(
            """
            from maildefer import route, stateless

            async def lifespan(settings):  # forgot @asynccontextmanager
                yield

            @route("(user)@(host)")
            @stateless
            async def START(message, user, host): ...
            """
        )
    )
    project = Project(tmp_path, ["bare_generator"])
    for command, args in (("serve", []), ("worker", ["--queue", "posts"])):
        proc, log = project.start(command, *args, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
        with reaped(proc):
            assert proc.wait(timeout=30) == 2
        text = log.read_text()
        assert "bare_generator.lifespan is an async generator function" in text
        assert "asynccontextmanager" in text
