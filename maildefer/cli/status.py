"""``maildefer status``: queue depths and ages, with a non-zero exit past thresholds.

For every ``[queues.*]`` maildir in the settings and for the undeliverable queue, it
reports how many messages wait in ``new/``, wait out a retry backoff in ``later/``, are
claimed by a worker in ``cur/``, how old the oldest waiting one is, and how many of the
queue's messages were buried as undeliverable. It lists directories only, reads no
message, and creates nothing, so a monitoring check may run it every minute.

A queue on ``amqp://`` gets its figures from the broker (a passive declare of each of its
queues, nothing created): ready messages as ``new``, its delay queues as ``delayed``, its
undeliverable queue's depth; ``claimed`` and ``oldest`` are ``-`` (the broker does not
report them over AMQP). A broker that cannot be reached is shown in the queue's row.

Exit status: ``0`` every figure within its threshold; ``1`` a threshold was exceeded
(each breach printed on its own line, ``EXCEEDED ...``), or a threshold was given and a
queue's figures could not be read (``FAILED ...``: its broker is unreachable; without a
threshold the report alone never fails); ``2`` bad usage or settings.

The figures come from :mod:`maildefer.queue.maildir.inspect` (shared with the metrics
collector) and :mod:`maildefer.queue.amqp.admin`; this module adds the thresholds and the
rendering.

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
import asyncio
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from maildefer.errors import MaildeferError
from maildefer.queue.config import queue_options
from maildefer.queue.maildir.inspect import UNDELIVERABLE, QueueReport, collect
from maildefer.settings import Settings

EXIT_OK = 0
EXIT_EXCEEDED = 1
BROKER_TIMEOUT = 5.0
"""Seconds ``status`` waits for each amqp queue's broker (a check must not hang)."""


@dataclass
class BrokerReport:
    """One amqp queue's figures, or why they could not be read.

    Attributes:
        name: the ``[queues.NAME]`` table name.
        path: the queue's URL, password hidden.
        new: messages ready in the queue.
        delayed: messages in its delay queues.
        undeliverable: messages in its undeliverable queue.
        error: why the broker could not be read (the figures are then 0), or ``None``.

    Example:
        >>> BrokerReport("remote", "amqp://h/?queue=r", new=2).error is None
        True
    """

    name: str
    path: str
    new: int = 0
    delayed: int = 0
    undeliverable: int = 0
    error: str | None = None
    claimed: None = None
    oldest_age: None = None
    backend: str = "amqp"


async def _broker_report(name: str, settings: Settings) -> BrokerReport:
    # Imported here: a maildir-only project never imports the broker client.
    from maildefer.queue.amqp.admin import AmqpAdmin, redact

    url = settings.queues[name].path
    admin = AmqpAdmin(
        url,
        # As the worker's backend gets it (maildefer.queue.config.backend_for).
        undeliverable=settings.undeliverable_ref(),
        options=queue_options(settings.queues[name]),
        connect_timeout=BROKER_TIMEOUT,
    )
    try:
        counts = await admin.counts()
    except MaildeferError as exc:
        return BrokerReport(name, redact(url), error=redact(str(exc)))
    finally:
        await admin.close()
    return BrokerReport(name, redact(url), counts.ready, counts.delayed, counts.undeliverable)


def collect_brokers(settings: Settings) -> list[BrokerReport]:
    """Reports of every amqp queue in the settings, read from their brokers at once.

    Example:
        >>> collect_brokers(Settings(queues={"posts": {"path": "/tmp/nope"}}))
        []
    """
    names = sorted(n for n, q in settings.queues.items() if q.path.startswith("amqp"))
    if not names:
        return []

    async def gather() -> list[BrokerReport]:
        return list(await asyncio.gather(*(_broker_report(n, settings) for n in names)))

    return asyncio.run(gather())


def broker_breaches(
    reports: list[BrokerReport],
    *,
    max_depth: int | None = None,
    max_undeliverable: int | None = None,
) -> tuple[list[str], list[str]]:
    """Thresholds exceeded by amqp queues, and the queues that could not be read.

    ``--max-undeliverable`` applies to each amqp queue's own undeliverable queue.

    Example:
        >>> ok = BrokerReport("a", "u", new=9, undeliverable=1)
        >>> down = BrokerReport("b", "u", error="b: cannot connect to the broker")
        >>> broker_breaches([ok, down], max_depth=5, max_undeliverable=0)
        (['a: 9 messages waiting > --max-depth 5', 'a: 1 messages undeliverable > \
--max-undeliverable 0'], ['b: cannot reach the broker (b: cannot connect to the broker)'])
    """
    exceeded, failed = [], []
    for r in reports:
        if r.error is not None:
            failed.append(f"{r.name}: cannot reach the broker ({r.error})")
            continue
        if max_depth is not None and r.new > max_depth:
            exceeded.append(f"{r.name}: {r.new} messages waiting > --max-depth {max_depth}")
        if max_undeliverable is not None and r.undeliverable > max_undeliverable:
            exceeded.append(
                f"{r.name}: {r.undeliverable} messages undeliverable > --max-undeliverable "
                f"{max_undeliverable}"
            )
    return exceeded, failed


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


def render(
    reports: list[QueueReport], out: TextIO, brokers: list[BrokerReport] | None = None
) -> None:
    """The human table: maildir queues, then amqp queues, then the undeliverable queue.

    Example:
        >>> import io; buf = io.StringIO()
        >>> render([QueueReport("posts", "/q", new=2, oldest_age=3.0)], buf,
        ...        [BrokerReport("remote", "u", new=1), BrokerReport("down", "u", error="x")])
        >>> [line.split() for line in buf.getvalue().splitlines()[1:]]
        [['posts', '2', '0', '0', '3.0s', '0'], ['remote', '1', '0', '-', '-', '0'], \
['down', 'unreachable:', 'x']]
    """
    brokers = brokers or []
    names = [r.name for r in reports] + [b.name for b in brokers]
    width = max([len("queue"), *(len(name) for name in names)]) + 2
    print(
        f"{'queue':<{width}}{'new':>6}{'delayed':>9}{'claimed':>9}{'oldest':>9}"
        f"{'undeliverable':>15}",
        file=out,
    )
    rows = [r for r in reports if r.name != UNDELIVERABLE]
    for r in rows:
        _row(r, width, out)
    for b in brokers:
        if b.error is not None:
            print(f"{b.name:<{width}}  unreachable: {b.error}", file=out)
        else:
            print(
                f"{b.name:<{width}}{b.new:>6}{b.delayed:>9}{'-':>9}{'-':>9}{b.undeliverable:>15}",
                file=out,
            )
    for r in reports:
        if r.name == UNDELIVERABLE:
            _row(r, width, out)


def _row(r: QueueReport, width: int, out: TextIO) -> None:
    dead = "-" if r.undeliverable is None else str(r.undeliverable)
    print(
        f"{r.name:<{width}}{r.new:>6}{r.delayed:>9}{r.claimed:>9}{_age(r.oldest_age):>9}{dead:>15}",
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
        >>> import tempfile; from pathlib import Path
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
        >>> import io, tempfile; from pathlib import Path
        >>> root = Path(tempfile.mkdtemp()); buf = io.StringIO()
        >>> _ = (root / "run" / "posts" / "new").mkdir(parents=True)
        >>> _ = (root / "run" / "posts" / "new" / "dropped").write_bytes(b"")
        >>> ns = argparse.Namespace(max_depth=0, max_age=None, max_undeliverable=None,
        ...                         json=False)
        >>> report(ns, Settings(root=root, queues={"posts": {"path": "run/posts"}}), buf)
        1
        >>> buf.getvalue().splitlines()[-1]
        'EXCEEDED posts: 1 messages waiting > --max-depth 0'
    """
    reports = collect(settings)
    brokers = collect_brokers(settings)
    exceeded = breaches(
        reports,
        max_depth=args.max_depth,
        max_age=args.max_age,
        max_undeliverable=args.max_undeliverable,
    )
    broker_exceeded, failed = broker_breaches(
        brokers, max_depth=args.max_depth, max_undeliverable=args.max_undeliverable
    )
    exceeded += broker_exceeded
    checked = any(t is not None for t in (args.max_depth, args.max_age, args.max_undeliverable))
    if not checked:
        failed = []  # shown in the rows; a report without thresholds never fails
    if args.json:
        queues = [asdict(r) for r in reports if r.name != UNDELIVERABLE]
        queues += [asdict(b) for b in brokers]
        queues += [asdict(r) for r in reports if r.name == UNDELIVERABLE]
        document: dict[str, Any] = {
            "ok": not exceeded and not failed,
            "exceeded": exceeded,
            "failed": failed,
            "queues": queues,
        }
        print(json.dumps(document), file=out)
    else:
        render(reports, out, brokers)
        for line in exceeded:
            print(f"EXCEEDED {line}", file=out)
        for line in failed:
            print(f"FAILED {line}", file=out)
    return EXIT_EXCEEDED if exceeded or failed else EXIT_OK
