"""Private RabbitMQ nodes on loopback: one broker, or a cluster of several, for fault tests.

Every node is a ``rabbitmq-server`` of its own, started as a child of the test process with a
private node name (``md-<id>-<n>@localhost``), AMQP and distribution ports the OS picked, its
own data, log and PID files, its own config (the machine's ``/etc/rabbitmq/rabbitmq.conf``
binds 5672, which would clash), no plugins, and the machine's erlang cookie copied into a
private ``$HOME`` (so ``rabbitmqctl`` authenticates without touching ``/root`` or
``/var/lib/rabbitmq``). The machine's own broker (``rabbit@localhost`` on 5672) is never
addressed: every ``rabbitmqctl`` call names a private node with ``-n``.

The server runs in the foreground (``RUNNING_UNDER_SYSTEMD`` makes the Debian script ``exec``
the VM), so the child's PID is the ``beam.smp`` PID: a SIGKILL is a real node loss, and the
test process reaps it (no zombie left for a PID 1 that may not reap).

Example (not run as a doctest: it starts three Erlang VMs)::

    cluster = start_cluster(3, tmp_path)
    try:
        url = cluster.url("posts")  # amqp://guest:guest@127.0.0.1:p1,...,127.0.0.1:p3/?queue=posts
        cluster.leader_of("posts").kill()
    finally:
        cluster.close()
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The Debian wrappers in /usr/sbin switch to the ``rabbitmq`` user and cd to its home; the
# real scripts under /usr/lib/rabbitmq/bin run as whoever calls them, on the dirs we give.
_SCRIPT_DIRS = (Path("/usr/lib/rabbitmq/bin"), Path("/usr/lib/rabbitmq/sbin"))
_MACHINE_COOKIE = Path("/var/lib/rabbitmq/.erlang.cookie")
START_TIMEOUT = 90.0
"""Seconds a node may take to boot (three VMs booting at once on 2 busy cores: up to ~40 s)."""


def _script(name: str) -> Path | None:
    """The RabbitMQ script ``name`` that runs as the caller, or None when not installed."""
    for directory in _SCRIPT_DIRS:
        if (directory / name).is_file():
            return directory / name
    found = shutil.which(name)
    return Path(found) if found else None


def rabbitmq_missing() -> str | None:
    """Why private nodes cannot run here (a skip reason), or None when they can."""
    if _script("rabbitmq-server") is None or _script("rabbitmqctl") is None:
        return "rabbitmq-server is not installed (make system-deps installs it)"
    return None


def _free_port() -> int:
    """A TCP port on loopback that the OS says is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env(home: Path) -> dict[str, str]:
    """The caller's environment without any RabbitMQ/Erlang setting, with the private HOME."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RABBITMQ_", "ERL_")) and key != "NOTIFY_SOCKET"
    }
    env["HOME"] = str(home)
    # epmd (shared by every node on the machine) is reached on loopback only.
    env["ERL_EPMD_ADDRESS"] = "127.0.0.1"
    return env


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Node:
    """One private RabbitMQ node, a child process of the test."""

    name: str
    port: int
    dist_port: int
    base: Path
    home: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """The ``beam.smp`` PID."""
        assert self.proc is not None, "node not started"
        return self.proc.pid

    @property
    def url(self) -> str:
        """This node's AMQP URL (no queue)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def alive(self) -> bool:
        """Whether the VM process still runs."""
        return self.proc is not None and self.proc.poll() is None

    def ctl(
        self, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n NAME ARGS`` against this node (never the machine's broker)."""
        return self._tool("rabbitmqctl", *args, timeout=timeout, check=check)

    def queues_tool(
        self, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmq-queues -n NAME ARGS`` against this node."""
        return self._tool("rabbitmq-queues", *args, timeout=timeout, check=check)

    def _tool(
        self, tool: str, *args: str, timeout: float, check: bool
    ) -> subprocess.CompletedProcess[str]:
        script = _script(tool)
        assert script is not None, f"{tool} is not installed"
        return subprocess.run(
            [str(script), "-n", self.name, *args],
            env=_clean_env(self.home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> None:
        """Start the VM (with the rabbit app) and wait until it accepts AMQP connections."""
        self.spawn()
        self.await_ready()

    def spawn(self) -> None:
        """Start the VM without waiting (several nodes boot in parallel this way)."""
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        config = self.base / "rabbitmq.conf"
        config.write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            # A node that loses its peers in a test must not wait for them forever at boot.
            "cluster_partition_handling = ignore\n"
            "loopback_users.guest = true\n"
            # Queue depths in list_queues come from stats emitted this often (default 5 s):
            # tests that wait for a queue to drain need them fresh.
            "collect_statistics_interval = 250\n"
        )
        plugins = self.base / "enabled_plugins"
        plugins.write_text("")
        env_file = self.base / "rabbitmq-env.conf"
        env_file.write_text("")
        env = _clean_env(self.home) | {
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_CONF_ENV_FILE": str(env_file),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            # Makes the Debian script exec the VM: our child's PID is beam's PID.
            "RUNNING_UNDER_SYSTEMD": "true",
        }
        script = _script("rabbitmq-server")
        assert script is not None
        with (self.base / "stdout.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [str(script)],
                env=env,
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def await_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the node has booted and its AMQP port accepts connections.

        ``await_startup`` fails at once while the node is not yet registered with epmd, so it
        is retried until the deadline.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"node {self.name} exited while starting: {self.log_tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"node {self.name} did not start: {self.log_tail()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                done = self.ctl(
                    "await_startup",
                    "--timeout",
                    str(int(max(left, 1))),
                    timeout=left + 5,
                    check=False,
                )
                if done.returncode == 0 and accepts(self.port):
                    return
            time.sleep(0.3)

    def stop_app(self) -> None:
        """Stop the rabbit app (connections dropped, VM stays up, as in a broker restart)."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        """Start the rabbit app again and wait until it accepts AMQP connections."""
        self.ctl("start_app", timeout=START_TIMEOUT)
        self.await_ready()

    def kill(self) -> None:
        """SIGKILL the VM (a node loss) and wait until the process is gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the node's console output, for error messages."""
        try:
            return (self.base / "stdout.log").read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


@dataclass
class Cluster:
    """Private nodes clustered together (or one node: a private single broker)."""

    nodes: list[Node]
    base: Path
    closed: bool = False

    def url(self, queue: str) -> str:
        """The multi-host URL naming every node, for ``queue``."""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"amqp://guest:guest@{hosts}/?queue={queue}"

    def running(self) -> list[Node]:
        """The nodes whose VM still runs."""
        return [node for node in self.nodes if node.alive()]

    def queue_info(self, queue: str) -> dict[str, object]:
        """``list_queues`` columns (name, type, leader, members, online, messages) of ``queue``.

        Asked of each running node in turn: the one asked may be the one that just died.
        """
        errors = []
        for node in self.running():
            done = node.ctl(
                "list_queues",
                "--quiet",
                "--formatter",
                "json",
                "name",
                "type",
                "leader",
                "members",
                "online",
                "messages",
                check=False,
                timeout=30,
            )
            if done.returncode != 0:
                errors.append(done.stderr.strip())
                continue
            for row in json.loads(done.stdout or "[]"):
                if row.get("name") == queue:
                    return dict(row)
            raise LookupError(f"no queue {queue!r} on the cluster")
        raise RuntimeError(f"no node answered list_queues: {errors}")

    def leader_of(self, queue: str) -> Node:
        """The node that leads the quorum queue ``queue`` now."""
        leader = str(self.queue_info(queue).get("leader", ""))
        for node in self.nodes:
            if node.name == leader:
                return node
        raise LookupError(f"queue {queue!r} has leader {leader!r}, not one of our nodes")

    def close(self) -> None:
        """Kill every node by PID and remove their directories (idempotent).

        With ``RABBIT_KEEP_LOGS=DIR`` in the environment the nodes' logs are copied to
        ``DIR/<node name>/`` first (to read what the broker saw after a failed run).
        """
        if self.closed:
            return
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.kill()
        keep = os.environ.get("RABBIT_KEEP_LOGS")
        if keep is not None:
            for node in self.nodes:
                with contextlib.suppress(OSError):
                    shutil.copytree(node.base / "log", Path(keep) / node.name, dirs_exist_ok=True)
        shutil.rmtree(self.base, ignore_errors=True)
        self.closed = True


def _private_home(base: Path) -> Path:
    """A HOME holding the machine's erlang cookie (a fresh one when it cannot be read).

    ``rabbitmqctl`` and the server read ``$HOME/.erlang.cookie``; as root that would be
    ``/root``, which the machine's broker does not use. A copy in our own HOME keeps the
    machine's files untouched; a random cookie works as well when the machine's is
    unreadable (a non-root user), since only our own nodes and CLI calls use it.
    """
    home = base / "home"
    home.mkdir(parents=True, exist_ok=True)
    cookie = home / ".erlang.cookie"
    try:
        value = _MACHINE_COOKIE.read_text().strip()
    except OSError:
        value = secrets.token_hex(16).upper()
    cookie.write_text(value)
    cookie.chmod(0o400)
    return home


def start_cluster(size: int, base: Path) -> Cluster:
    """Start ``size`` private nodes under ``base`` and cluster them (size 1: a lone broker).

    Nodes boot in parallel; nodes 2.. then ``stop_app`` / ``join_cluster node1`` /
    ``start_app``. On any failure every node started so far is killed before raising.
    """
    base.mkdir(parents=True, exist_ok=True)
    home = _private_home(base)
    tag = uuid.uuid4().hex[:8]
    nodes = [
        Node(
            name=f"md-{tag}-{index}@localhost",
            port=_free_port(),
            dist_port=_free_port(),
            base=base / f"node{index}",
            home=home,
        )
        for index in range(1, size + 1)
    ]
    cluster = Cluster(nodes=nodes, base=base)
    try:
        for node in nodes:
            node.spawn()
        for node in nodes:
            node.await_ready()
        first = nodes[0]
        for node in nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name, timeout=START_TIMEOUT)
            node.start_app()
        if size > 1:
            _await_members(first, [node.name for node in nodes])
    except BaseException:
        logs = "\n".join(f"{node.name}: {node.log_tail(800)}" for node in nodes)
        cluster.close()
        raise RuntimeError(f"private RabbitMQ cluster did not form:\n{logs}") from None
    return cluster


def running_members(node: Node) -> list[str]:
    """The running nodes that ``node`` sees in its cluster."""
    done = node.ctl("cluster_status", "--formatter", "json", timeout=30)
    return list(json.loads(done.stdout).get("running_nodes", []))


def _await_members(node: Node, names: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while sorted(running_members(node)) != sorted(names):
        if time.monotonic() > deadline:
            raise RuntimeError(f"cluster has {running_members(node)}, wanted {names}")
        time.sleep(0.5)


def _started(size: int, base: Path) -> Cluster:
    """``start_cluster`` or a skip with the reason (no RabbitMQ, or a node cannot start)."""
    missing = rabbitmq_missing()
    if missing:
        pytest.skip(missing)
    try:
        return start_cluster(size, base)
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"a private RabbitMQ node cannot start here: {error}")


@pytest.fixture
def rabbit_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One private RabbitMQ node (a broker the test may stop, restart or kill)."""
    cluster = _started(1, tmp_path_factory.mktemp("rabbit"))
    try:
        yield cluster.nodes[0]
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A private 3-node RabbitMQ cluster for the module (18 s to form idle, a minute loaded)."""
    cluster = _started(3, tmp_path_factory.mktemp("rabbit-cluster"))
    try:
        yield cluster
    finally:
        cluster.close()
