"""The disk guard: refuse new mail at MAIL FROM while a queue's filesystem is nearly full.

docs/reliability.md R8. Without it a full disk fails each push with ``ENOSPC`` at the very
end of DATA: the client has sent the whole message, the handlers have run, and the reply
is a ``451``. Postfix refuses earlier (``queue_minfree``, checked at MAIL FROM, with the
``SIZE=`` the client announced added); this does the same: below ``[server]
min_free_space`` bytes free on any filesystem holding a queue, ``MAIL FROM`` gets
``452 4.3.1`` (RFC 5321 section 4.5.3.1.9, "insufficient system storage"), and with
``SIZE=`` the message must fit on top of the threshold. Workers are not affected: they
drain by renaming and unlinking, which frees space, so the guard lifts by itself at the
next check once they (or the operator) have made room.

The check must cost ingest nothing measurable: each filesystem is ``statvfs``'d at most
once per ``interval`` (1 s); between refreshes a check is a clock read and a comparison.
Paths on the same filesystem (the same ``st_dev``) are measured once. A path that does not
exist yet (a queue created on its first push) is measured at its nearest existing parent,
which is where its files will be written.

Free space is ``f_bavail * f_frsize``: what an unprivileged process can still write.
Running as root, the filesystem's reserved blocks are still there, but the margin is the
operator's, not ours.

Example:
    >>> import io, tempfile
    >>> from maildefer import logs; logs.configure(stream=io.StringIO())
    >>> guard = DiskGuard([tempfile.gettempdir()], min_free=1)
    >>> guard.refusal(size=0) is None  # a temp dir has more than one byte free
    True
    >>> DiskGuard([tempfile.gettempdir()], min_free=2**62).refusal()
    '452 4.3.1 Error: insufficient system storage'
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import structlog

log = structlog.get_logger("maildefer.smtp")

REPLY_NO_SPACE = "452 4.3.1 Error: insufficient system storage"

DEFAULT_INTERVAL = 1.0
"""Seconds between two ``statvfs`` of the same filesystem (R8: "at most every 0.5-1 s")."""


def announced_size(mail_options: Sequence[str]) -> int:
    """The ``SIZE=`` a client announced at MAIL FROM (RFC 1870), or 0.

    aiosmtpd has already refused a ``SIZE`` that is not a number.

    Example:
        >>> announced_size(["BODY=8BITMIME", "SIZE=4096"]), announced_size([])
        (4096, 0)
    """
    for option in mail_options:
        if option[:5].upper() == "SIZE=" and option[5:].isdigit():
            return int(option[5:])
    return 0


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (``/`` at worst)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


class DiskGuard:
    """Free space on the queues' filesystems, measured at most once per ``interval``.

    Args:
        paths: the directories mail is written under (every maildir queue, the
            undeliverable queue, a spool directory); one per filesystem is measured.
        min_free: refuse below this many bytes free; ``0`` disables the guard.
        interval: seconds a measurement is reused.
        clock: the monotonic clock (a test's fake clock).
        statvfs: ``os.statvfs`` (a test's seam).

    Example:
        >>> import io, os, types
        >>> from maildefer import logs; logs.configure(stream=io.StringIO())
        >>> free = [10_000]
        >>> def fake_statvfs(path):
        ...     return types.SimpleNamespace(f_bavail=free[0], f_frsize=1)
        >>> now = [0.0]
        >>> guard = DiskGuard(["/"], min_free=5_000, clock=lambda: now[0], statvfs=fake_statvfs)
        >>> guard.refusal(size=4_000) is None, guard.refusal(size=6_000) is not None
        (True, True)
        >>> free[0] = 1_000; guard.refusal() is None  # cached: the same second
        True
        >>> now[0] = 1.5; guard.refusal()  # measured again
        '452 4.3.1 Error: insufficient system storage'
        >>> guard.low
        True
    """

    def __init__(
        self,
        paths: Iterable[str | Path],
        min_free: int,
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        statvfs: Callable[[Path], os.statvfs_result] = os.statvfs,
    ) -> None:
        self.min_free = min_free
        self.interval = interval
        self._clock = clock
        self._statvfs = statvfs
        self._paths = list(dict.fromkeys(Path(p) for p in paths))
        self._enabled = min_free > 0 and bool(self._paths)
        self._measured_at = -float("inf")
        self._free = 0
        self._where = ""
        self.low = False
        """Whether the last measurement was below ``min_free`` (logged when it changes)."""

    @property
    def enabled(self) -> bool:
        """Whether there is anything to guard (a threshold and at least one path).

        Example:
            >>> DiskGuard(["/"], min_free=0).enabled, DiskGuard([], min_free=1).enabled
            (False, False)
        """
        return self._enabled

    def free(self) -> int:
        """The fewest bytes free on any guarded filesystem (cached for ``interval``).

        Example:
            >>> DiskGuard(["/"], min_free=1).free() > 0
            True
        """
        now = self._clock()
        if now - self._measured_at >= self.interval:
            self._measure()
            self._measured_at = now
        return self._free

    def refusal(self, size: int = 0) -> str | None:
        """The ``452 4.3.1`` reply if a message of ``size`` bytes would not fit, else ``None``.

        ``size`` is what the client announced with ``SIZE=`` (0 if it did not): the
        message must fit above the threshold, as Postfix's ``queue_minfree`` check does.

        Example:
            >>> DiskGuard(["/"], min_free=0).refusal(size=2**62) is None  # disabled
            True
        """
        if not self._enabled:
            return None
        # free() inlined: this runs at every MAIL FROM.
        now = self._clock()
        if now - self._measured_at >= self.interval:
            self._measure()
            self._measured_at = now
        if self._free < self.min_free + size:
            return REPLY_NO_SPACE
        return None

    def _measure(self) -> None:
        """``statvfs`` each filesystem once; log when the guard trips and when it clears."""
        seen: set[int] = set()
        lowest: int | None = None
        where = ""
        for path in self._paths:
            target = _existing(path)
            try:
                device = target.stat().st_dev
                if device in seen:
                    continue
                seen.add(device)
                stats = self._statvfs(target)
            except OSError as exc:
                # Not measurable (removed, EIO): the push itself will say; refusing all
                # mail because one stat failed would turn a hiccup into an outage.
                log.warning("disk_check_failed", path=str(target), error=str(exc))
                continue
            free = stats.f_bavail * stats.f_frsize
            if lowest is None or free < lowest:
                lowest, where = free, str(target)
        if lowest is None:
            self._free = self.min_free + 2**62  # nothing measured: do not refuse
            return
        self._free, self._where = lowest, where
        low = lowest < self.min_free
        if low and not self.low:
            log.warning("disk_low", path=where, free=lowest, min_free=self.min_free)
        elif self.low and not low:
            log.info("disk_ok", path=where, free=lowest, min_free=self.min_free)
        self.low = low
