"""Recovery of a maildir queue: dead workers' claims, tmp/ debris, retries come due.

A claim in ``cur/`` names its worker (``,W=<host>~<pid>~<start>``). On this host the
worker is alive exactly when a process with that pid has that start time (a pid alone
is reused by the kernel); another host's claim is alive while its file's mtime is within
the lease (:meth:`~maildefer.queue.maildir.MaildirQueue.touch` renews it). A dead
worker's claim goes back to ``new/`` with an attempt and a recovery counted; a message
that killed its worker ``max_recoveries`` times is quarantined (buried as poison) by the
callback the queue passes in (docs/reliability.md R10, R11).

The functions take directories and policy, not the queue, so the queue module can
import this one and not the other way round.

Example:
    >>> import os, tempfile; from pathlib import Path
    >>> q = Path(tempfile.mkdtemp())
    >>> for sub in ("new", "later", "cur"): (q / sub).mkdir()
    >>> dead = Owner("mx", 2**22 + 1, "1").token()  # a pid no process has
    >>> _ = (q / "cur" / f"1700000000.M1P2Q3R4.mx,W={dead}").write_bytes(b"\\n")
    >>> recover_claims(q, "mx", lease=600, max_recoveries=3, quarantine=print)
    (1, 0)
    >>> os.listdir(q / "new")
    ['1700000000.M1P2Q3R4.mx,R=1,A=1']
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from maildefer.queue.maildir.names import MaildirName
from maildefer.queue.maildir.writer import unlink_quietly

TMP_MAX_AGE = 36 * 3600.0
"""tmp/ files untouched this long are debris of a crashed writer (qmail's maildir(5))."""

# The names NameGenerator makes: which process on which host is writing a tmp/ file.
_TMP_NAME = re.compile(r"\d+\.M\d+P(?P<pid>\d+)Q\d+R[0-9a-f]+\.(?P<host>.+)")

Quarantine = Callable[[MaildirName, Path, str], None]
"""Bury a claimed file as poison: ``(its name without the owner, its path, the error)``."""


def process_start(pid: int) -> str | None:
    """The start time of a process in clock ticks since boot, or ``None`` if it is gone.

    A pid alone is reused by the kernel; pid plus start time names one process.

    Example:
        >>> process_start(os.getpid()) == process_start(os.getpid()) is not None
        True
        >>> process_start(2**22 + 1) is None  # above the kernel's pid_max
        True
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so split after its ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None


@dataclass(frozen=True)
class Owner:
    """The worker a claim names: its (escaped) host, pid and process start time.

    Example:
        >>> Owner.parse("mx~12~345")
        Owner(host='mx', pid=12, start='345')
        >>> Owner.parse("mx~12~345").token(), Owner.parse("no-pid")
        ('mx~12~345', None)
    """

    host: str
    pid: int
    start: str

    @classmethod
    def parse(cls, value: str) -> Owner | None:
        """The owner in a ``W=`` field, or ``None`` if it is not one of ours."""
        host, _, rest = value.rpartition("~")
        host, _, pid = host.rpartition("~")
        if not host or not pid.isdigit():
            return None
        return cls(host, int(pid), rest)

    @classmethod
    def current(cls, host: str) -> Owner:
        """This process as a claim owner on ``host`` (an escaped host name).

        Example:
            >>> me = Owner.current("mx")
            >>> (me.pid, me.start) == (os.getpid(), process_start(os.getpid()))
            True
        """
        pid = os.getpid()
        return cls(host, pid, process_start(pid) or "0")

    def token(self) -> str:
        """The ``W=`` field value naming this owner."""
        return f"{self.host}~{self.pid}~{self.start}"


def promote_due(path: Path, now: float | None = None) -> tuple[int, float | None]:
    """Move messages whose backoff is over from ``later/`` to ``new/``.

    Args:
        path: the queue directory.
        now: the time to compare the ``,T=`` fields with (default: now).

    Returns:
        How many were moved, and the seconds until the next one is due (``None`` if
        none waits).

    Example:
        >>> import tempfile; q = Path(tempfile.mkdtemp())
        >>> for sub in ("new", "later"): (q / sub).mkdir()
        >>> for due in (1000, 5000): _ = (q / "later" / f"k{due},A=1,T={due}").write_bytes(b"")
        >>> promote_due(q, now=2.0), os.listdir(q / "new")
        ((1, 3.0), ['k1000,A=1'])
    """
    now_ms = int((time.time() if now is None else now) * 1000)
    moved, next_due = 0, None
    with os.scandir(path / "later") as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            name = MaildirName.parse(entry.name)
            if name.due_ms <= now_ms:
                try:
                    os.rename(entry.path, path / "new" / name.with_fields(T=None).filename)
                    moved += 1
                except FileNotFoundError:
                    continue  # another worker promoted it
            else:
                wait = (name.due_ms - now_ms) / 1000
                next_due = wait if next_due is None else min(next_due, wait)
    return moved, next_due


def recover_claims(
    path: Path,
    host: str,
    *,
    lease: float,
    max_recoveries: int,
    quarantine: Quarantine,
    now: float | None = None,
) -> tuple[int, int]:
    """Return dead workers' claims in ``cur/`` to ``new/``; quarantine repeat killers.

    Args:
        path: the queue directory.
        host: this host's escaped name (claims of other hosts use the lease).
        lease: seconds another host's claim stays alive untouched.
        max_recoveries: recoveries after which a message is quarantined.
        quarantine: buries a message as poison (may raise ``FileNotFoundError`` when
            another worker got to it first).
        now: the time to compare mtimes with (default: now).

    Returns:
        How many claims went back to ``new/``, and how many were quarantined (see the
        module example).
    """
    now = time.time() if now is None else now
    returned = quarantined = 0
    with os.scandir(path / "cur") as it:
        entries = [e for e in it if not e.name.startswith(".")]
    for entry in entries:
        name = MaildirName.parse(entry.name)
        owner_field = name.field("W")
        if owner_field is None:
            continue  # a maildir reader's message, not a claim of ours
        owner = Owner.parse(owner_field)
        if owner is not None and owner.host == host:
            if process_start(owner.pid) == owner.start:
                continue  # the claimer is alive
        else:
            try:
                if now - entry.stat().st_mtime < lease:
                    continue  # another host's claim, lease still running
            except FileNotFoundError:
                continue
        recoveries = name.recoveries + 1
        back = name.with_fields(W=None, R=recoveries, A=name.attempts + 1)
        if recoveries >= max_recoveries:
            msg = f"worker died {recoveries} times while handling it; quarantined"
            try:
                quarantine(back, Path(entry.path), msg)
            except FileNotFoundError:
                continue
            quarantined += 1
        else:
            try:
                os.rename(entry.path, path / "new" / back.filename)
            except FileNotFoundError:
                continue  # another worker recovered it first
            returned += 1
    return returned, quarantined


def clean_tmp(tmp: Path, host: str, now: float | None = None) -> int:
    """Delete tmp/ files no writer will finish; returns how many.

    Any file untouched for 36 h goes (qmail's rule, for any program's files). Our own
    files go at once when the name says they were written on this host by a process
    that is gone: a push killed mid-write (SIGKILL of serve) never comes back for it.

    Args:
        tmp: the queue's ``tmp/`` directory.
        host: this host's escaped name, as in the keys it writes.
        now: the time to compare mtimes with (default: now).

    Example:
        >>> import tempfile; tmp = Path(tempfile.mkdtemp())
        >>> _ = (tmp / f"1.M1P{os.getpid()}Q1R0f.mx").write_bytes(b"")  # a live writer
        >>> _ = (tmp / "1.M1P4194305Q1R0f.mx").write_bytes(b"")  # no such pid
        >>> _ = (tmp / "elsewhere").write_bytes(b"")
        >>> clean_tmp(tmp, "mx"), len(os.listdir(tmp))
        (1, 2)
        >>> clean_tmp(tmp, "mx", now=time.time() + TMP_MAX_AGE + 1)  # 36 h on
        1
    """
    now = time.time() if now is None else now
    removed = 0
    with os.scandir(tmp) as it:
        for entry in it:
            writer = _TMP_NAME.match(entry.name)
            if writer is not None and writer["host"] == host:
                if not os.path.exists(f"/proc/{writer['pid']}"):
                    unlink_quietly(entry.path)
                    removed += 1
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if now - max(st.st_mtime, st.st_atime) >= TMP_MAX_AGE:
                unlink_quietly(Path(entry.path))
                removed += 1
    return removed
