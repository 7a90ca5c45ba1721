"""maildefer.ops.systemd against real sockets: notify datagrams, the watchdog, socket activation."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from maildefer.ops.lifecycle import Lifecycle
from maildefer.ops.systemd import Notifier, listen_fds, listen_fds_with_names, run_watchdog

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notify socket, and its path."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock``, without blocking."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return out


def test_notifier_sends_each_state_to_a_path_socket(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}
    n = Notifier.from_environ(env, pid=os.getpid())
    assert n.enabled and n.watchdog_interval == 15.0

    assert n.ready()
    assert sock.recv(4096) == b"READY=1"
    assert n.ready("listening on 127.0.0.1:25")
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening on 127.0.0.1:25"
    assert n.status("3 in flight\nREADY=1")  # a newline cannot inject a second field
    assert sock.recv(4096) == b"STATUS=3 in flight READY=1"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.extend_timeout(1.5)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=1500000"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"maildefer-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        n = Notifier.from_environ({"NOTIFY_SOCKET": f"@{name}"})
        assert n.address == b"\0" + name.encode()
        assert n.ready()
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_nothing_is_sent(notify_socket: tuple[socket.socket, str]) -> None:
    sock, _ = notify_socket
    n = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert not any([n.ready(), n.status("x"), n.watchdog(), n.stopping()])
    assert drain(sock) == []


def test_a_vanished_manager_is_not_an_error(tmp_path: Path) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.enabled
    assert n.ready() is False  # ENOENT swallowed: the daemon keeps running


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4243"}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_follows_sd_watchdog_enabled(env: dict[str, str], expected: float | None) -> None:
    assert Notifier.from_environ(dict(env), pid=4242).watchdog_interval == expected


def test_unset_removes_the_variables_from_the_environment() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "PATH": "/bin"}
    n = Notifier.from_environ(env, pid=1, unset=True)
    assert n.enabled and n.watchdog_usec == 1
    assert env == {"PATH": "/bin"}


async def test_run_watchdog_pings_from_the_loop_and_stops_when_it_hangs(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    # 100 ms timeout: a ping every 50 ms.
    n = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    task = asyncio.create_task(run_watchdog(n))
    try:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        pings = []
        async with asyncio.timeout(10):
            while len(pings) < 3:
                pings.append(await loop.sock_recv(sock, 4096))
        assert set(pings) == {b"WATCHDOG=1"}
        drain(sock)
        # The fault under test: the event loop blocks for ten ping intervals. Pings come
        # from the loop, so at most the one already due may get out; a pinger in a thread
        # would send about ten.
        time.sleep(0.5)  # noqa: ASYNC251 - blocking the loop is the point
        assert len(drain(sock)) <= 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_run_watchdog_withholds_pings_while_unhealthy(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    n = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    healthy = False
    task = asyncio.create_task(run_watchdog(n, healthy=lambda: healthy))
    try:
        await asyncio.sleep(0.2)  # ~20 intervals
        assert drain(sock) == []
        healthy = True
        sock.setblocking(False)
        async with asyncio.timeout(10):
            assert await asyncio.get_running_loop().sock_recv(sock, 4096) == b"WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_run_watchdog_returns_when_disabled() -> None:
    async with asyncio.timeout(5):
        await run_watchdog(Notifier.from_environ({"NOTIFY_SOCKET": "/run/x"}))


def test_listen_fds_ignores_another_process_fds_and_unsets() -> None:
    env = {"LISTEN_FDS": "2", "LISTEN_PID": "1", "LISTEN_FDNAMES": "a:b"}
    assert listen_fds(env, pid=2) == []
    assert env == {}
    # unset=False keeps them (fd count 0: nothing of this test process gets wrapped).
    env = {"LISTEN_FDS": "0", "LISTEN_PID": "2"}
    assert listen_fds_with_names(env, pid=2, unset=False) == []
    assert env == {"LISTEN_FDS": "0", "LISTEN_PID": "2"}


# The child plays a daemon under systemd: systemd puts the sockets at fds 3, 4, ... and sets
# LISTEN_PID to the daemon's pid before exec, which a parent cannot know in advance; the
# few lines before the import do exactly that, then the child calls listen_fds like serve.
CHILD = textwrap.dedent(
    """
    import fcntl, os, sys
    fds = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) for fd in sys.argv[1:]]
    for index, fd in enumerate(fds):
        os.dup2(fd, 3 + index)
        os.close(fd)
    os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()))
    os.environ["LISTEN_FDNAMES"] = "smtp:submission"
    from maildefer.ops.systemd import listen_fds_with_names
    sockets = listen_fds_with_names()
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ
    for name, sock in sockets:
        print(name, sock.family.name, sock.type.name, sock.getsockname()[1],
              os.get_inheritable(sock.fileno()), flush=True)
    for _, sock in sockets:
        conn, _ = sock.accept()
        conn.sendall(b"adopted " + str(sock.getsockname()[1]).encode())
        conn.close()
    """
)


def test_listen_fds_adopts_sockets_passed_to_a_real_process() -> None:
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    ports = [s.getsockname()[1] for s in listeners]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    fds = [s.fileno() for s in listeners]
    for s in listeners:
        s.set_inheritable(True)
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, fds)],
        pass_fds=fds,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        for s in listeners:
            s.close()  # the child holds the only copies now
        try:
            lines = [child.stdout.readline().split() for _ in ports]  # type: ignore[union-attr]
            assert lines == [
                ["smtp", "AF_INET", "SOCK_STREAM", str(ports[0]), "False"],
                ["submission", "AF_INET", "SOCK_STREAM", str(ports[1]), "False"],
            ]
            for port in ports:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                    assert conn.recv(100) == f"adopted {port}".encode()
            assert child.wait(timeout=30) == 0, child.stderr.read()  # type: ignore[union-attr]
        finally:
            child.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ACTIVATED = textwrap.dedent(
    """
    import os
    pid_ok = os.environ.get("LISTEN_PID") == str(os.getpid())
    from maildefer.ops.systemd import listen_fds_with_names
    [(name, sock)] = listen_fds_with_names()
    conn, _ = sock.accept()
    conn.sendall(f"{name} {pid_ok}".encode())
    conn.close()
    """
)


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate not installed (Debian package: systemd)",
)
def test_listen_fds_under_systemd_socket_activate() -> None:
    port = _free_port()
    with subprocess.Popen(
        [
            "systemd-socket-activate",
            f"--listen=127.0.0.1:{port}",
            "--fdname=smtp",
            f"--setenv=PYTHONPATH={PROJECT_ROOT}",
            sys.executable,
            "-c",
            ACTIVATED,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as activator:
        try:
            # The activator binds first and execs the child on the first connection.
            deadline = time.monotonic() + 20
            while True:
                try:
                    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
                    break
                except ConnectionRefusedError:
                    if time.monotonic() > deadline or activator.poll() is not None:
                        raise
                    time.sleep(0.02)  # poll-with-deadline for the bind
            with conn:
                assert conn.recv(100) == b"smtp True"
            assert activator.wait(timeout=30) == 0
        finally:
            activator.kill()


async def test_lifecycle_first_signal_stops_gracefully_the_second_forces(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    forced: list[str] = []
    lifecycle = Lifecycle(lambda: "2 in flight", Notifier(path), on_force=forced.append)
    async with lifecycle:
        # Installed on the loop (this is the main thread): a SIGTERM cannot kill pytest.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        lifecycle.ready("live")
        await asyncio.sleep(0.05)  # the status task sends its first line
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(lifecycle.wait(), 5)
        assert not lifecycle.forced and forced == []
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(500):
            if forced:
                break
            await asyncio.sleep(0.01)  # the signal's callback runs on a later loop turn
        assert lifecycle.forced and forced == ["SIGINT"]
    # Left: the handlers are gone, and STOPPING=1 went out once, at the first signal.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert drain(sock) == [
        b"READY=1\nSTATUS=live",
        b"STATUS=2 in flight",
        b"STOPPING=1\nSTATUS=stopping: 2 in flight",
    ]


async def test_lifecycle_without_a_notifier_sends_nothing_and_still_stops() -> None:
    lifecycle = Lifecycle(lambda: "idle")
    async with lifecycle:
        lifecycle.ready("live")
        lifecycle.announce_stopping("done")  # no manager: nothing to tell, no error
        assert not lifecycle.stopping
        lifecycle.request_shutdown()
        await asyncio.wait_for(lifecycle.wait(), 5)
    assert lifecycle.stopping and not lifecycle.forced
