"""serve, send and log as processes: exit codes, SIGTERM drain, the send command."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.daemon import listening_port, reap, stops_cleanly
from helpers.smtp_server import make_settings, queued, running, write_handlers

ROOT = Path(__file__).resolve().parent.parent
MSG = b"Subject: hi\r\n\r\nbody\r\n"

SLOW_HANDLER = """
import asyncio
from pathlib import Path
from maildefer import Queue, route, stateless

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    Path("run").mkdir(exist_ok=True)
    Path("run/started").write_text("x")
    await asyncio.sleep(1.5)
    await Queue("run/posts").push(message)
"""


def project(root: Path, handlers: str, **server: object) -> Path:
    values = {"port": 0, "hostname": "mx.test", "handlers": [handlers], **server}
    lines = ["[server]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    lines += ["[router]", 'defaults = { host = "example\\\\.com" }']
    (root / "config").mkdir(exist_ok=True)
    (root / "config" / "settings.toml").write_text("\n".join(lines) + "\n")
    return root


def environ() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILDEFER_")}
    env["PYTHONPATH"] = str(ROOT)
    env["MAILDEFER_LOGGING__FORMAT"] = "json"
    return env


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`maildefer serve` started from another directory than the project's."""
    handlers = write_handlers(tmp_path, SLOW_HANDLER)
    project(tmp_path, handlers, grace_period=10.0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = tmp_path / "config" / "settings.toml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "maildefer", "--config", str(config), "serve"],
        cwd=elsewhere,
        env=environ(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        reap(proc)


def test_sigterm_during_handler_client_gets_250_exit_0(
    serve: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    port = listening_port(serve)
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.ehlo("c")
    client.mail("a@b.org")
    client.rcpt("post@example.com")
    client.putcmd("data")
    assert client.getreply()[0] == 354
    client.send(MSG + b".\r\n")
    started = tmp_path / "run" / "started"
    deadline = time.monotonic() + 10
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert started.exists()
    serve.send_signal(signal.SIGTERM)
    code, _ = client.getreply()
    assert code == 250
    # New connections are refused once the listener is closed.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    client.close()
    assert serve.wait(timeout=20) == 0
    [message] = queued(tmp_path / "run" / "posts")  # relative to the project root
    assert message.raw == MSG


def test_bad_setting_exits_2_before_binding(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        project(tmp_path, "app.handlers.posting", port=port, max_recipients=0)
        result = run_cli("serve", cwd=tmp_path)
        # 2, not 1: it stopped before trying the (taken) port.
        assert result.returncode == 2
        [line] = result.stderr.decode().strip().splitlines()
        assert "max_recipients" in line
        project(tmp_path, "no_such_handlers_module", port=port)
        result = run_cli("serve", cwd=tmp_path)
        assert result.returncode == 2
        assert len(result.stderr.decode().strip().splitlines()) == 1
        assert "no_such_handlers_module" in result.stderr.decode()
    finally:
        holder.close()


def test_port_in_use_exits_1(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        handlers = write_handlers(tmp_path)
        project(tmp_path, handlers, port=holder.getsockname()[1])
        result = run_cli("serve", cwd=tmp_path, env={"MAILDEFER_LOGGING__FORMAT": "json"})
        assert result.returncode == 1
        assert b"bind_failed" in result.stderr
    finally:
        holder.close()


async def cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "maildefer", *args,
        cwd=cwd, env=environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_send_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    handlers = write_handlers(tmp_path)
    async with running(make_settings(tmp_path, handlers)) as server:
        port = str(server.port)
        code, out, _ = await cli(
            "send", "--to", "news@example.com", "--subject", "Hello", "--port", port, cwd=tmp_path
        )
        assert code == 0 and "Ok" in out
        code, _, err = await cli("send", "--to", "x@nowhere.org", "--port", port, cwd=tmp_path)
        assert code == 1 and "550" in err and "5.1.1" in err
        code, _, err = await cli("send", "--to", "fail@example.com", "--port", port, cwd=tmp_path)
        assert code == 1 and "451" in err
    [message] = queued(tmp_path / "run" / "posts")
    assert message["Subject"] == "Hello" and message.rcpt_tos == ["news@example.com"]


def test_log_command_queues_everything(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "maildefer", "log", "--port", "0", "--queue", "run/queue"],
        cwd=tmp_path, env=environ(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    with (
        stops_cleanly(proc, signal.SIGINT) as port,
        smtplib.SMTP("127.0.0.1", port, timeout=30) as client,
    ):
        assert client.sendmail("a@b.org", ["anyone@anywhere.net", "b@c.org"], MSG) == {}
    [message] = queued(tmp_path / "run" / "queue")
    assert message.raw == MSG and message.rcpt_tos == ["anyone@anywhere.net", "b@c.org"]
