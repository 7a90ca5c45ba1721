"""A maildir directory as a store of messages: its layout, look-ups and admin operations.

:class:`MaildirStore` is what needs no writer and no worker: the directories, finding a
message by key, reading it and its last error record, counting, removing, clearing, and
requeueing buried messages. :class:`~maildefer.queue.maildir.MaildirQueue` builds on it
with push and the worker's claim, ack, retry, bury and recovery. The look-ups here list
directories (a key says nothing of which state directory holds its file), so they serve
``maildefer queue`` and the user-facing half of the queue API, never the claim path.

Example:
    >>> import asyncio, tempfile; from pathlib import Path
    >>> store = MaildirStore(tempfile.mkdtemp()); store.ensure()
    >>> _ = (store.dir("later") / "k,A=1,T=5").write_bytes(b"Subject: hi\\n\\n")
    >>> store.locate("k"), asyncio.run(store.keys())
    (('later', 'k,A=1,T=5'), ['k'])
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiofiles

from maildefer.mail import MailRequest
from maildefer.queue.envelope import request_from_file
from maildefer.queue.maildir.names import MaildirName
from maildefer.queue.maildir.writer import fsync_dir, replace_file, unlink_quietly

SUBDIRS = ("tmp", "new", "cur", "later", "errors")
"""A queue directory's subdirectories (see :mod:`maildefer.queue.maildir.queue`)."""

STATE_DIRS = ("new", "later", "cur")
"""The subdirectories that hold messages: waiting, delayed, claimed."""

_READ_SIZE = 64 * 1024
"""First read of a claimed file: most messages fit, so two reads (the second says EOF).

Not larger: a buffer over 128 KiB is an mmap and munmap per read."""


def read_file(path: str, *, local: bool = False) -> bytes:
    """A whole file's bytes, with as few system calls as the kernel allows.

    ``open(path, "rb").read()`` also makes an ``fstat``, an ``ioctl`` (is it a tty?) and
    a buffered reader: about 10 µs of a claim here.

    Args:
        path: the file.
        local: the file is on a local filesystem, where a read of a regular file returns
            less than asked only at its end, so a short first read is the whole file
            (one ``read`` fewer per claim). Otherwise (NFS) it reads until ``read``
            returns nothing.

    Example:
        >>> import pathlib, tempfile; p = pathlib.Path(tempfile.mkdtemp()) / "m"
        >>> _ = p.write_bytes(b"x" * 70000); len(read_file(str(p)))
        70000
        >>> _ = p.write_bytes(b"x" * 700); len(read_file(str(p), local=True))
        700
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, _READ_SIZE)
        if local and len(data) < _READ_SIZE:
            return data
        more = os.read(fd, _READ_SIZE) if data else b""
        if not more:
            return data
        chunks = [data, more]
        while more:
            more = os.read(fd, max(_READ_SIZE, sum(map(len, chunks))))
            chunks.append(more)
        return b"".join(chunks)
    finally:
        os.close(fd)


class MaildirStore:
    """The messages of one maildir directory, in every state.

    Args:
        path: the directory; ``tmp/ new/ cur/ later/ errors/`` are created on first use
            by the operations that need them (:meth:`locate`, :meth:`count`...), never by
            the read-only ones (:meth:`dir`, :meth:`error_record`).

    Example:
        >>> store = MaildirStore("run/posts")
        >>> store.url, store.dir("new") == Path("run/posts/new").absolute()
        ('run/posts', True)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        self.url = str(path)
        self._ready = False

    def dir(self, name: str) -> Path:
        """One of the store's subdirectories.

        Example:
            >>> MaildirStore("/srv/q").dir("new")
            PosixPath('/srv/q/new')
        """
        return self.path / name

    def ensure(self) -> None:
        """Create the directories if they do not exist (idempotent, cached).

        Example:
            >>> import tempfile; store = MaildirStore(tempfile.mkdtemp() + "/q")
            >>> store.ensure(); sorted(p.name for p in store.path.iterdir())
            ['cur', 'errors', 'later', 'new', 'tmp']
        """
        if self._ready:
            return
        for sub in SUBDIRS:
            (self.path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._ready = True

    def _entries(self, dirs: tuple[str, ...] = STATE_DIRS) -> Iterator[tuple[str, str]]:
        """(directory, file name) of every message, in ``dirs`` (dot-files skipped)."""
        self.ensure()
        for sub in dirs:
            with os.scandir(self.path / sub) as it:
                for entry in it:
                    if not entry.name.startswith("."):
                        yield sub, entry.name

    def locate(self, key: str) -> tuple[str, str] | None:
        """Where a message is: ``(directory, file name)``, or ``None``.

        A fresh key in ``new/`` is found without a listing (see the module example).
        """
        self.ensure()
        if (self.path / "new" / key).exists():
            return "new", key
        for sub, filename in self._entries():
            if MaildirName.parse(filename).key == key:
                return sub, filename
        return None

    def scan_new(self, batch: int = 1024) -> Iterator[list[str]]:
        """The file names in ``new/``, in batches (scandir; dot-files skipped).

        Example:
            >>> import tempfile; store = MaildirStore(tempfile.mkdtemp()); store.ensure()
            >>> for name in ("a", "b", "c", ".partial"):
            ...     _ = (store.dir("new") / name).write_bytes(b"")
            >>> sorted(len(batch) for batch in store.scan_new(batch=2))
            [1, 2]
        """
        self.ensure()
        names: list[str] = []
        with os.scandir(self.path / "new") as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                names.append(entry.name)
                if len(names) >= batch:
                    yield names
                    names = []
        if names:
            yield names

    # -- reading -------------------------------------------------------------------------

    def read_sync(self, sub: str, filename: str) -> MailRequest:
        """Read one message file (envelope applied); blocking.

        Raises:
            CorruptMessageError: the file fails its envelope check.

        Example:
            >>> import tempfile; store = MaildirStore(tempfile.mkdtemp()); store.ensure()
            >>> _ = (store.dir("new") / "k").write_bytes(b"From: a@x\\nTo: b@y\\n\\n")
            >>> store.read_sync("new", "k").mail_from
            'a@x'
        """
        return request_from_file((self.path / sub / filename).read_bytes())

    async def read(self, sub: str, filename: str) -> MailRequest:
        """Read one message file (envelope applied) without blocking the loop.

        Raises:
            CorruptMessageError: the file fails its envelope check.
            FileNotFoundError: the file is gone (claimed, acked or removed meanwhile).

        Example:
            >>> import tempfile; store = MaildirStore(tempfile.mkdtemp()); store.ensure()
            >>> _ = (store.dir("new") / "k").write_bytes(b"From: a@x\\nTo: b@y\\n\\n")
            >>> asyncio.run(store.read("new", "k")).rcpt_tos
            ['b@y']
        """
        # aiofiles: off the claim path, one file read is worth its thread hops.
        async with aiofiles.open(self.path / sub / filename, "rb") as f:
            data = await f.read()
        return request_from_file(data)

    async def get(self, key: str) -> MailRequest | None:
        """One message by key, or ``None`` if it is not in the queue.

        Raises:
            CorruptMessageError: its file fails its envelope check.

        Example:
            >>> import tempfile; store = MaildirStore(tempfile.mkdtemp()); store.ensure()
            >>> _ = (store.dir("cur") / "k,W=mx~1~2").write_bytes(b"Subject: hi\\n\\n")
            >>> asyncio.run(store.get("k"))["Subject"], asyncio.run(store.get("nope"))
            ('hi', None)
        """
        where = await asyncio.to_thread(self.locate, key)
        if where is None:
            return None
        try:
            return await self.read(*where)
        except FileNotFoundError:
            return None

    # -- error records -------------------------------------------------------------------

    def error_path(self, key: str) -> Path:
        """The file of a message's last error record.

        Example:
            >>> MaildirStore("/srv/q").error_path("k")
            PosixPath('/srv/q/errors/k.json')
        """
        return self.path / "errors" / f"{key}.json"

    def write_error_record(self, key: str, record: dict[str, Any], *, sync: bool) -> None:
        """Store a message's last error (replacing the one before); fsync'd if ``sync``.

        Example:
            >>> import tempfile; store = MaildirStore(tempfile.mkdtemp()); store.ensure()
            >>> store.write_error_record("k", {"error": "boom"}, sync=False)
            >>> store.error_record("k")
            {'error': 'boom'}
        """
        data = json.dumps(record, indent=1).encode("utf-8", "surrogateescape")
        replace_file(self.error_path(key), data, sync=sync)

    def error_record(self, key: str) -> dict[str, Any] | None:
        """The last error recorded for a message (retry or bury), or ``None``.

        ``None`` too for a record that cannot be read or is no JSON object.

        Example:
            >>> import tempfile; store = MaildirStore(tempfile.mkdtemp()); store.ensure()
            >>> _ = store.error_path("k").write_bytes(b"[1]")
            >>> store.error_record("k"), store.error_record("nope")
            (None, None)
        """
        try:
            data = json.loads(self.error_path(key).read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    # -- the user-facing queue API -------------------------------------------------------

    async def count(self) -> int:
        """How many messages are in the queue: waiting, delayed or claimed.

        Example:
            >>> import tempfile; store = MaildirStore(tempfile.mkdtemp()); store.ensure()
            >>> for sub in STATE_DIRS: _ = (store.dir(sub) / "k").write_bytes(b"")
            >>> _ = (store.dir("new") / ".partial").write_bytes(b"")
            >>> asyncio.run(store.count())
            3
        """
        return await asyncio.to_thread(lambda: sum(1 for _ in self._entries()))

    async def keys(self) -> list[str]:
        """The keys of every message in the queue (waiting, delayed, claimed).

        See the module example.
        """
        return await asyncio.to_thread(
            lambda: [MaildirName.parse(f).key for _, f in self._entries()]
        )

    async def remove(self, key: str) -> bool:
        """Delete one message by key (and its error record); ``True`` if it was there.

        Example:
            >>> import tempfile; store = MaildirStore(tempfile.mkdtemp()); store.ensure()
            >>> _ = (store.dir("later") / "k,T=1").write_bytes(b"")
            >>> asyncio.run(store.remove("k")), asyncio.run(store.remove("k"))
            (True, False)
        """

        def remove() -> bool:
            where = self.locate(key)
            if where is None:
                return False
            try:
                os.unlink(self.path / where[0] / where[1])
            except FileNotFoundError:
                return False
            unlink_quietly(self.error_path(key))
            return True

        return await asyncio.to_thread(remove)

    async def clear(self) -> int:
        """Delete every message (waiting, delayed, claimed) and its record; how many went.

        Example:
            >>> import tempfile; store = MaildirStore(tempfile.mkdtemp()); store.ensure()
            >>> for sub in STATE_DIRS: _ = (store.dir(sub) / f"k{sub}").write_bytes(b"")
            >>> asyncio.run(store.clear()), asyncio.run(store.count())
            (3, 0)
        """

        def clear() -> int:
            removed = 0
            for sub, filename in list(self._entries()):
                try:
                    os.unlink(self.path / sub / filename)
                    removed += 1
                except FileNotFoundError:
                    continue
                unlink_quietly(self.error_path(MaildirName.parse(filename).key))
            return removed

        return await asyncio.to_thread(clear)

    async def requeue(self, *, source: str | None = None) -> int:
        """Move buried messages from this (undeliverable) queue back where they came from.

        The origin of each is the ``queue`` of its error record; messages without one
        stay. Attempts and recoveries start again from zero.

        Args:
            source: only messages buried from this queue directory (all when ``None``).

        Returns:
            How many messages were moved.

        Example:
            >>> import tempfile; d = Path(tempfile.mkdtemp())
            >>> dead = MaildirStore(d / "dead"); dead.ensure()
            >>> _ = (dead.dir("new") / "k,A=5").write_bytes(b"\\n")
            >>> dead.write_error_record("k", {"queue": str(d / "q")}, sync=False)
            >>> asyncio.run(dead.requeue()), os.listdir(d / "q" / "new")
            (1, ['k'])
        """
        wanted = None if source is None else str(Path(source).absolute())

        def requeue() -> int:
            moved = 0
            touched: set[Path] = set()
            for sub, filename in list(self._entries()):
                name = MaildirName.parse(filename)
                record = self.error_record(name.key) or {}
                origin = record.get("queue")
                if not isinstance(origin, str) or (wanted is not None and origin != wanted):
                    continue
                target = MaildirStore(origin)
                target.ensure()
                try:
                    os.rename(self.path / sub / filename, target.dir("new") / name.fresh().filename)
                except FileNotFoundError:
                    continue
                touched.add(target.dir("new"))
                unlink_quietly(self.error_path(name.key))
                moved += 1
            for folder in touched:
                fsync_dir(folder)
            return moved

        return await asyncio.to_thread(requeue)
