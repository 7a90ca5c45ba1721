"""`maildefer gen DIR`: a new project that works as it is."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

RunCli = Callable[..., subprocess.CompletedProcess[bytes]]
ROOT = Path(__file__).resolve().parent.parent


def test_gen_creates_a_working_project(run_cli: RunCli, tmp_path: Path) -> None:
    target = tmp_path / "blog"
    done = run_cli("gen", str(target), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in (
        "app/handlers/posting.py",
        "config/settings.toml",
        ".gitignore",
        "config/systemd/maildefer-worker@.service",
    ):
        assert (target / name).is_file(), name
    # The copy is the example, byte for byte.
    assert (target / "app/handlers/index.py").read_bytes() == (
        ROOT / "app/handlers/index.py"
    ).read_bytes()
    routes = run_cli("routes", "--test", "hello@example.com", cwd=target)
    assert routes.returncode == 0, routes.stderr
    assert b"app.handlers.posting" in routes.stdout


def test_gen_refuses_a_non_empty_directory(run_cli: RunCli, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    done = run_cli("gen", str(tmp_path / "taken"), cwd=tmp_path)
    assert done.returncode == 2
    assert len(done.stderr.decode().strip().splitlines()) == 1
    assert b"not empty" in done.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_generated_project_runs_its_own_handlers(run_cli: RunCli, tmp_path: Path) -> None:
    target = tmp_path / "blog"
    assert run_cli("gen", str(target), cwd=tmp_path).returncode == 0
    posting = target / "app/handlers/posting.py"
    posting.write_text(
        posting.read_text().replace(
            '@route("(post_name)@(host)")', '@route("(post_name)-blog@(host)")'
        )
    )
    # The project's own modules are used, not the example's: the old address is refused.
    assert run_cli("routes", "--test", "hello@example.com", cwd=target).returncode == 1
    assert run_cli("routes", "--test", "hello-blog@example.com", cwd=target).returncode == 0


def _pytest_in(project: Path) -> subprocess.CompletedProcess[bytes]:
    """``python -m pytest`` in a generated project, as its author would run it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MAILDEFER_", "PYTEST_")) and k != "PYTHONPATH"
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project,
        env=env,
        capture_output=True,
        timeout=300,
    )


def test_generated_tests_pass_and_catch_a_broken_handler(run_cli: RunCli, tmp_path: Path) -> None:
    target = tmp_path / "blog"
    assert run_cli("gen", str(target), cwd=tmp_path).returncode == 0
    for name in ("tests/test_posting.py", "tests/test_index.py", "pytest.ini"):
        assert (target / name).is_file(), name
    assert not (target / "app/project_tests").exists()
    # The venv's python has maildefer installed: its pytest11 plugin gives the fixtures.
    done = _pytest_in(target)
    assert done.returncode == 0, done.stdout.decode()[-3000:]
    assert b"7 passed" in done.stdout
    posting = target / "app/handlers/posting.py"
    text = posting.read_text()
    docstring = '    """A sender\'s first post."""\n'
    assert docstring in text
    posting.write_text(
        text.replace(docstring, docstring + '    raise RuntimeError("START is broken")\n')
    )
    broken = _pytest_in(target)
    assert broken.returncode == 1, broken.stdout.decode()[-3000:]
    assert b"RuntimeError: START is broken" in broken.stdout
    assert b"test_a_post_is_queued_and_answered FAILED" in broken.stdout or (
        b"FAILED tests/test_posting.py::test_a_post_is_queued_and_answered" in broken.stdout
    )
