"""A private Postfix for ``bench_ingest.py``: queue durably, then discard (the ingest anchor).

Postfix is what an operator would otherwise put in front of a script, so its ingest rate is
the figure maildefer has to match. This starts one instance of Debian's Postfix with its
own ``main.cf``/``master.cf`` (``postfix -c DIR start-fg``): one ``smtpd`` on a free
loopback port, ``mynetworks = 127.0.0.0/8`` (so smtp-source may relay), ``mydestination``
empty, no local delivery, and ``default_transport = relay_transport = discard:``: each
message is written to Postfix's queue and then dropped by ``discard(8)``. Nothing leaves
the machine. Durability is close to maildefer's, not the same: ``cleanup`` fsyncs each queue
file before smtpd says 250 (seen with ``strace -f -e fsync``: one ``fsync`` per message)
but never fsyncs a queue directory, where maildefer's push also flushes ``new/``.

The same recipe as ``tests/helpers/postfix.py`` (the bench does not import tests): files
under a fresh 0755 directory in ``/tmp`` (Postfix's unprivileged daemons open
``data_directory`` by absolute path), every service unchrooted, the log in
``DIR/maillog``. Postfix must be started as root and needs the ``postfix`` user and the
``postdrop`` group (Debian's package; ``make bench-deps`` installs it); :func:`missing`
says why it cannot run. Stopped with ``postfix -c DIR stop``; whatever of this instance
still lives after that (found by the ``MAIL_CONFIG`` that master passes to its children)
is killed by PID, never by name.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

POSTFIX = Path("/usr/sbin/postfix")

_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
myhostname = postfix.bench.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost =
relay_domains =
default_transport = discard:bench
relay_transport = discard:bench
local_transport = error:this bench instance has no local delivery
alias_maps =
alias_database =
local_recipient_maps =
smtpd_peername_lookup = no
biff = no
"""


def die_with_parent() -> None:
    """``preexec_fn``: SIGKILL this child when the bench process dies.

    ``bench/run.py`` kills a bench that overruns its timeout with SIGKILL, which runs no
    ``finally``: without this its servers (and Postfix's master) would outlive it.
    """
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def missing() -> str | None:
    """Why a private Postfix cannot run here, or ``None`` when it can."""
    if not POSTFIX.exists():
        return f"Postfix is not installed ({POSTFIX}); `make bench-deps` installs it"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError as exc:
        return f"Postfix needs the user or group {exc}: install Debian's postfix package"
    return None


class PostfixInstance:
    """One running private Postfix: :meth:`start`, then ``port``; :meth:`stop` at the end.

    Args:
        port: the loopback port its smtpd listens on.
    """

    def __init__(self, port: int, root: Path | None = None) -> None:
        self.port = port
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="bench-postfix-", dir="/tmp"))
            root.chmod(0o755)
        self.root = root
        self.master: subprocess.Popen[bytes] | None = None
        self._reaper: subprocess.Popen[bytes] | None = None

    @property
    def config_dir(self) -> Path:
        return self.root / "conf"

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no maillog)"

    def start(self, within: float = 30.0) -> None:
        """Write the configuration, start master in the foreground, wait for a 220."""
        # data_directory is left to Postfix: it must be owned by the postfix user.
        for sub in ("conf", "queue"):
            (self.root / sub).mkdir(mode=0o755)
        (self.config_dir / "main.cf").write_text(_MAIN_CF.format(root=self.root))
        (self.config_dir / "master.cf").write_text(_MASTER_CF.format(port=self.port))
        # postfix-script forks master (no exec), so no death signal set here would reach
        # it: a reaper waits for EOF on a pipe from this process and stops the instance
        # then, so a bench killed by run.py's timeout leaves no Postfix behind. A normal
        # stop() leaves it nothing to do.
        self._reaper = subprocess.Popen(
            [sys.executable, __file__, "--reap", str(self.root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        self.master = subprocess.Popen(
            [str(POSTFIX), "-c", str(self.config_dir), "start-fg"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.master.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                    if sock.recv(512).startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        return
            except OSError:
                time.sleep(0.05)
        log = self.log()
        self.stop()
        raise RuntimeError(f"postfix did not start:\n{log}")

    def pids(self) -> list[int]:
        """Every live process of this instance: those whose environment has our MAIL_CONFIG."""
        marker = f"MAIL_CONFIG={self.config_dir}".encode()
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                environ = Path(entry.path, "environ").read_bytes()
                state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if marker in environ.split(b"\0") and state != "Z":
                found.append(int(entry.name))
        return found

    def stop(self) -> None:
        """``postfix stop``, then SIGKILL by PID whatever is left; remove its directory."""
        if self.pids():
            subprocess.run(
                [str(POSTFIX), "-c", str(self.config_dir), "stop"],
                capture_output=True,
                timeout=30,
                check=False,
            )
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self.pids():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.master is not None:
            if self.master.poll() is None:
                self.master.kill()
            self.master.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
        if self._reaper is not None and self._reaper.stdin is not None:
            self._reaper.stdin.close()
            self._reaper.wait(timeout=30)


def _reap(root: Path) -> None:
    """The reaper: block until the bench's pipe closes (it stopped, or died), then clean up."""
    sys.stdin.buffer.read()
    if root.exists():
        PostfixInstance(0, root).stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--reap"]:
        _reap(Path(sys.argv[2]))
