"""systemd integration: ``sd_notify``, the watchdog, and socket activation (stdlib only).

maildefer runs in the foreground under systemd instead of daemonising with pid files
(``docs/architecture.md``). This module speaks the three small protocols that needs,
without libsystemd:

- **notify** (sd_notify(3)): datagrams such as ``READY=1``, ``STATUS=...``, ``STOPPING=1``
  and ``WATCHDOG=1`` sent to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``; a name
  starting with ``@`` is in the abstract namespace.
- **watchdog** (sd_watchdog_enabled(3)): ``$WATCHDOG_USEC`` is the timeout, honoured only
  when ``$WATCHDOG_PID`` is unset or our pid; :func:`run_watchdog` pings at half of it
  *from the event loop*, so a loop that hangs stops pinging and systemd restarts it.
- **socket activation** (sd_listen_fds(3)): ``$LISTEN_FDS`` descriptors from fd 3 on,
  valid only when ``$LISTEN_PID`` is our pid, named by ``$LISTEN_FDNAMES``.

Everything is a no-op outside systemd: no ``NOTIFY_SOCKET`` means :class:`Notifier`
sends nothing and :func:`listen_fds` returns ``[]``. Nothing happens at import time; the
environment is read when asked, from the mapping passed in (``os.environ`` by default).

Example:
    >>> n = Notifier.from_environ({})
    >>> n.enabled, n.ready(), n.watchdog_interval
    (False, False, None)
    >>> listen_fds({})
    []
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

LISTEN_FDS_START = 3
"""The first descriptor passed by socket activation (``SD_LISTEN_FDS_START``)."""

_SEND_TIMEOUT = 1.0
"""Seconds a notification may block; the manager's queue is large, so only a stuck
manager makes us wait, and the event loop must not wait on it for long."""


def _own_pid(value: str | None, pid: int) -> bool:
    """``$LISTEN_PID``/``$WATCHDOG_PID`` semantics: the variable names this process."""
    if value is None:
        return False
    try:
        return int(value) == pid
    except ValueError:
        return False


def _socket_address(name: str) -> str | bytes | None:
    """The ``AF_UNIX`` address of ``$NOTIFY_SOCKET``: a path, or an abstract name."""
    if name.startswith("/"):
        return name
    if name.startswith("@") and len(name) > 1:
        # Linux abstract namespace: the leading NUL byte replaces the '@' (sd_notify(3)).
        return b"\0" + name[1:].encode()
    return None  # vsock: and other transports of newer systemd are not for us


@dataclass(frozen=True)
class Notifier:
    """Sends state changes to the service manager; does nothing when there is none.

    Build it with :meth:`from_environ`. Every method returns whether a datagram was
    sent, and never raises: a daemon must not die because its supervisor went away.

    Attributes:
        address: the notify socket address (``None``: not under systemd).
        watchdog_usec: the watchdog timeout in microseconds, when it is ours to ping.

    Example:
        >>> n = Notifier.from_environ({"WATCHDOG_USEC": "30000000"}, pid=1)
        >>> n.watchdog_interval
        15.0
        >>> n.status("3 in flight")
        False
    """

    address: str | bytes | None = None
    watchdog_usec: int | None = None

    @classmethod
    def from_environ(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        pid: int | None = None,
        unset: bool = False,
    ) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        Args:
            environ: the environment (``os.environ`` by default).
            pid: this process's pid (``os.getpid()`` by default).
            unset: remove the three variables afterwards, so child processes (a handler's
                ``sendmail``) do not inherit them (``unset_environment`` of sd_notify(3)).

        Example:
            >>> env = {"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "100", "WATCHDOG_PID": "7"}
            >>> n = Notifier.from_environ(env, pid=8, unset=True)
            >>> n.address, n.watchdog_usec, env
            (b'\\x00sd', None, {})
        """
        env = os.environ if environ is None else environ
        me = os.getpid() if pid is None else pid
        address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        usec: int | None = None
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            usec = None
        if usec is not None and usec <= 0:
            usec = None
        owner = env.get("WATCHDOG_PID")
        if owner is not None and not _own_pid(owner, me):
            usec = None  # meant for another process of the service (sd_watchdog_enabled)
        if unset:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(name, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens.

        Example:
            >>> Notifier("/run/systemd/notify").enabled
            True
        """
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings: half the timeout, or ``None`` if disabled.

        Example:
            >>> Notifier(watchdog_usec=2_000_000).watchdog_interval
            1.0
        """
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines in one datagram.

        Example:
            >>> Notifier().notify("READY=1", "STATUS=up")
            False
        """
        if self.address is None or not fields:
            return False
        # Newlines end a field: a status text must not smuggle in READY=1 or MAINPID=.
        payload = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(_SEND_TIMEOUT)
                s.sendto(payload, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: the socket is bound (serve) or the watcher armed (worker).

        Example:
            >>> Notifier().ready("listening on 127.0.0.1:25")
            False
        """
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line shown by ``systemctl status``.

        Example:
            >>> Notifier().status("42 handled, 3 in flight")
            False
        """
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun (draining in-flight work).

        Example:
            >>> Notifier().stopping()
            False
        """
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: one keep-alive ping (only if the watchdog is ours).

        Example:
            >>> Notifier("/nonexistent/notify").watchdog()
            False
        """
        if self.watchdog_usec is None:
            return False
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for more time to start or stop (a long drain).

        Example:
            >>> Notifier().extend_timeout(30)
            False
        """
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1e6))}")


async def run_watchdog(notifier: Notifier, healthy: Callable[[], bool] | None = None) -> None:
    """Ping ``WATCHDOG=1`` from the event loop at half the watchdog timeout, forever.

    Run it as a task and cancel it on shutdown. Because the pings come from the loop
    itself, a blocked or livelocked loop stops pinging and systemd restarts the service
    (``WatchdogSec=``). Returns at once when the watchdog is not enabled.

    Args:
        notifier: where pings go.
        healthy: optional check; while it returns ``False`` no ping is sent, so a part
            that is stuck (a dead file watcher) also gets the process restarted.

    Example:
        >>> asyncio.run(run_watchdog(Notifier()))  # no watchdog: returns at once
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    while True:
        if healthy is None or healthy():
            notifier.watchdog()
        await asyncio.sleep(interval)


async def run_status(
    notifier: Notifier, describe: Callable[[], str], interval: float = 5.0
) -> None:
    """Send ``STATUS=describe()`` every ``interval`` seconds when it changed, forever.

    Example:
        >>> asyncio.run(run_status(Notifier(), lambda: "idle"))  # no manager: returns
    """
    if not notifier.enabled:
        return
    last = None
    while True:
        text = describe()
        if text != last:
            notifier.status(text)
            last = text
        await asyncio.sleep(interval)


def listen_fds_with_names(
    environ: MutableMapping[str, str] | None = None,
    *,
    pid: int | None = None,
    unset: bool = True,
) -> list[tuple[str, socket.socket]]:
    """The sockets passed by socket activation, with their ``FileDescriptorName=``.

    Reads ``LISTEN_FDS`` (valid only if ``LISTEN_PID`` is this process), wraps fds
    3, 4, ... as :class:`socket.socket` objects (family and type read from the kernel)
    and marks them close-on-exec, as sd_listen_fds(3) does. ``LISTEN_FDNAMES`` is a
    colon-separated list; a missing name is ``"unknown"``. Descriptors that are not
    sockets (``ListenFIFO=``) are skipped.

    Args:
        environ: the environment (``os.environ`` by default).
        pid: this process's pid (``os.getpid()`` by default).
        unset: remove the three variables afterwards, so that a child process does not
            take the descriptors for its own (sd_listen_fds(3) ``unset_environment``).

    Example:
        >>> env = {"LISTEN_FDS": "1", "LISTEN_PID": "1"}
        >>> listen_fds_with_names(env, pid=2), env  # not ours: ignored, and unset
        ([], {})
    """
    env = os.environ if environ is None else environ
    me = os.getpid() if pid is None else pid
    count_text = env.get("LISTEN_FDS")
    names_text = env.get("LISTEN_FDNAMES")
    ours = _own_pid(env.get("LISTEN_PID"), me)
    if unset:
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(name, None)
    if not ours or count_text is None:
        return []
    try:
        count = int(count_text)
    except ValueError:
        return []
    names = names_text.split(":") if names_text else []
    result: list[tuple[str, socket.socket]] = []
    for index in range(max(0, count)):
        fd = LISTEN_FDS_START + index
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue  # not a socket (or already closed): nothing we could listen on
        sock.set_inheritable(False)
        result.append((names[index] if index < len(names) else "unknown", sock))
    return result


def listen_fds(
    environ: MutableMapping[str, str] | None = None,
    *,
    pid: int | None = None,
    unset: bool = True,
) -> list[socket.socket]:
    """The sockets passed by socket activation, in the order of the ``.socket`` unit.

    ``serve`` hands them to ``loop.create_server(sock=...)`` instead of binding, so port
    25 needs no root. See :func:`listen_fds_with_names` for the rules.

    Example:
        >>> listen_fds({"LISTEN_FDS": "0", "LISTEN_PID": str(os.getpid())})
        []
    """
    return [sock for _, sock in listen_fds_with_names(environ, pid=pid, unset=unset)]
