"""State stores: the in-memory one and the SQLite file shared by processes and restarts."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from maildefer import MailRequest, Router
from maildefer.settings import Settings
from maildefer.state import MemoryStateStore, SqliteStateStore, StateStore, state_store_for


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStateStore]:
    store = SqliteStateStore(tmp_path / "run" / "state.db")
    yield store
    store.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_get_set_clear(kind: str, tmp_path: Path) -> None:
    store: StateStore = (
        MemoryStateStore() if kind == "memory" else SqliteStateStore(tmp_path / "s.db")
    )
    try:
        assert isinstance(store, StateStore)
        assert await store.get("m:a@x") is None
        await store.set("m:a@x", "POSTING")
        await store.set("m:b@x", "START")
        await store.set("m:a@x", "CONFIRMING")
        assert await store.get("m:a@x") == "CONFIRMING"
        assert await store.get("m:b@x") == "START"
        await store.clear()
        assert await store.get("m:a@x") is None
    finally:
        if isinstance(store, SqliteStateStore):
            store.close()


async def test_sqlite_file_created_on_first_use_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "run" / "state.db"
    store = SqliteStateStore(path)
    assert not path.exists()  # nothing happens at construction
    try:
        await store.set("m:a@x", "POSTING")
    finally:
        store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT key, state FROM state").fetchall() == [("m:a@x", "POSTING")]
    conn.close()


async def test_sqlite_persists_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SqliteStateStore(path)
    await first.set("app:ann@x.org", "POSTING")
    first.close()
    second = SqliteStateStore(path)
    try:
        assert await second.get("app:ann@x.org") == "POSTING"
    finally:
        second.close()


async def test_sqlite_shared_with_another_process(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStateStore(path)
    try:
        await store.set("app:ann@x.org", "POSTING")  # table exists, connection open
        script = textwrap.dedent(
            f"""
            import asyncio
            from maildefer.state import SqliteStateStore
            async def main():
                store = SqliteStateStore({str(path)!r})
                print(await store.get("app:ann@x.org"))
                await store.set("app:bob@x.org", "CONFIRMING")
                store.close()
            asyncio.run(main())
            """
        )
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "POSTING"
        assert await store.get("app:bob@x.org") == "CONFIRMING"
    finally:
        store.close()


async def test_sqlite_concurrent_sets_from_many_tasks(sqlite_store: SqliteStateStore) -> None:
    await asyncio.gather(*(sqlite_store.set(f"m:{i}@x", f"S{i}") for i in range(50)))
    got = await asyncio.gather(*(sqlite_store.get(f"m:{i}@x") for i in range(50)))
    assert got == [f"S{i}" for i in range(50)]


async def test_router_state_survives_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "blog_state_handlers.py").write_text(
        textwrap.dedent(
            """
            from maildefer import route, route_like
            CALLS = []

            @route("(name)@(host)")
            async def START(message, name, host):
                CALLS.append("START")
                return POSTING

            @route_like(START)
            async def POSTING(message, name, host):
                CALLS.append("POSTING")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "blog_state_handlers", raising=False)
    message = MailRequest(b"\r\n", mail_from="ann@x.org", rcpt_tos=["a@example.com"])
    path = tmp_path / "run" / "state.db"
    calls: Callable[[], list[str]] = lambda: sys.modules["blog_state_handlers"].CALLS  # noqa: E731
    for _ in range(2):  # the second time round is "after a restart": new store, new router
        store = SqliteStateStore(path)
        try:
            await Router.from_modules(["blog_state_handlers"], state=store).deliver(message)
        finally:
            store.close()
    assert calls() == ["START", "POSTING"]
    monkeypatch.delitem(sys.modules, "blog_state_handlers")


def test_state_store_for_settings_resolves_under_root(tmp_path: Path) -> None:
    settings = Settings(root=tmp_path, router={"state_store": "run/custom.db"})
    store = state_store_for(settings)
    assert store.path == tmp_path / "run" / "custom.db"
    assert state_store_for(Settings(root=tmp_path)).path == tmp_path / "run" / "state.db"
