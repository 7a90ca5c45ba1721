"""A handler module with a ``lifespan``, driven by environment variables (test_lifespan.py).

Every event is one line of ``LIFESPAN_LOG``, ``<event>\\t<module>\\t<time>\\t<pid>\\t<detail>``,
written with one ``O_APPEND`` write so that processes never interleave:

- ``startup-begin`` / ``startup``: the lifespan's code before ``yield`` began / ended
  (detail: the token of the resource it opened);
- ``probe``: with ``LIFESPAN_PROBE_PORT``, whether that port accepted a connection
  during the startup (``refused`` or ``accepted``);
- ``handler-start`` / ``handled``: the handler (detail: subject, the token of the
  resource it reached through ``resources()``, and whether that resource was open);
- ``shutdown``: the lifespan's code after ``yield``.

Other variables: ``LIFESPAN_STARTUP_SLEEP`` (seconds the startup takes),
``LIFESPAN_FAIL_STARTUP`` / ``LIFESPAN_FAIL_SHUTDOWN`` (a module name: its lifespan raises
there), ``LIFESPAN_SLEEP`` (seconds the handler takes), ``LIFESPAN_PUSH`` (a queue the
handler pushes the message to: serve defers to a worker).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from maildefer import MailRequest, Queue, resources, route, stateless
from maildefer.settings import Settings


class Pool:
    """Stands for what a lifespan opens (a database pool, an HTTP client)."""

    def __init__(self) -> None:
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.open = True


def record(event: str, module: str, detail: str = "") -> None:
    path = os.environ.get("LIFESPAN_LOG")
    if not path:
        return
    line = f"{event}\t{module}\t{time.time():.6f}\t{os.getpid()}\t{detail}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


async def open_pool(module: str) -> Pool:
    """The startup half shared by this module and ``lifespan_other``."""
    record("startup-begin", module)
    port = os.environ.get("LIFESPAN_PROBE_PORT")
    if port:
        try:
            socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
            record("probe", module, "accepted")
        except OSError:
            record("probe", module, "refused")
    await asyncio.sleep(float(os.environ.get("LIFESPAN_STARTUP_SLEEP", "0") or 0))
    if os.environ.get("LIFESPAN_FAIL_STARTUP") == module:
        raise ConnectionRefusedError(f"{module}: the database is unreachable")
    pool = Pool()
    record("startup", module, pool.token)
    return pool


def close_pool(module: str, pool: Pool) -> None:
    """The shutdown half shared by this module and ``lifespan_other``."""
    pool.open = False
    record("shutdown", module, pool.token)
    if os.environ.get("LIFESPAN_FAIL_SHUTDOWN") == module:
        raise RuntimeError(f"{module}: the pool did not close")


@asynccontextmanager
async def lifespan(settings: Settings) -> AsyncIterator[dict[str, Pool]]:
    pool = await open_pool(__name__)
    try:
        yield {"pool": pool}
    finally:
        close_pool(__name__, pool)


@route("(user)@(host)")
@stateless
async def START(message: MailRequest, user: str, host: str) -> None:
    pool: Pool = resources()["pool"]
    subject = message["Subject"] or "-"
    record("handler-start", __name__, f"{subject} {pool.token} {pool.open}")
    await asyncio.sleep(float(os.environ.get("LIFESPAN_SLEEP", "0") or 0))
    if os.environ.get("LIFESPAN_PUSH"):
        await Queue(os.environ["LIFESPAN_PUSH"]).push(message)
    record("handled", __name__, f"{subject} {pool.token} {pool.open}")
