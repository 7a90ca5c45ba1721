"""The event loop of serve and worker: ``[runtime] loop``, ``--loop``, uvloop for real."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers.daemon import stops_cleanly
from helpers.smtp_server import queued

from maildefer import loops
from maildefer.errors import ConfigError
from maildefer.queue.maildir import MaildirQueue

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MSG = b"From: a@b.org\r\nTo: post@example.com\r\nSubject: loop\r\n\r\nbody\r\n"
UVLOOP = "uvloop.Loop"
STDLIB = "asyncio.unix_events._UnixSelectorEventLoop"

# Records the class of the loop it runs on, one line per call, then queues the message.
SERVE_HANDLER = """
import asyncio, os
from maildefer import Queue, route, stateless

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    kind = type(asyncio.get_running_loop())
    with open(os.environ["LOOP_RECORD"], "a") as f:
        f.write(f"{kind.__module__}.{kind.__qualname__}\\n")
    await Queue("run/posts").push(message)
"""

# The worker's handler records the loop and the subject (it must not push to its own queue).
WORKER_HANDLER = """
import asyncio, os
from maildefer import route, stateless

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    kind = type(asyncio.get_running_loop())
    with open(os.environ["LOOP_RECORD"], "a") as f:
        f.write(f"{kind.__module__}.{kind.__qualname__}\\t{message['Subject']}\\n")
"""

# `python -c PRELUDE ARGS...` runs `python -m maildefer ARGS...` with uvloop unimportable,
# as on a machine where the extra is not installed.
NO_UVLOOP = (
    "import runpy, sys; sys.modules['uvloop'] = None; sys.argv[0] = 'maildefer'; "
    "runpy.run_module('maildefer', run_name='__main__', alter_sys=True)"
)


class Project:
    """A project with a serve handler and a worker queue ``posts``, both recording loops."""

    def __init__(self, root: Path, runtime: str | None = None) -> None:
        self.root = root
        self.record = root / "loops.txt"
        suffix = uuid.uuid4().hex[:12]
        serve_mod, worker_mod = f"loop_serve_{suffix}", f"loop_worker_{suffix}"
        (root / f"{serve_mod}.py").write_text(SERVE_HANDLER)
        (root / f"{worker_mod}.py").write_text(WORKER_HANDLER)
        lines = [
            "[server]",
            "port = 0",
            'hostname = "mx.test"',
            f'handlers = ["{serve_mod}"]',
            "grace_period = 5.0",
            "[router]",
            'defaults = { host = "example\\\\.com" }',
            "[queues.posts]",
            'path = "run/posts"',
            f'handlers = ["{worker_mod}"]',
        ]
        if runtime is not None:
            lines += ["[runtime]", f"loop = {json.dumps(runtime)}"]
        (root / "config").mkdir(exist_ok=True)
        (root / "config" / "settings.toml").write_text("\n".join(lines) + "\n")

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILDEFER_")}
        env["PYTHONPATH"] = str(PROJECT_ROOT)
        env["MAILDEFER_LOGGING__FORMAT"] = "json"
        env["LOOP_RECORD"] = str(self.record)
        env.update(extra)
        return env

    def argv(self, *args: str, hide_uvloop: bool = False) -> list[str]:
        head = ["-c", NO_UVLOOP] if hide_uvloop else ["-m", "maildefer"]
        return [sys.executable, *head, *args]

    def cli(
        self, *args: str, hide_uvloop: bool = False, **env: str
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.argv(*args, hide_uvloop=hide_uvloop),
            cwd=self.root,
            env=self.env(**env),
            capture_output=True,
            timeout=60,
            check=False,
        )

    def loops_recorded(self) -> list[str]:
        if not self.record.exists():
            return []
        return [line.split("\t")[0] for line in self.record.read_text().splitlines()]


def serve_one_message(project: Project, *args: str, hide_uvloop: bool = False, **env: str) -> str:
    """Start serve, send one message (250), stop it with SIGTERM (exit 0); the loop it used."""
    proc = subprocess.Popen(
        project.argv("serve", *args, hide_uvloop=hide_uvloop),
        cwd=project.root,
        env=project.env(**env),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    with stops_cleanly(proc) as port, smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("c")
        client.mail("a@b.org")
        assert client.rcpt("post@example.com")[0] == 250
        code, _ = client.data(MSG)
        assert code == 250
    [message] = queued(project.root / "run" / "posts")
    assert message.raw == MSG and message.rcpt_tos == ["post@example.com"]
    [kind] = project.loops_recorded()
    return kind


# -- serve -----------------------------------------------------------------------------------


def test_serve_on_uvloop_answers_250_and_queues(tmp_path: Path) -> None:
    assert serve_one_message(Project(tmp_path), "--loop", "uvloop") == UVLOOP


@pytest.mark.parametrize(
    ("runtime", "args", "env", "expected"),
    [
        pytest.param(None, [], {}, UVLOOP, id="default-is-auto"),
        pytest.param("uvloop", [], {}, UVLOOP, id="setting"),
        pytest.param(None, [], {"MAILDEFER_RUNTIME__LOOP": "uvloop"}, UVLOOP, id="env"),
        pytest.param("uvloop", ["--loop", "asyncio"], {}, STDLIB, id="flag-over-setting"),
        pytest.param(None, ["--loop", "auto"], {}, UVLOOP, id="auto-with-uvloop"),
    ],
)
def test_serve_loop_chosen_by_setting_env_and_flag(
    tmp_path: Path, runtime: str | None, args: list[str], env: dict[str, str], expected: str
) -> None:
    assert serve_one_message(Project(tmp_path, runtime), *args, **env) == expected


def test_auto_without_uvloop_runs_on_asyncio(tmp_path: Path) -> None:
    kind = serve_one_message(Project(tmp_path, "auto"), hide_uvloop=True)
    assert kind == STDLIB


# -- worker ----------------------------------------------------------------------------------


def test_worker_burst_on_uvloop_drains_a_real_maildir(tmp_path: Path) -> None:
    project = Project(tmp_path)
    queue = MaildirQueue(tmp_path / "run" / "posts")
    subjects = [f"m{i}" for i in range(20)]

    async def fill() -> None:
        for subject in subjects:
            await queue.push(MSG.replace(b"Subject: loop", f"Subject: {subject}".encode()))

    asyncio.run(fill())
    result = project.cli("worker", "--queue", "posts", "--burst", "--loop", "uvloop")
    assert result.returncode == 0, result.stderr.decode()
    lines = [line.split("\t") for line in project.record.read_text().splitlines()]
    assert sorted(subject for _, subject in lines) == sorted(subjects)
    assert {kind for kind, _ in lines} == {UVLOOP}
    assert asyncio.run(queue.count()) == 0
    assert not os.listdir(queue.dir("cur"))


def test_live_worker_on_uvloop_picks_up_a_push_and_stops_on_sigterm(tmp_path: Path) -> None:
    project = Project(tmp_path)
    queue = MaildirQueue(tmp_path / "run" / "posts")
    queue.ensure()
    log = (tmp_path / "worker.log").open("wb")
    with log:
        proc = subprocess.Popen(
            project.argv("worker", "--queue", "posts", "--loop", "uvloop"),
            cwd=tmp_path,
            env=project.env(),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        while b"worker_started" not in (tmp_path / "worker.log").read_bytes():
            assert time.monotonic() < deadline and proc.poll() is None, "worker did not start"
            time.sleep(0.02)
        asyncio.run(queue.push(MSG))  # after the start: only inotify (or a rescan) finds it
        while not project.loops_recorded():
            assert time.monotonic() < deadline, "the message was not handled"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert project.loops_recorded() == [UVLOOP]
    assert asyncio.run(queue.count()) == 0


def test_worker_burst_on_uvloop_by_default_and_says_so(tmp_path: Path) -> None:
    project = Project(tmp_path)
    queue = MaildirQueue(tmp_path / "run" / "posts")
    asyncio.run(queue.push(MSG))
    result = project.cli("worker", "--queue", "posts", "--burst")
    assert result.returncode == 0, result.stderr.decode()
    assert project.loops_recorded() == [UVLOOP]  # "auto", and uvloop is installed here
    assert '"loop": "uvloop"' in result.stderr.decode()  # in the worker_started line


# -- bad values and a missing uvloop: exit 2, one line ---------------------------------------


def one_line(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 2, result.stderr.decode()
    [line] = result.stderr.decode().strip().splitlines()
    return line


def test_bad_loop_setting_exits_2_naming_the_key(tmp_path: Path) -> None:
    project = Project(tmp_path, runtime="tokio")
    for command in (["serve"], ["worker", "--queue", "posts", "--burst"]):
        line = one_line(project.cli(*command))
        assert "runtime.loop" in line and "'tokio'" in line and "'uvloop'" in line
    project = Project(tmp_path)
    line = one_line(project.cli("serve", MAILDEFER_RUNTIME__LOOP="tokio"))
    assert "runtime.loop" in line and "'tokio'" in line
    line = one_line(project.cli("worker", "--queue", "posts", MAILDEFER_RUNTIME__LOOP="tokio"))
    assert "runtime.loop" in line
    line = one_line(project.cli("serve", "--loop", "tokio"))
    assert "--loop" in line and "'tokio'" in line
    line = one_line(project.cli("worker", "--queue", "posts", "--burst", "--loop", "tokio"))
    assert "--loop" in line and "'tokio'" in line
    assert not project.record.exists()


def test_unknown_runtime_key_exits_2(tmp_path: Path) -> None:
    project = Project(tmp_path)
    with (tmp_path / "config" / "settings.toml").open("a") as f:
        f.write('[runtime]\nloops = "uvloop"\n')
    line = one_line(project.cli("serve"))
    assert "runtime.loops" in line and "unknown key" in line


@pytest.mark.parametrize(
    "command",
    [["serve", "--loop", "uvloop"], ["worker", "--queue", "posts", "--burst", "--loop", "uvloop"]],
    ids=["serve", "worker"],
)
def test_uvloop_not_installed_exits_2_with_the_install_hint(
    tmp_path: Path, command: list[str]
) -> None:
    project = Project(tmp_path)
    queue = MaildirQueue(tmp_path / "run" / "posts")
    asyncio.run(queue.push(MSG))
    line = one_line(project.cli(*command, hide_uvloop=True))
    assert "runtime.loop" in line and "pip install 'maildefer[uvloop]'" in line
    assert not project.record.exists()  # nothing ran
    assert asyncio.run(queue.count()) == 1


def test_setting_uvloop_not_installed_exits_2(tmp_path: Path) -> None:
    line = one_line(Project(tmp_path, runtime="uvloop").cli("serve", hide_uvloop=True))
    assert "maildefer[uvloop]" in line


def test_help_does_not_import_uvloop(tmp_path: Path) -> None:
    code = (
        "import runpy, sys\n"
        "sys.argv = ['maildefer', '--help']\n"
        "try:\n"
        "    runpy.run_module('maildefer', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        "for argv in (['serve', '--help'], ['worker', '--help']):\n"
        "    from maildefer.cli import main\n"
        "    assert main(argv) == 0\n"
        "print('uvloop' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip().splitlines()[-1] == "False"
    assert "--loop {auto,asyncio,uvloop}" in result.stdout.decode()


# -- loops.run in-process ----------------------------------------------------------------------


async def loop_kind() -> str:
    kind = type(asyncio.get_running_loop())
    return f"{kind.__module__}.{kind.__qualname__}"


def test_run_on_each_loop() -> None:
    assert loops.run(loop_kind(), "uvloop") == UVLOOP
    assert loops.run(loop_kind(), "auto") == UVLOOP
    assert loops.run(loop_kind(), "asyncio") == STDLIB
    assert loops.run(loop_kind()) == STDLIB


def test_run_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import uvloop` raise ImportError, as when not installed.
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert loops.run(loop_kind(), "auto") == STDLIB
    coro = loop_kind()
    with pytest.raises(ConfigError, match=r"maildefer\[uvloop\]"):
        loops.run(coro, "uvloop")
    assert coro.cr_frame is None  # closed unstarted: no "never awaited" warning
