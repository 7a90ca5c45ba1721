"""``maildefer status``: queue depths and ages, with a non-zero exit past thresholds.

For every ``[queues.*]`` maildir in the settings and for the undeliverable queue, it
reports how many messages wait in ``new/``, wait out a retry backoff in ``later/``, are
claimed by a worker in ``cur/``, how old the oldest waiting one is, and how many of the
queue's messages were buried as undeliverable. It lists directories only, reads no
message, and creates nothing, so a monitoring check may run it every minute.

Exit status: ``0`` every figure within its threshold; ``1`` a threshold was exceeded
(each breach printed on its own line, ``EXCEEDED ...``); ``2`` bad usage or settings.

The figures come from :mod:`maildefer.queue.maildir.inspect` (shared with the metrics
collector); this module adds the thresholds and the rendering.

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
import sys
from dataclasses import asdict
from typing import Any, TextIO

from maildefer.queue.maildir.inspect import UNDELIVERABLE, QueueReport, collect
from maildefer.settings import Settings

EXIT_OK = 0
EXIT_EXCEEDED = 1


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
