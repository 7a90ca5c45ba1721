"""The reading side of maildir queues: depths, ages and where buried messages came from.

``maildefer status`` and the Prometheus collector (:mod:`maildefer.ops.metrics`) both
read their figures here. Everything lists directories only (``scandir``), reads no
message, and creates nothing, so a monitoring check may run it every minute.

Ages come from the maildir key (``<sec>.M<usec>...``: when it was first queued, so a
retried message counts from its first arrival), or the file's mtime for names made by
other programs.

Example:
    >>> import asyncio, tempfile
    >>> from maildefer.queue.maildir import MaildirQueue
    >>> q = MaildirQueue(tempfile.mkdtemp())
    >>> _ = asyncio.run(q.push(b"Subject: x\\n\\n"))
    >>> r = inspect_queue("posts", q); (r.new, r.claimed, r.oldest_age < 60)
    (1, 0, True)
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from maildefer.queue.keys import key_time
from maildefer.queue.maildir.names import MaildirName
from maildefer.queue.maildir.store import STATE_DIRS, MaildirStore
from maildefer.settings import Settings

UNDELIVERABLE = "(undeliverable)"
"""The report name of the undeliverable queue."""


@dataclass
class QueueReport:
    """One queue's figures.

    Attributes:
        name: the ``[queues.NAME]`` table name (or ``(undeliverable)``).
        path: the queue directory.
        new: messages waiting to be claimed.
        delayed: messages waiting out a retry backoff (``later/``).
        claimed: messages a worker holds (``cur/``).
        oldest_age: seconds since the oldest message in ``new/`` was queued, or ``None``.
        undeliverable: this queue's messages in the undeliverable queue (``None`` for the
            undeliverable queue itself).

    Example:
        >>> r = QueueReport("posts", "/q", new=3, delayed=1)
        >>> r.new + r.delayed + r.claimed, r.oldest_age
        (4, None)
    """

    name: str
    path: str
    new: int = 0
    delayed: int = 0
    claimed: int = 0
    oldest_age: float | None = None
    undeliverable: int | None = 0


def _scan(folder: Path) -> tuple[int, float | None]:
    """Message count of one directory, and the earliest queue time among them."""
    count, earliest = 0, None
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue  # maildir readers skip dot-files (in-progress writes)
                when = key_time(entry.name)
                if when is None:
                    try:
                        when = entry.stat().st_mtime
                    except FileNotFoundError:
                        continue  # claimed or removed while we looked
                count += 1
                earliest = when if earliest is None else min(earliest, when)
    except FileNotFoundError:
        pass  # queues are created on first use: not there yet means empty
    return count, earliest


def inspect_queue(name: str, queue: MaildirStore, now: float | None = None) -> QueueReport:
    """Count one maildir queue's states and the age of its oldest waiting message.

    Args:
        name: the report's name for it.
        queue: the queue (a :class:`~maildefer.queue.maildir.MaildirQueue` or a bare
            store); nothing is created when its directories do not exist.
        now: the time ages are measured at (default: now).

    See the module example.
    """
    now = time.time() if now is None else now
    new, earliest = _scan(queue.dir("new"))
    delayed, _ = _scan(queue.dir("later"))
    claimed, _ = _scan(queue.dir("cur"))
    age = None if earliest is None else max(0.0, now - earliest)
    return QueueReport(name, str(queue.path), new, delayed, claimed, age)


def undeliverable_sources(dead: MaildirStore) -> Counter[str]:
    """How many buried messages came from each queue path (their error records).

    Messages with no record (dropped in by hand) count under ``""``.

    Example:
        >>> import tempfile; dead = MaildirStore(tempfile.mkdtemp()); dead.ensure()
        >>> for key in ("a", "b", "c"): _ = (dead.dir("new") / key).write_bytes(b"")
        >>> for key in ("a", "b"): dead.write_error_record(key, {"queue": "/q"}, sync=False)
        >>> sorted(undeliverable_sources(dead).items())
        [('', 1), ('/q', 2)]
    """
    sources: Counter[str] = Counter()
    for sub in STATE_DIRS:
        try:
            with os.scandir(dead.dir(sub)) as it:
                keys = [MaildirName.parse(e.name).key for e in it if not e.name.startswith(".")]
        except FileNotFoundError:
            continue
        for key in keys:
            record = dead.error_record(key)
            sources["" if record is None else str(record.get("queue", ""))] += 1
    return sources


def collect(settings: Settings, now: float | None = None) -> list[QueueReport]:
    """Reports for every maildir queue in the settings, then the undeliverable queue.

    Broker (``amqp://``) queues are skipped: their depth is the broker's to report.

    Example:
        >>> [r.name for r in collect(Settings(queues={"posts": {"path": "/tmp/nope"}}))]
        ['posts', '(undeliverable)']
    """
    now = time.time() if now is None else now
    dead = MaildirStore(settings.resolve(settings.undeliverable.path))
    sources = undeliverable_sources(dead)
    reports = []
    for name, queue_settings in sorted(settings.queues.items()):
        if "://" in queue_settings.path:
            continue
        queue = MaildirStore(settings.resolve(queue_settings.path))
        report = inspect_queue(name, queue, now)
        report.undeliverable = sources.get(str(queue.path), 0)
        reports.append(report)
    dead_report = inspect_queue(UNDELIVERABLE, dead, now)
    dead_report.undeliverable = None
    reports.append(dead_report)
    return reports
