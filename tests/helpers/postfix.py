"""A private Postfix instance for tests: its own main.cf and master.cf, one loopback smtpd.

Postfix is the mail system most likely to drop mail into a maildefer maildir, so the
foreign-maildir tests let the real one deliver: ``postfix -c DIR start`` with a
configuration that accepts mail for one virtual domain on a free loopback port and hands it
to ``virtual(8)``, which writes each mailbox as a maildir (a mailbox path ending in ``/``).
Nothing leaves the machine: ``mydestination`` is empty, there is no relay, and the default
and relay transports are ``error:``. Postfix's own log goes to ``ROOT/maillog``
(``maillog_file``, Postfix >= 3.4), so a failing test can print it.

Postfix must be started as root, and needs the ``postfix`` user and the ``postdrop`` group
that Debian's package creates (``make system-deps`` installs it). :func:`missing` says why
an instance cannot run here; the caller skips with that reason.

Its files live under a fresh 0755 directory in ``/tmp``, not under pytest's ``tmp_path``
(``/tmp/pytest-of-root`` is 0700): Postfix's unprivileged daemons open ``data_directory``
and the mailboxes by absolute path, as the ``postfix`` user and as the mailbox owner.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

POSTFIX = Path("/usr/sbin/postfix")
DOMAIN = "example.test"

# chroot is "n" for every service: a chroot would need copies of /etc files in the queue
# directory (what Debian's init script does for the system instance).
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
virtual   unix - n n - - virtual
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
myhostname = postfix.{domain}
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost =
relay_domains =
default_transport = error:this test instance sends nothing out
relay_transport = error:this test instance sends nothing out
local_transport = error:this test instance has no local delivery
alias_maps =
alias_database =
local_recipient_maps =
smtpd_peername_lookup = no
biff = no
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = texthash:{root}/conf/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
"""


def missing() -> str | None:
    """Why a private Postfix cannot run here, or ``None`` when it can."""
    if not POSTFIX.exists():
        return f"Postfix is not installed ({POSTFIX}); `make system-deps` installs it"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    try:
        pwd.getpwnam("postfix")
        pwd.getpwnam("nobody")
        grp.getgrnam("postdrop")
    except KeyError as exc:
        return f"Postfix needs the user or group {exc}: install Debian's postfix package"
    return None


@dataclass
class Postfix:
    """A running private instance: where it listens, where it delivers, its log."""

    root: Path
    port: int

    @property
    def config_dir(self) -> Path:
        return self.root / "conf"

    def maildir(self, user: str) -> Path:
        """The maildir that ``virtual(8)`` writes for ``user@DOMAIN``."""
        return self.root / "mail" / user / "Maildir"

    def log(self) -> str:
        """Postfix's log so far (for an assertion message)."""
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else "(no maillog yet)"

    def pids(self) -> list[int]:
        """Every live process of this instance: those with our ``MAIL_CONFIG``.

        ``postfix -c DIR`` exports ``MAIL_CONFIG=DIR`` and master passes it on to each
        daemon it spawns, so this finds exactly this instance's processes by PID, never
        the system's or another test's Postfix.
        """
        marker = f"MAIL_CONFIG={self.config_dir}".encode()
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                environ = Path(entry.path, "environ").read_bytes()
                state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in environ.split(b"\0") and state != "Z":
                found.append(int(entry.name))
        return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _postfix(root: Path, command: str) -> subprocess.CompletedProcess[str]:
    # Postfix writes its errors to stderr only on a terminal; elsewhere they go to the
    # maillog, which the caller prints.
    return subprocess.run(
        [str(POSTFIX), "-c", str(root / "conf"), command],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@contextmanager
def running_postfix(users: list[str]) -> Iterator[Postfix]:
    """Start a private Postfix that delivers ``USER@example.test`` to a maildir per user.

    Stopped at the end with ``postfix -c DIR stop``; any of its processes still alive
    after that are killed by PID; then its directory is removed.
    """
    root = Path(tempfile.mkdtemp(prefix="maildefer-postfix-", dir="/tmp"))
    root.chmod(0o755)
    instance = Postfix(root, _free_port())
    nobody = pwd.getpwnam("nobody")
    try:
        for sub in ("conf", "queue", "mail"):
            (root / sub).mkdir(mode=0o755)
        # virtual(8) creates each maildir as the mailbox owner (virtual_uid_maps).
        os.chown(root / "mail", nobody.pw_uid, nobody.pw_gid)
        # A trailing "/" makes virtual(8) deliver in maildir format (virtual(8), "MAILBOX
        # DELIVERY"); texthash: needs no postmap.
        (root / "conf" / "vmailbox").write_text(
            "".join(f"{user}@{DOMAIN} {user}/Maildir/\n" for user in users)
        )
        (root / "conf" / "main.cf").write_text(
            _MAIN_CF.format(root=root, domain=DOMAIN, uid=nobody.pw_uid, gid=nobody.pw_gid)
        )
        (root / "conf" / "master.cf").write_text(_MASTER_CF.format(port=instance.port))
        started = _postfix(root, "start")
        assert started.returncode == 0, (
            f"postfix start failed ({started.returncode}): {started.stdout}{started.stderr}\n"
            f"{instance.log()}"
        )
        yield instance
    finally:
        _stop(instance)
        shutil.rmtree(root, ignore_errors=True)


def _stop(instance: Postfix) -> None:
    if instance.pids():
        _postfix(instance.root, "stop")
    deadline = time.monotonic() + 10
    while instance.pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in instance.pids():
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
