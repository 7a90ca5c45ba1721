"""Where the router keeps each sender's state: which state function handles it next.

A key is ``"<module>:<sender>"`` (Lamson's state key) and a state is the name of a
function in that module (``"START"``, ``"POSTING"``...). The router reads the state before
it calls a stateful handler and writes it after the handler returns.

* :class:`MemoryStateStore`: a dict, for tests and one-process experiments.
* :class:`SqliteStateStore`: a file under ``run/`` (stdlib ``sqlite3`` in WAL mode), so
  ``serve``, every ``worker`` and a restarted process all see the same states.

Example:
    >>> import asyncio
    >>> store = MemoryStateStore()
    >>> asyncio.run(store.set("app.handlers.posting:a@x.org", "POSTING"))
    >>> asyncio.run(store.get("app.handlers.posting:a@x.org"))
    'POSTING'
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from maildefer.settings import Settings

__all__ = ["MemoryStateStore", "SqliteStateStore", "StateStore", "state_store_for"]


@runtime_checkable
class StateStore(Protocol):
    """What the router needs from a state store.

    Example:
        Any object with these three coroutines will do, e.g. one that records writes:

        >>> import asyncio
        >>> from maildefer.mail import MailRequest
        >>> from maildefer.routing import Handler, Route, Router
        >>> class Recording:
        ...     def __init__(self):
        ...         self.states = {}
        ...     async def get(self, key):
        ...         return self.states.get(key)
        ...     async def set(self, key, state):
        ...         print("set", key, state)
        ...         self.states[key] = state
        ...     async def clear(self):
        ...         self.states.clear()
        >>> async def START(message, a):
        ...     return "POSTING"
        >>> start = Handler("START", START, stateless=False, module="blog")
        >>> router = Router([Route.compile("(a)@x", {}, {}, "blog", (start,))], state=Recording())
        >>> asyncio.run(router.deliver(MailRequest(b"\\n", mail_from="Ann@Y", rcpt_tos=["a@x"])))
        set blog:ann@y POSTING
        1
    """

    async def get(self, key: str) -> str | None:
        """The state stored for ``key``, or ``None`` (the router then uses ``START``)."""
        ...

    async def set(self, key: str, state: str) -> None:
        """Store ``state`` for ``key``, replacing what was there."""
        ...

    async def clear(self) -> None:
        """Forget every state (every sender starts over at ``START``)."""
        ...


class MemoryStateStore:
    """States in a dict: lost when the process exits. For tests.

    Example:
        >>> import asyncio
        >>> store = MemoryStateStore()
        >>> asyncio.run(store.get("m:a@x")) is None
        True
    """

    def __init__(self) -> None:
        self.states: dict[str, str] = {}

    async def get(self, key: str) -> str | None:
        """The state for ``key``, or ``None``.

        Example:
            >>> import asyncio; asyncio.run(MemoryStateStore().get("k")) is None
            True
        """
        return self.states.get(key)

    async def set(self, key: str, state: str) -> None:
        """Store a state.

        Example:
            >>> import asyncio; s = MemoryStateStore(); asyncio.run(s.set("k", "B")); s.states
            {'k': 'B'}
        """
        self.states[key] = state

    async def clear(self) -> None:
        """Forget every state.

        Example:
            >>> import asyncio; s = MemoryStateStore(); asyncio.run(s.clear()); s.states
            {}
        """
        self.states.clear()


class SqliteStateStore:
    """States in an SQLite file, shared by every process of a project.

    One connection per store, opened on first use; each operation runs in a worker
    thread in one hop (``asyncio.to_thread``) so the event loop never waits on the disk.
    WAL mode lets ``serve`` and the workers read while one of them writes, and a busy
    timeout makes concurrent writers wait instead of failing.

    Args:
        path: the database file; its directory is created when missing.
        busy_timeout: seconds a write waits for another process's lock.

    Example:
        >>> import asyncio, tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "state.db"
        >>> async def demo():
        ...     first = SqliteStateStore(path)
        ...     await first.set("m:a@x.org", "POSTING")
        ...     first.close()
        ...     second = SqliteStateStore(path)
        ...     try:
        ...         return await second.get("m:a@x.org")
        ...     finally:
        ...         second.close()
        >>> asyncio.run(demo())
        'POSTING'
    """

    def __init__(self, path: str | Path, *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        # to_thread may run two operations on two threads at once; one connection must
        # not be used by both at the same time.
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                check_same_thread=False,
                isolation_level=None,  # autocommit: every statement is its own transaction
            )
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode survives a process crash; only an OS crash may lose
                # the last states, which at worst sends a sender back one state.
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS state ("
                    " key TEXT PRIMARY KEY, state TEXT NOT NULL, updated REAL NOT NULL)"
                )
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _get(self, key: str) -> str | None:
        with self._lock:
            row = (
                self._connection().execute("SELECT state FROM state WHERE key = ?", (key,))
            ).fetchone()
        return None if row is None else str(row[0])

    def _set(self, key: str, state: str) -> None:
        with self._lock:
            self._connection().execute(
                "INSERT INTO state (key, state, updated) VALUES (?, ?, ?)"
                " ON CONFLICT(key) DO UPDATE SET state = excluded.state,"
                " updated = excluded.updated",
                (key, state, time.time()),
            )

    def _clear(self) -> None:
        with self._lock:
            self._connection().execute("DELETE FROM state")

    async def get(self, key: str) -> str | None:
        """The state for ``key``, or ``None``.

        Example:
            >>> import asyncio, tempfile
            >>> store = SqliteStateStore(tempfile.mkdtemp() + "/s.db")
            >>> asyncio.run(store.get("k")) is None
            True
            >>> store.close()
        """
        return await asyncio.to_thread(self._get, key)

    async def set(self, key: str, state: str) -> None:
        """Store a state; it is committed when this returns.

        Example:
            >>> import asyncio, tempfile
            >>> store = SqliteStateStore(tempfile.mkdtemp() + "/s.db")
            >>> asyncio.run(store.set("k", "B")); asyncio.run(store.get("k"))
            'B'
            >>> store.close()
        """
        await asyncio.to_thread(self._set, key, state)

    async def clear(self) -> None:
        """Forget every state.

        Example:
            >>> import asyncio, tempfile
            >>> store = SqliteStateStore(tempfile.mkdtemp() + "/s.db")
            >>> asyncio.run(store.set("k", "B")); asyncio.run(store.clear())
            >>> asyncio.run(store.get("k")) is None
            True
            >>> store.close()
        """
        await asyncio.to_thread(self._clear)

    def close(self) -> None:
        """Close the connection (reopened if the store is used again).

        Example:
            >>> import asyncio, tempfile
            >>> store = SqliteStateStore(tempfile.mkdtemp() + "/s.db")
            >>> asyncio.run(store.set("k", "B")); store.close()
            >>> asyncio.run(store.get("k"))  # reopened on use; the state was committed
            'B'
            >>> store.close()
        """
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def state_store_for(settings: Settings) -> SqliteStateStore:
    """The project's state store: ``[router] state_store``, relative to the project root.

    Example:
        >>> from pathlib import Path
        >>> from maildefer.settings import Settings
        >>> state_store_for(Settings(root=Path("/srv/app"))).path
        PosixPath('/srv/app/run/state.db')
    """
    return SqliteStateStore(settings.resolve(settings.router.state_store))
