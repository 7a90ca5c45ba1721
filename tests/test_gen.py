"""`maildefer gen DIR`: a new project that works as it is."""

from __future__ import annotations

import subprocess
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
