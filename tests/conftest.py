"""Shared fixtures: the message corpus and a runner for ``python -m maildefer``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from helpers.ops import Notify

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
