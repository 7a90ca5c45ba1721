"""``maildefer serve`` as a systemd service: sd_notify, socket activation, metrics (processes)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers.ops import Notify, wait_for
from prometheus_client.parser import text_string_to_metric_families

from maildefer.queue.envelope import request_from_file

ROOT = Path(__file__).resolve().parent.parent
MSG = b"From: a@b.org\r\nTo: post@example.com\r\nSubject: hi\r\n\r\nbody\r\n"

# The local part decides: "slow" marks that it started, then takes a while; "fail" raises.
HANDLERS = """
import asyncio
from pathlib import Path
from maildefer import Queue, route, stateless

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    if name == "slow":
        Path("run").mkdir(exist_ok=True)
        Path("run/slow-started").write_text("x")
        await asyncio.sleep(1.5)
    if name == "fail":
        raise RuntimeError("failing on purpose")
    await Queue("run/posts").push(message)
"""


def make_project(root: Path, *, metrics: bool = False) -> Path:
    """A project in ``root``: handlers, one maildir queue; returns the settings file."""
    (root / "ops_serve_handlers.py").write_text(HANDLERS)
    lines = [
        "[server]",
        "port = 0",
        'hostname = "mx.test"',
        'handlers = ["ops_serve_handlers"]',
        "grace_period = 10.0",
        "[router]",
        'defaults = { host = "example\\\\.com" }',
        "[queues.posts]",
        'path = "run/posts"',
        'handlers = ["ops_serve_handlers"]',
    ]
    if metrics:
        lines += ["[metrics]", "port = 0"]
    (root / "config").mkdir(exist_ok=True)
    config = root / "config" / "settings.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def environ(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MAILDEFER_", "NOTIFY_", "WATCHDOG_", "LISTEN_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    env["MAILDEFER_LOGGING__FORMAT"] = "json"
    env.update(extra)
    return env


class Serve:
    """A ``maildefer serve`` process; its JSON log in a file."""

    def __init__(self, root: Path, argv: list[str], env: dict[str, str]) -> None:
        self.root = root
        self.log = root / "serve.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=out
            )

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def event(self, name: str, timeout: float = 20.0) -> dict[str, object]:
        found: list[dict[str, object]] = []

        def look() -> bool:
            found[:] = [e for e in self.events() if e.get("event") == name]
            return bool(found) or self.proc.poll() is not None

        wait_for(look, timeout, f"log event {name}")
        assert found, f"serve exited ({self.proc.returncode}):\n{self.log.read_text()}"
        return found[0]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def serve(root: Path, config: Path, **env: str) -> Serve:
    argv = [sys.executable, "-m", "maildefer", "--config", str(config), "serve"]
    return Serve(root, argv, environ(**env))


def queued(root: Path) -> list[bytes]:
    new = root / "run" / "posts" / "new"
    if not new.exists():
        return []
    return [request_from_file(p.read_bytes()).raw for p in sorted(new.iterdir())]


def test_serve_notifies_ready_watchdog_status_and_stopping(tmp_path: Path, notify: Notify) -> None:
    config = make_project(tmp_path)
    # No WATCHDOG_PID: per sd_watchdog_enabled(3) the watchdog is then ours.
    server = serve(tmp_path, config, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="200000")
    with contextlib.ExitStack() as closing:
        closing.callback(server.kill)
        ready = notify.wait("READY=1")
        # READY=1 carries the port, and at that moment the port already accepts.
        port = int(ready.rsplit("listening on port ", 1)[1].split()[0])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.settimeout(5)
            assert conn.recv(100).startswith(b"220 ")
        # Pings every 100 ms (half of WATCHDOG_USEC), from the serving loop.
        notify.wait("WATCHDOG=1", count=2, timeout=5)
        assert "sessions" in notify.wait("STATUS=", count=2)

        # A session in its handler when SIGTERM comes: STOPPING=1 is sent at once,
        # before the drain that lets this client get its 250.
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        closing.callback(client.close)
        client.ehlo("c")
        client.mail("a@b.org")
        assert client.rcpt("slow@example.com")[0] == 250
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(MSG + b".\r\n")
        wait_for((tmp_path / "run" / "slow-started").exists, what="the handler to start")
        server.proc.send_signal(signal.SIGTERM)
        stopping = notify.wait("STOPPING=1", timeout=5)
        assert queued(tmp_path) == []  # the handler had not finished
        pings = len([f for f in notify.fields if f.startswith("WATCHDOG=1")])
        notify.wait("WATCHDOG=1", count=pings + 1, timeout=5)  # still pinging in the drain
        assert client.getreply()[0] == 250
        assert server.proc.wait(timeout=30) == 0
        assert "stopping" in stopping
        assert queued(tmp_path) == [MSG]
        order = [f.split("\n", 1)[0].split("=", 1)[0] for f in notify.fields]
        assert order.index("READY") < order.index("STOPPING")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate not installed (Debian package: systemd)",
)
def test_serve_under_socket_activation_delivers_through_the_inherited_socket(
    tmp_path: Path,
) -> None:
    config = make_project(tmp_path)  # [server] port = 0: only the passed socket reaches it
    port = _free_port()
    argv = [
        "systemd-socket-activate",
        f"--listen=127.0.0.1:{port}",
        f"--setenv=PYTHONPATH={ROOT}",
        "--setenv=MAILDEFER_LOGGING__FORMAT=json",
        sys.executable,
        "-m",
        "maildefer",
        "--config",
        str(config),
        "serve",
    ]
    # The activator passes only the variables named with --setenv (plus LISTEN_*).
    activated = Serve(tmp_path, argv, environ())
    try:
        # The activator binds at once and execs serve on the first connection; serve
        # then accepts that connection from the inherited socket.
        deadline = time.monotonic() + 20
        while True:
            try:
                client = smtplib.SMTP("127.0.0.1", port, timeout=30)
                break
            except ConnectionRefusedError:
                assert activated.proc.poll() is None, activated.log.read_text()
                assert time.monotonic() < deadline, "the activator did not bind"
                time.sleep(0.02)  # poll-with-deadline for the activator's bind
        with client:
            assert client.sendmail("a@b.org", ["post@example.com"], MSG) == {}
        assert queued(tmp_path) == [MSG]
        listening = activated.event("listening")
        assert listening["port"] == port  # the inherited socket, not [server] port = 0
        assert activated.stop() == 0  # the activator exec'd serve: same pid
    finally:
        activated.kill()


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of a metrics endpoint: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_serve_metrics_endpoint_counts_messages_and_refusals(tmp_path: Path) -> None:
    config = make_project(tmp_path, metrics=True)
    server = serve(tmp_path, config)
    try:
        metrics_port = int(server.event("metrics_listening")["port"])  # type: ignore[call-overload]
        port = int(server.event("listening")["port"])  # type: ignore[call-overload]
        before = scrape(metrics_port)
        assert value(before, "maildefer_messages_accepted_total") == 0

        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            for _ in range(2):
                assert client.sendmail("a@b.org", ["post@example.com"], MSG) == {}
            client.mail("a@b.org")
            code, _ = client.rcpt("someone@elsewhere.org")  # no route matches
            assert code == 550
            client.rset()
            with pytest.raises(smtplib.SMTPDataError) as failed:
                client.sendmail("a@b.org", ["fail@example.com"], MSG)
            assert failed.value.smtp_code == 451

        after = scrape(metrics_port)
        assert value(after, "maildefer_messages_received_total") == 3
        assert value(after, "maildefer_messages_accepted_total") == 2
        assert value(after, "maildefer_messages_refused_total", code="550") == 1
        assert value(after, "maildefer_messages_refused_total", code="451") == 1
        handler = {"side": "serve", "queue": ""}
        assert value(after, "maildefer_handler_duration_seconds_count", **handler) == 3
        assert value(after, "maildefer_handler_duration_seconds_sum", **handler) > 0
        assert value(after, "maildefer_in_flight", **handler) == 0
        # The handlers' pushes show in the depth of [queues.posts], counted at scrape.
        assert value(after, "maildefer_queue_depth", queue="posts", state="new") == 2
        assert server.stop() == 0
        # The endpoint went away with the process.
        with pytest.raises(OSError):
            scrape(metrics_port)
    finally:
        server.kill()
