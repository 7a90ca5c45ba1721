"""Queues: ``Queue("run/posts")`` picks a backend from the path or URL.

A plain path is a maildir on disk (:mod:`maildefer.queue.maildir`), the embedded default;
an ``amqp://`` URL is a RabbitMQ quorum queue (:mod:`maildefer.queue.amqp`). Handlers
create queues freely (``await Queue("run/posts").push(message)``); inside ``serve`` and
``worker`` a :class:`~maildefer.queue.config.QueueRegistry` is active, and every
``Queue`` for the same place shares one backend, so concurrent pushes share their
directory fsync (group commit) and the worker's options (retries, undeliverable path)
apply. Synchronous code (a Django or Flask view, a script, any thread) pushes with
:meth:`Queue.push_sync`. A ``Queue`` is cheap and holds nothing for long (a web app may
make one per request); ``close()`` or a ``with`` block releases it at once.

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
from types import TracebackType

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

    Cheap to make and leak-free: a maildir queue's writer threads end when the ``Queue``
    is dropped, or a second after its last push (``push_sync`` starts none); an amqp
    queue's ``push_sync`` connection a second after its last one. ``await q.close()``,
    ``async with Queue(...)`` and ``with Queue(...)`` (synchronous code) release them at
    once. Inside ``serve``/``worker`` the process's
    :class:`~maildefer.queue.config.QueueRegistry` owns the backend, shared by every
    ``Queue`` of that place: closing one of them (a handler's ``async with``) leaves
    it open for the others; the registry closes it at shutdown.

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
        # A registry's backend is the registry's to close; one opened here is ours.
        self._owned = registry is None
        self.backend: QueueBackend = (
            registry.get(ref) if registry is not None else open_backend(ref)
        )

    async def __aenter__(self) -> Queue:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __enter__(self) -> Queue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._owned:
            self.backend.close_sync()

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

    def push_sync(self, message: Pushable) -> str:
        """:meth:`push` for synchronous code and any thread: durable when it returns.

        For a Django or Flask view, a script, a thread of a pool: no event loop needed.
        It accepts what :meth:`push` accepts and returns the key once the message would
        survive a crash (maildir: the file and its ``new/`` entry fsync'd, written by the
        calling thread; amqp: the broker's publisher confirm).

        Called from a running event loop's thread (an ``async def`` handler, a FastAPI
        endpoint) it raises :class:`RuntimeError` rather than stall every task of that
        loop for the whole write: there, ``await q.push(message)``.

        Raises:
            QueueError: the message is not stored (ENOSPC, EIO, broker down); nothing of
                it is left in the queue.
            RuntimeError: called from a running event loop's thread.

        Example:
            >>> import tempfile
            >>> with Queue(tempfile.mkdtemp()) as q:
            ...     key = q.push_sync(b"Subject: from a view\\n\\n")
            ...     q.backend.claim_sync(key).message["Subject"]
            'from a view'
        """
        return self.backend.push_sync(message)

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

    async def close(self) -> None:
        """Release the queue now: writer threads ended, files and connections closed.

        A later push opens what it needs again. A ``Queue`` of an active registry (in
        ``serve``/``worker``) leaves the shared backend open: the registry closes it.

        Example:
            >>> import asyncio, os, tempfile, threading
            >>> path = tempfile.mkdtemp()
            >>> async def demo():
            ...     async with Queue(path) as q:
            ...         await q.push(b"Subject: x\\n\\n")
            ...     mine = f"maildefer-writer:{os.path.basename(path)}:"
            ...     return [t for t in threading.enumerate() if t.name.startswith(mine)]
            >>> asyncio.run(demo())
            []
        """
        if self._owned:
            await self.backend.close()

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
