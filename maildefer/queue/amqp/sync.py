"""``push_sync``'s broker link: a :class:`~.connection.BrokerLink` on a private event loop.

Example:
    >>> link = SyncLink(lambda: BrokerLink("amqp://h/", label="q"))
    >>> link.running
    False
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from maildefer.errors import QueueError
from maildefer.queue.amqp.connection import BrokerLink
from maildefer.queue.backend import refuse_running_loop

SYNC_IDLE_SECONDS = 1.0
"""How long :class:`SyncLink` keeps its thread and connection without a publish.

A script or a view pushing again soon reuses the connection (a new one costs several
round trips); a ``Queue`` made per request and dropped holds it for a second at most.
"""


class SyncLink:
    """A :class:`BrokerLink` for synchronous callers, on an event loop of its own.

    aio-pika is async only: the link lives on a private event loop that a thread of its
    own runs, started by the first :meth:`publish`. The calling thread (any thread, any
    number of them at once) waits for the broker's confirm, bounded by the link's
    connect and publish timeouts. The thread and its connection end after ``idle``
    seconds without a publish, or at :meth:`close`; a later publish starts them again.

    Args:
        make_link: makes the link for each start of the thread (a new connection).
        idle: seconds without a publish before the thread and connection end.

    Example:
        >>> link = SyncLink(lambda: BrokerLink("amqp://nobody:x@127.0.0.1:1/", label="q",
        ...                                    connect_timeout=1))
        >>> try:
        ...     link.publish(b"x", "q", key="k1", headers={})
        ... except QueueError as exc:
        ...     print(str(exc).split(":")[1].strip())
        cannot connect to the broker
        >>> link.close(); link.running
        False
    """

    def __init__(
        self, make_link: Callable[[], BrokerLink], *, idle: float = SYNC_IDLE_SECONDS
    ) -> None:
        self._make_link = make_link
        self._idle = idle
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._link: BrokerLink | None = None
        self._busy = 0
        self._last = 0.0

    @property
    def running(self) -> bool:
        """Whether the thread (and maybe a connection) is there now."""
        return self._loop is not None

    def publish(self, body: bytes, routing_key: str, *, key: str, headers: dict[str, Any]) -> None:
        """:meth:`BrokerLink.publish`, blocking until the broker's confirm.

        Raises:
            QueueError: as :meth:`BrokerLink.publish`, or no answer within the link's
                connect and publish timeouts.
            RuntimeError: called from a running event loop's thread.
        """
        refuse_running_loop("push_sync")
        with self._lock:
            if self._loop is None:
                self._start()
            loop, link = self._loop, self._link
            assert loop is not None and link is not None
            self._busy += 1  # under the lock: the idle check never stops a busy loop
        try:
            future = asyncio.run_coroutine_threadsafe(
                link.publish(body, routing_key, key=key, headers=headers), loop
            )
            bound = link.connect_bound + link.publish_timeout + 5
            try:
                future.result(timeout=bound)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise QueueError(
                    f"{link.label}: publish to {routing_key!r} failed: no answer in {bound:g} s"
                ) from None
            except concurrent.futures.CancelledError:  # closed meanwhile
                raise QueueError(
                    f"{link.label}: publish to {routing_key!r} failed: closed"
                ) from None
        finally:
            with self._lock:
                self._busy -= 1
                self._last = time.monotonic()

    def _start(self) -> None:
        """With the lock held: a new loop, link and thread."""
        loop = asyncio.new_event_loop()
        link = self._make_link()
        thread = threading.Thread(
            target=self._run, args=(loop, link), name=f"maildefer-amqp-sync:{link.label}"
        )
        thread.daemon = True  # a script that forgot close() still exits
        self._loop, self._link, self._thread = loop, link, thread
        self._last = time.monotonic()
        thread.start()

    def _run(self, loop: asyncio.AbstractEventLoop, link: BrokerLink) -> None:
        asyncio.set_event_loop(loop)
        loop.call_later(self._idle, self._check_idle, loop)
        try:
            loop.run_forever()  # until idle or close()
        finally:
            loop.run_until_complete(link.close())
            # What asyncio.run does at the end: the client's leftover tasks go too.
            leftover = asyncio.all_tasks(loop)
            for task in leftover:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def _check_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the private loop: stop it after ``idle`` seconds without a publish."""
        with self._lock:
            if self._loop is not loop:
                return  # close() took it
            quiet = time.monotonic() - self._last
            if self._busy or quiet < self._idle:
                loop.call_later(max(self._idle - quiet, 0.05), self._check_idle, loop)
                return
            self._loop = self._link = self._thread = None
        loop.stop()

    def close(self) -> None:
        """Close the connection and end the thread, now; blocking (a moment).

        Example:
            >>> link = SyncLink(lambda: BrokerLink("amqp://h/", label="q"))
            >>> link.close(); link.running
            False
        """
        with self._lock:
            loop, thread, link = self._loop, self._thread, self._link
            self._loop = self._link = self._thread = None
        if loop is None or thread is None or link is None:
            return
        with contextlib.suppress(RuntimeError):  # it has just stopped by itself
            loop.call_soon_threadsafe(loop.stop)
        thread.join(link.connect_timeout + 1)  # closing a connection: one round trip
