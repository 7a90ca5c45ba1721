"""A handler that records when it ran, configured by environment variables.

- ``RECORDER_LOG``: file to append ``<subject>\\t<time.time()>\\t<pid>\\t<key>`` to, one
  line per call, written with one ``O_APPEND`` write so processes never interleave.
- ``RECORDER_SLEEP``: seconds to sleep inside the handler (to be caught mid-handler).
- ``RECORDER_STARTED``: file to append ``<subject>`` to when the handler starts.
- ``RECORDER_EXIT_ON``: a subject on which the handler kills its own process.
- ``RECORDER_FAIL_WHILE``: a path; the handler raises while that file exists.
"""

from __future__ import annotations

import asyncio
import os
import time

import structlog

from maildefer import MailRequest, route, stateless


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@route("(user)@(host)")
@stateless
async def START(message: MailRequest, user: str, host: str) -> None:
    started = time.time()
    subject = message["Subject"] or "-"
    key = structlog.contextvars.get_contextvars().get("key", "-")
    env = os.environ
    if env.get("RECORDER_STARTED"):
        _append(env["RECORDER_STARTED"], f"{subject}\n")
    if env.get("RECORDER_EXIT_ON") == subject:
        os._exit(1)
    fail_while = env.get("RECORDER_FAIL_WHILE")
    if fail_while and os.path.exists(fail_while):
        raise RuntimeError(f"failing on purpose: {subject}")
    sleep = float(env.get("RECORDER_SLEEP", "0") or 0)
    if sleep:
        await asyncio.sleep(sleep)
    if env.get("RECORDER_LOG"):
        _append(env["RECORDER_LOG"], f"{subject}\t{started:.6f}\t{os.getpid()}\t{key}\n")
