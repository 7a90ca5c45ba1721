"""Settings: the contract's settings.toml, env overrides, one-line errors, path roots."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from maildefer.errors import ConfigError
from maildefer.queue.config import backend_for, resolve_queue
from maildefer.settings import Settings, load_settings

RunCli = Callable[..., subprocess.CompletedProcess[bytes]]
CONTRACT_TOML = Path(__file__).resolve().parent.parent / "config" / "settings.toml"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory holding the repository's config/settings.toml."""
    for name in list(os.environ):
        if name.startswith("MAILDEFER_"):
            monkeypatch.delenv(name)
    (tmp_path / "proj" / "config").mkdir(parents=True)
    shutil.copy(CONTRACT_TOML, tmp_path / "proj" / "config" / "settings.toml")
    return tmp_path / "proj"


def write(project: Path, text: str) -> Path:
    path = project / "config" / "settings.toml"
    path.write_text(text)
    return path


def test_contract_settings_load(project: Path) -> None:
    s = load_settings(project / "config" / "settings.toml")
    assert (s.server.host, s.server.port, s.server.hostname) == (
        "127.0.0.1",
        8823,
        "mail.example.com",
    )
    assert s.server.handlers == ["app.handlers.posting"]
    assert s.server.max_message_size == 33554432 and s.server.max_recipients == 100
    assert s.server.handler_timeout == 60.0 and s.server.lmtp is False
    assert s.router.defaults == {"host": "example\\.com"}
    assert (s.relay.host, s.relay.port) == ("127.0.0.1", 8825)
    posts = s.queues["posts"]
    assert posts.path == "run/posts" and posts.handlers == ["app.handlers.index"]
    assert (posts.concurrency, posts.max_attempts) == (8, 5)
    assert (posts.retry_delay, posts.retry_max_delay, posts.handler_timeout) == (
        30.0,
        3600.0,
        300.0,
    )
    assert s.undeliverable.path == "run/undeliverable"
    assert s.root == project


def test_env_overrides_a_value(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILDEFER_SERVER__PORT", "2525")
    s = load_settings(project / "config" / "settings.toml")
    assert s.server.port == 2525
    assert s.server.hostname == "mail.example.com"  # the rest of [server] from the file


def test_nested_env_merges_with_the_file_table(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILDEFER_QUEUES__POSTS__CONCURRENCY", "3")
    posts = load_settings(project / "config" / "settings.toml").queues["posts"]
    assert posts.concurrency == 3
    assert posts.path == "run/posts" and posts.handlers == ["app.handlers.index"]
    assert posts.max_attempts == 5


def test_relative_paths_resolve_against_the_project_root(
    project: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # not the project: the cwd must not matter
    s = load_settings(project / "config" / "settings.toml")
    assert resolve_queue(s, "posts") == str(project / "run" / "posts")
    assert resolve_queue(s, "run/other") == str(project / "run" / "other")
    assert resolve_queue(s, "/abs/q") == "/abs/q"
    assert s.resolve(s.undeliverable.path) == project / "run" / "undeliverable"
    assert backend_for(s, "posts").url == str(project / "run" / "posts")


def test_settings_without_a_file_use_defaults_and_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(None)
    assert s.root == tmp_path and s.server.port == 8823
    with pytest.raises(ConfigError, match="no such settings file"):
        load_settings(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("toml", "env", "needles"),
    [
        ("[server]\nprot = 25\n", {}, ["server.prot", "unknown key", "25"]),
        ('[server]\nport = "lots"\n', {}, ["server.port", "'lots'", "integer"]),
        ("[server]\nport = 70000\n", {}, ["server.port", "70000", "65535"]),
        (
            '[queues.posts]\npath = "q"\nconcurrency = 0\n',
            {},
            ["queues.posts.concurrency", "0", "greater than 0"],
        ),
        ('[router]\ndefaults = { host = "(" }\n', {}, ["router.defaults", "regex"]),
        ("", {"MAILDEFER_SERVER__PORT": "nope"}, ["server.port", "'nope'", "integer"]),
        ("", {"MAILDEFER_SERVER__BOGUS": "1"}, ["server.bogus", "unknown key"]),
        ("[server\n", {}, ["cannot read settings"]),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    project: Path, run_cli: RunCli, toml: str, env: dict[str, str], needles: list[str]
) -> None:
    config = write(project, toml)
    for action in (["queue", "run/q", "count"],):
        proc = run_cli("--config", config, *action, env=env, cwd=project)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == b""
        lines = proc.stderr.decode().splitlines()
        assert len(lines) == 1, lines
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
    assert not (project / "run").exists()  # stopped before touching anything


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(Exception, match="frozen"):
        s.server.port = 1  # type: ignore[misc]
