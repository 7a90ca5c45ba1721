"""The blog's index handler: the slow part, run by a worker on the ``run/posts`` queue.

Stateless: it is called for every queued post, in any order, by any number of workers.
It logs ``Got message from ...`` and appends one line per post to ``run/posts.index``
(relative to the working directory)::

    <queue key, or Message-ID, or ->\\t<envelope sender>\\t<Subject>

so the effect of a worker run is visible to people and to tests. Tabs and line breaks in
the fields are replaced by spaces, so one post is always one line.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from maildefer import MailRequest, route, stateless

INDEX_FILE = Path("run/posts.index")


def _field(value: str | None) -> str:
    text = " ".join((value or "").split())  # no tab or newline may split the record
    return text or "-"


def _append(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(line)


@route("(post_name)@(host)")
@stateless
async def START(message: MailRequest, post_name: str, host: str) -> None:
    """Index one post."""
    # In a worker, message.key is the key push returned (None when run outside one).
    key = message.key or message["Message-ID"]
    structlog.get_logger("app.index").info(
        "Got message from", sender=message.mail_from, post_name=post_name, host=host
    )
    line = "\t".join((_field(key), _field(message.mail_from), _field(message["Subject"])))
    await asyncio.to_thread(_append, INDEX_FILE, line + "\n")
