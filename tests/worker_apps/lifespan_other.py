"""A second handler module with a ``lifespan`` (test_lifespan.py: order, failures).

Its events go to ``LIFESPAN_LOG`` as ``lifespan_app``'s do, under this module's name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from lifespan_app import Pool, close_pool, open_pool, record

from maildefer import MailRequest, resources, route, stateless
from maildefer.settings import Settings


@asynccontextmanager
async def lifespan(settings: Settings) -> AsyncIterator[Pool]:
    pool = await open_pool(__name__)
    try:
        yield pool  # not a dict: a module's resources are whatever its lifespan yields
    finally:
        close_pool(__name__, pool)


@route("(user)@other.test")
@stateless
async def START(message: MailRequest, user: str) -> None:
    pool: Pool = resources()
    record("handled", __name__, f"{message['Subject'] or '-'} {pool.token} {pool.open}")
