"""Shared fixtures: the message corpus, a runner for ``python -m maildefer``, the smarthost
certificate, captured JSON logs and a fresh broker queue."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import structlog
from helpers.broker import BROKER
from helpers.ops import Notify
from helpers.rabbit_cluster import rabbit_cluster, rabbit_node  # noqa: F401 (fixtures)
from helpers.smarthost import Cert, make_cert

from maildefer import logs

# Real messages from CPython's email test suite, kept in the repository (tests/corpus/README.md).
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

RunCli = Callable[..., subprocess.CompletedProcess[bytes]]


@pytest.fixture(scope="session")
def corpus() -> list[Path]:
    """Every real test message (``*.eml``) of the corpus in ``tests/corpus/``.

    The corpus is part of the repository: a missing one is a broken checkout, so this fails
    instead of skipping (a skip would hide that the byte-exactness tests did not run).
    """
    paths = sorted(CORPUS_DIR.glob("*.eml"))
    assert len(paths) >= 20, f"the message corpus is missing from {CORPUS_DIR}"
    return paths


@pytest.fixture
def run_cli(tmp_path: Path) -> RunCli:
    """Run ``python -m maildefer ARGS`` in a subprocess; returns the completed process.

    ``cwd`` defaults to ``tmp_path``; ``env`` entries are added to a copy of the
    environment with ``MAILDEFER_*`` variables removed (so the caller's shell cannot leak
    settings in). stdout and stderr are bytes.
    """

    def run(
        *args: str | os.PathLike[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        input: bytes | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[bytes]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MAILDEFER_")}
        environ["PYTHONPATH"] = os.pathsep.join(
            [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        environ.update(env or {})
        argv: Sequence[str] = [sys.executable, "-m", "maildefer", *map(os.fspath, args)]
        return subprocess.run(
            argv,
            cwd=cwd or tmp_path,
            env=environ,
            input=input,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Notify]:
    """A stand-in for systemd's notify socket (``NOTIFY_SOCKET``) in ``tmp_path``."""
    n = Notify(tmp_path / "notify")
    yield n
    n.close()


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one: the big bursts measure the worker, not ext4."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="maildefer-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    """A self-signed certificate for localhost/127.0.0.1 (the smarthost tests)."""
    return make_cert(tmp_path_factory.mktemp("cert"))


@pytest.fixture
def log_out() -> Iterator[io.StringIO]:
    """Every log line (debug included), JSON, in a buffer."""
    out = io.StringIO()
    logs.configure(level="debug", fmt="json", stream=out)
    yield out
    structlog.reset_defaults()


@pytest.fixture
def amqp_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh queue on the machine's broker; it and its undeliverable queue go afterwards."""
    name = f"t-{request.node.module.__name__.removeprefix('test_')}-{uuid.uuid4().hex[:12]}"
    yield f"{BROKER}?queue={name}"

    async def delete() -> None:
        import aio_pika

        connection = await aio_pika.connect(BROKER, timeout=2)
        channel = await connection.channel()
        for queue in (name, f"{name}.undeliverable"):
            await channel.queue_delete(queue)
        await connection.close()

    asyncio.run(delete())
