"""Queues: ``Queue("run/posts")`` picks a backend from the path or URL.

A plain path is a maildir on disk (:mod:`maildefer.queue.maildir`), the embedded default;
an ``amqp://`` URL is a RabbitMQ quorum queue (:mod:`maildefer.queue.amqp`). Handlers
create queues freely (``await Queue("run/posts").push(message)``); inside ``serve`` and
``worker`` a :class:`~maildefer.queue.config.QueueRegistry` is active, and every
``Queue`` for the same place shares one backend, so concurrent pushes share their
directory fsync (group commit) and the worker's options (retries, undeliverable path)
apply.

This package exports what an application author and a backend author use: :class:`Queue`,
and the :class:`QueueBackend` protocol with the types it speaks in. Settings adapters
live in :mod:`maildefer.queue.config`.

Example:
    >>> import asyncio, tempfile
    >>> async def demo():
    ...     q = Queue(tempfile.mkdtemp() + "/posts")
    ...     await q.push(b"Subject: hello\\n\\nworld\\n")
    ...     key, message = await q.pop()
    ...     return message["Subject"], await q.count()
    >>> asyncio.run(demo())
    ('hello', 0)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from maildefer.mail import MailRequest
from maildefer.queue.backend import (
    BuryReason,
    Claim,
    Pushable,
    QueueBackend,
    QueueOptions,
    RecoveryReport,
)
from maildefer.queue.config import active_registry, open_backend

__all__ = [
    "BuryReason",
    "Claim",
    "Pushable",
    "Queue",
    "QueueBackend",
    "QueueOptions",
    "RecoveryReport",
]


class Queue:
    """A queue of messages, on disk (a maildir path) or on a broker (a URL).

    Args:
        ref: a maildir path (relative to the working directory) or a URL.

    Example:
        >>> import asyncio, tempfile
        >>> q = Queue(tempfile.mkdtemp())
        >>> key = asyncio.run(q.push(b"Subject: x\\n\\n"))
        >>> asyncio.run(q.keys()) == [key]
        True
    """

    def __init__(self, ref: str | os.PathLike[str]) -> None:
        registry = active_registry()
        self.backend: QueueBackend = (
            registry.get(ref) if registry is not None else open_backend(ref)
        )

    @property
    def url(self) -> str:
        """The path or URL this queue was opened with.

        Example:
            >>> Queue("amqp://h/?queue=posts").url
            'amqp://h/?queue=posts'
        """
        return self.backend.url

    async def push(self, message: Pushable) -> str:
        """Store a message durably; returns its key once it is stored.

        Example:
            >>> import asyncio, tempfile
            >>> async def demo():
            ...     q = Queue(tempfile.mkdtemp())
            ...     key = await q.push(b"Subject: kept\\n\\n")
            ...     return (await q.get(key))["Subject"]
            >>> asyncio.run(demo())
            'kept'
        """
        return await self.backend.push(message)

    async def count(self) -> int:
        """How many messages are in the queue.

        Example:
            >>> import asyncio, tempfile
            >>> async def demo():
            ...     q = Queue(tempfile.mkdtemp())
            ...     before = await q.count()
            ...     await q.push(b"\\n"); await q.push(b"\\n")
            ...     return before, await q.count()
            >>> asyncio.run(demo())
            (0, 2)
        """
        return await self.backend.count()

    async def keys(self) -> list[str]:
        """The keys of the messages in the queue.

        Example:
            >>> import asyncio, tempfile
            >>> async def demo():
            ...     q = Queue(tempfile.mkdtemp())
            ...     keys = {await q.push(b"\\n"), await q.push(b"\\n")}
            ...     return set(await q.keys()) == keys
            >>> asyncio.run(demo())
            True
        """
        return await self.backend.keys()

    async def get(self, key: str) -> MailRequest | None:
        """One message by key, or ``None``; the message stays in the queue.

        Example:
            >>> import asyncio, tempfile
            >>> async def demo():
            ...     q = Queue(tempfile.mkdtemp())
            ...     key = await q.push(b"Subject: hi\\n\\n")
            ...     message = await q.get(key)
            ...     return message["Subject"], await q.get("no-such-key"), await q.count()
            >>> asyncio.run(demo())
            ('hi', None, 1)
        """
        return await self.backend.get(key)

    async def remove(self, key: str) -> bool:
        """Delete one message by key; ``True`` if it was there.

        Example:
            >>> import asyncio, tempfile
            >>> async def demo():
            ...     q = Queue(tempfile.mkdtemp())
            ...     key = await q.push(b"\\n")
            ...     return await q.remove(key), await q.remove(key), await q.count()
            >>> asyncio.run(demo())
            (True, False, 0)
        """
        return await self.backend.remove(key)

    async def pop(self) -> tuple[str, MailRequest] | None:
        """Take one message off the queue, or ``None`` when it is empty.

        Example:
            >>> import asyncio, tempfile
            >>> async def demo():
            ...     q = Queue(tempfile.mkdtemp())
            ...     pushed = await q.push(b"Subject: one\\n\\n")
            ...     key, message = await q.pop()
            ...     return key == pushed, message["Subject"], await q.pop()
            >>> asyncio.run(demo())
            (True, 'one', None)
        """
        return await self.backend.pop()

    async def clear(self) -> int:
        """Delete every message; returns how many were deleted.

        Example:
            >>> import asyncio, tempfile
            >>> async def demo():
            ...     q = Queue(tempfile.mkdtemp())
            ...     for _ in range(3):
            ...         await q.push(b"\\n")
            ...     return await q.clear(), await q.count()
            >>> asyncio.run(demo())
            (3, 0)
        """
        return await self.backend.clear()

    def consume(self) -> AsyncIterator[Claim]:
        """Claims for a worker, waiting for messages (see :class:`QueueBackend`).

        Each claim is acked, retried, buried or released through :attr:`backend`.

        Example:
            >>> import asyncio, tempfile
            >>> async def demo():
            ...     q = Queue(tempfile.mkdtemp())
            ...     key = await q.push(b"Subject: work\\n\\n")
            ...     claims = q.consume()
            ...     claim = await anext(claims)
            ...     await q.backend.ack(claim)
            ...     await claims.aclose()
            ...     return claim.key == key, claim.message["Subject"], await q.count()
            >>> asyncio.run(demo())
            (True, 'work', 0)
        """
        return self.backend.consume()
