"""``maildefer status``: queue depths and ages, with a non-zero exit past thresholds.

For every ``[queues.*]`` maildir in the settings and for the undeliverable queue, it
reports how many messages wait in ``new/``, wait out a retry backoff in ``later/``, are
claimed by a worker in ``cur/``, how old the oldest waiting one is, and how many of the
queue's messages were buried as undeliverable. It lists directories only (``scandir``),
reads no message, and creates nothing, so a monitoring check may run it every minute.

Exit status: ``0`` every figure within its threshold; ``1`` a threshold was exceeded
(each breach printed on its own line, ``EXCEEDED ...``); ``2`` bad usage or settings.

Ages come from the maildir key (``<sec>.M<usec>...``: when it was first queued, so a
retried message counts from its first arrival), or the file's mtime for names made by
other programs.

Example:
    >>> import tempfile, pathlib
    >>> from maildefer.cli import main
    >>> root = pathlib.Path(tempfile.mkdtemp()); (root / "config").mkdir()
    >>> _ = (root / "config" / "settings.toml").write_text(
    ...     '[queues.posts]\\npath = "run/posts"\\n')
    >>> main(["status", "--config", str(root / "config" / "settings.toml"), "--max-depth", "5"])
    queue               new  delayed  claimed   oldest  undeliverable
    posts                 0        0        0        -              0
    (undeliverable)       0        0        0        -              -
    0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from maildefer.queue.maildir import MaildirQueue
from maildefer.queue.maildir.names import MaildirName
from maildefer.settings import Settings

UNDELIVERABLE = "(undeliverable)"
"""The row name of the undeliverable queue."""

EXIT_OK = 0
EXIT_EXCEEDED = 1


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
        >>> QueueReport("posts", "/q").new
        0
    """

    name: str
    path: str
    new: int = 0
    delayed: int = 0
    claimed: int = 0
    oldest_age: float | None = None
    undeliverable: int | None = 0


def key_time(filename: str) -> float | None:
    """When a message was queued, from its maildir key's ``<sec>.M<usec>`` part.

    Example:
        >>> key_time("1700000000.M250000P1Q1Rab.host,A=2")
        1700000000.25
        >>> key_time("mutt-dropped-file") is None
        True
    """
    sec, _, rest = MaildirName.parse(filename).key.partition(".")
    if not sec.isdigit():
        return None
    usec = rest[1:].partition("P")[0] if rest.startswith("M") else ""
    return int(sec) + (int(usec) / 1e6 if usec.isdigit() else 0.0)


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


def inspect_queue(name: str, queue: MaildirQueue, now: float | None = None) -> QueueReport:
    """Count one maildir queue's states and the age of its oldest waiting message.

    Example:
        >>> import asyncio, tempfile
        >>> q = MaildirQueue(tempfile.mkdtemp())
        >>> _ = asyncio.run(q.push(b"Subject: x\\n\\n"))
        >>> r = inspect_queue("posts", q); (r.new, r.claimed, r.oldest_age < 60)
        (1, 0, True)
    """
    now = time.time() if now is None else now
    new, earliest = _scan(queue.dir("new"))
    delayed, _ = _scan(queue.dir("later"))
    claimed, _ = _scan(queue.dir("cur"))
    age = None if earliest is None else max(0.0, now - earliest)
    return QueueReport(name, str(queue.path), new, delayed, claimed, age)


def _undeliverable_sources(dead: MaildirQueue) -> Counter[str]:
    """How many buried messages came from each queue path (their error records)."""
    sources: Counter[str] = Counter()
    for sub in ("new", "later", "cur"):
        try:
            with os.scandir(dead.dir(sub)) as it:
                keys = [MaildirName.parse(e.name).key for e in it if not e.name.startswith(".")]
        except FileNotFoundError:
            continue
        for key in keys:
            try:
                record = json.loads((dead.dir("errors") / f"{key}.json").read_bytes())
                sources[str(record.get("queue", ""))] += 1
            except (OSError, ValueError, AttributeError):
                sources[""] += 1  # dropped in by hand, or no record: origin unknown
    return sources


def collect(settings: Settings, now: float | None = None) -> list[QueueReport]:
    """Reports for every maildir queue in the settings, then the undeliverable queue.

    Broker (``amqp://``) queues are skipped: their depth is the broker's to report.

    Example:
        >>> [r.name for r in collect(Settings(queues={"posts": {"path": "/tmp/nope"}}))]
        ['posts', '(undeliverable)']
    """
    now = time.time() if now is None else now
    dead = MaildirQueue(settings.resolve(settings.undeliverable.path))
    sources = _undeliverable_sources(dead)
    reports = []
    for name, queue_settings in sorted(settings.queues.items()):
        if "://" in queue_settings.path:
            continue
        queue = MaildirQueue(settings.resolve(queue_settings.path))
        report = inspect_queue(name, queue, now)
        report.undeliverable = sources.get(str(queue.path), 0)
        reports.append(report)
    dead_report = inspect_queue(UNDELIVERABLE, dead, now)
    dead_report.undeliverable = None
    reports.append(dead_report)
    return reports


def breaches(
    reports: list[QueueReport],
    *,
    max_depth: int | None = None,
    max_age: float | None = None,
    max_undeliverable: int | None = None,
) -> list[str]:
    """One line per threshold exceeded (``--max-undeliverable`` is on the total).

    Example:
        >>> breaches([QueueReport("posts", "/q", new=9)], max_depth=5)
        ['posts: 9 messages waiting > --max-depth 5']
    """
    lines = []
    for r in reports:
        if r.name == UNDELIVERABLE:
            continue
        if max_depth is not None and r.new > max_depth:
            lines.append(f"{r.name}: {r.new} messages waiting > --max-depth {max_depth}")
        if max_age is not None and r.oldest_age is not None and r.oldest_age > max_age:
            lines.append(
                f"{r.name}: oldest waiting message {r.oldest_age:.0f}s old > --max-age {max_age:g}"
            )
    dead = next((r for r in reports if r.name == UNDELIVERABLE), None)
    if max_undeliverable is not None and dead is not None:
        total = dead.new + dead.delayed + dead.claimed
        if total > max_undeliverable:
            lines.append(
                f"{UNDELIVERABLE}: {total} messages > --max-undeliverable {max_undeliverable}"
            )
    return lines


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def render(reports: list[QueueReport], out: TextIO) -> None:
    """The human table.

    Example:
        >>> import io; buf = io.StringIO()
        >>> render([QueueReport("posts", "/q", new=2, oldest_age=3.0)], buf)
        >>> buf.getvalue().splitlines()[1].split()
        ['posts', '2', '0', '0', '3.0s', '0']
    """
    width = max([len("queue"), *(len(r.name) for r in reports)]) + 2
    print(
        f"{'queue':<{width}}{'new':>6}{'delayed':>9}{'claimed':>9}{'oldest':>9}"
        f"{'undeliverable':>15}",
        file=out,
    )
    for r in reports:
        dead = "-" if r.undeliverable is None else str(r.undeliverable)
        print(
            f"{r.name:<{width}}{r.new:>6}{r.delayed:>9}{r.claimed:>9}{_age(r.oldest_age):>9}"
            f"{dead:>15}",
            file=out,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``maildefer status``.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["--max-age", "600", "--json"]).max_age
        600.0
    """
    parser.add_argument(
        "--max-depth", type=int, default=None, metavar="N", help="alert when new/ holds more"
    )
    parser.add_argument(
        "--max-age",
        type=float,
        default=None,
        metavar="SECONDS",
        help="alert when the oldest waiting message is older",
    )
    parser.add_argument(
        "--max-undeliverable",
        type=int,
        default=None,
        metavar="N",
        help="alert when the undeliverable queue holds more",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Print the report; exit 1 when a threshold is exceeded.

    Example:
        >>> import tempfile
        >>> ns = argparse.Namespace(max_depth=None, max_age=None, max_undeliverable=0,
        ...                         json=True)
        >>> run(ns, Settings(root=Path(tempfile.mkdtemp())))  # doctest: +ELLIPSIS
        {"ok": true, ...}
        0
    """
    return report(args, settings, sys.stdout)


def report(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """:func:`run` writing to ``out``.

    Example:
        >>> import io, tempfile; buf = io.StringIO()
        >>> ns = argparse.Namespace(max_depth=0, max_age=None, max_undeliverable=None,
        ...                         json=False)
        >>> report(ns, Settings(root=Path(tempfile.mkdtemp())), buf)
        0
    """
    reports = collect(settings)
    exceeded = breaches(
        reports,
        max_depth=args.max_depth,
        max_age=args.max_age,
        max_undeliverable=args.max_undeliverable,
    )
    if args.json:
        document: dict[str, Any] = {
            "ok": not exceeded,
            "exceeded": exceeded,
            "queues": [asdict(r) for r in reports],
        }
        print(json.dumps(document), file=out)
    else:
        render(reports, out)
        for line in exceeded:
            print(f"EXCEEDED {line}", file=out)
    return EXIT_EXCEEDED if exceeded else EXIT_OK
