"""Between the maildir writer's threads and the event loops that wait on them.

A push made on an event loop is a :class:`PendingPush`: a writer thread writes it, and
:func:`hand_back` settles a whole batch with one wake-up per loop. :func:`joined` waits
for threads to end from a coroutine without blocking the loop.

Example:
    >>> import asyncio, threading
    >>> async def demo():
    ...     loop = asyncio.get_running_loop()
    ...     push = PendingPush(b"x", loop, loop.create_future())
    ...     def writer_thread():
    ...         push.key = "k1"  # what a writer thread does once the file is durable
    ...         hand_back([push])
    ...     thread = threading.Thread(target=writer_thread); thread.start()
    ...     await joined([thread])
    ...     return await push.future
    >>> asyncio.run(demo())
    'k1'
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class PendingPush:
    """One push waiting for a writer thread: its data, and where its result goes.

    A plain class with slots: one is made per push, on the event loop.

    Args:
        data: the bytes to store.
        loop: the caller's event loop (where :func:`hand_back` settles it).
        future: the caller awaits it: the key, or the error.

    Example:
        >>> import asyncio
        >>> loop = asyncio.new_event_loop()
        >>> push = PendingPush(b"x", loop, loop.create_future())
        >>> push.key, push.error, push.future.done()
        (None, None, False)
        >>> loop.close()
    """

    __slots__ = ("data", "error", "future", "key", "loop", "tmp")

    def __init__(
        self, data: bytes, loop: asyncio.AbstractEventLoop, future: asyncio.Future[str]
    ) -> None:
        self.data = data
        self.loop = loop
        self.future = future
        self.key: str | None = None
        self.tmp: str | None = None  # syncfs mode: written in tmp/, not yet synced
        self.error: BaseException | None = None


def hand_back(batch: list[PendingPush]) -> None:
    """From a writer thread: wake each event loop once for all of its pushes in ``batch``.

    Each push gets its ``key`` or its ``error``; a caller cancelled meanwhile gets
    nothing (the message is whole in ``new/`` or absent), a closed loop is skipped.

    Example:
        >>> import asyncio
        >>> async def demo():
        ...     loop = asyncio.get_running_loop()
        ...     failed = PendingPush(b"x", loop, loop.create_future())
        ...     failed.error = OSError(28, "No space left on device")
        ...     hand_back([failed])
        ...     try:
        ...         await failed.future
        ...     except OSError as exc:
        ...         return exc.strerror
        >>> asyncio.run(demo())
        'No space left on device'
    """
    loop = batch[0].loop
    if all(push.loop is loop for push in batch):
        groups = [(loop, batch)]
    else:
        by_loop: dict[asyncio.AbstractEventLoop, list[PendingPush]] = {}
        for push in batch:
            by_loop.setdefault(push.loop, []).append(push)
        groups = list(by_loop.items())
    for target, pushes in groups:
        try:
            target.call_soon_threadsafe(_settle, pushes)
        except RuntimeError:
            continue  # that loop is closed: nobody waits for these any more


def _settle(pushes: list[PendingPush]) -> None:
    """On the event loop: hand each push its key or its error."""
    for push in pushes:
        if push.future.done():
            continue  # the caller was cancelled; the message is whole in new/ or absent
        if push.error is not None:
            push.future.set_exception(push.error)
        else:
            push.future.set_result(str(push.key))


async def joined(threads: list[threading.Thread]) -> None:
    """Wait for ``threads`` to end without blocking the event loop or leaving a thread.

    ``asyncio.to_thread(thread.join)`` would leave one behind: the loop's executor keeps
    its threads until the loop closes. The helper thread here ends as soon as they have.

    Example:
        >>> import asyncio, time
        >>> worker = threading.Thread(target=time.sleep, args=(0.01,)); worker.start()
        >>> asyncio.run(joined([worker])); worker.is_alive()
        False
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def join() -> None:
        for thread in threads:
            thread.join()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(_resolve, done)

    threading.Thread(target=join, name="maildefer-writer-join", daemon=True).start()
    await done


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # the waiter was cancelled
        future.set_result(None)
