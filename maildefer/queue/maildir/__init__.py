"""The maildir backend: a queue that is a real maildir on a local (or shared) disk.

:class:`MaildirQueue` (:mod:`.queue`) is the backend, built on :mod:`.store` (a maildir's
look-ups and admin operations); :mod:`.feed` turns inotify events and directory scans
into claims for a worker; :mod:`.recovery` returns dead workers' claims and cleans
``tmp/``; :mod:`.writer` makes pushes durable with group commit (its threads hand
results back through :mod:`.handoff`; :mod:`.syncfs` is the flush call); :mod:`.names` is the
file-name grammar that holds each message's state; :mod:`.inspect` reads depths, ages
and error records for ``status`` and metrics.

Example:
    >>> import asyncio, tempfile
    >>> q = MaildirQueue(tempfile.mkdtemp())
    >>> key = asyncio.run(q.push(b"Subject: hi\\n\\n"))
    >>> sorted(p.name for p in q.path.iterdir())
    ['cur', 'errors', 'later', 'new', 'tmp']
"""

from __future__ import annotations

from maildefer.queue.maildir.queue import MaildirQueue

__all__ = ["MaildirQueue"]
