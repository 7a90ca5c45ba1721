"""The systemd units in config/systemd/: ``systemd-analyze verify`` and the worker mapping."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "config" / "systemd"
INSTALL_PYTHON = "/srv/maildefer/.venv/bin/python"

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package: systemd; no running systemd needed)",
)


def unit(name: str) -> configparser.RawConfigParser:
    # strict=False: a unit may repeat a key (several ListenStream=); we read single ones.
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def staged_units(tmp_path: Path) -> Path:
    """The units copied to a temp dir, ExecStart pointing at an interpreter that exists.

    verify checks that each ExecStart binary exists and is executable, and the units name
    the documented install path /srv/maildefer, which this machine does not have; the
    venv's Python stands in for it. Nothing else is changed.
    """
    staged = tmp_path / "units"
    staged.mkdir()
    for path in UNITS.iterdir():
        text = path.read_text().replace(INSTALL_PYTHON, sys.executable)
        (staged / path.name).write_text(text)
    return staged


@needs_analyze
@pytest.mark.parametrize(
    "name",
    ["maildefer.service", "maildefer.socket", "maildefer-worker@posts.service", "maildefer.target"],
)
def test_systemd_analyze_verify_is_clean(tmp_path: Path, name: str) -> None:
    staged = staged_units(tmp_path)
    # The worker template is verified through an instance, as systemd would load it.
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(staged / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on unknown keys and bad values (they are "ignored"), so any output
    # at all is treated as a failure.
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@needs_analyze
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    staged = staged_units(tmp_path)
    path = staged / "maildefer.service"
    path.write_text(path.read_text().replace("Type=notify", "Type=notifyy"))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "notifyy" in result.stdout + result.stderr


def test_services_are_notify_with_watchdog_and_hardened() -> None:
    for name in ("maildefer.service", "maildefer-worker@.service"):
        service = unit(name)["Service"]
        assert service["Type"] == "notify"
        assert service["NotifyAccess"] == "main"
        assert service["WatchdogSec"] == "30"
        assert service["Restart"] == "on-failure"
        assert service["User"] == "maildefer"
        assert service["StateDirectory"] == "maildefer"
        assert service["WorkingDirectory"] == "/srv/maildefer"
        assert service["ProtectSystem"] == "strict"
        assert service["ProtectHome"] == service["NoNewPrivileges"] == "yes"
        assert service["PrivateTmp"] == "yes"
        assert service["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
        assert service["SystemCallFilter"] == "@system-service"
        assert service["ReadWritePaths"] == "-/srv/maildefer/run"
        assert unit(name)["Unit"]["PartOf"] == "maildefer.target"
    serve = unit("maildefer.service")
    assert serve["Service"]["ExecStart"] == f"{INSTALL_PYTHON} -m maildefer serve"
    assert serve["Unit"]["Requires"] == "maildefer.socket"
    assert unit("maildefer.socket")["Socket"]["ListenStream"] == "25"
    assert "maildefer.service" in unit("maildefer.target")["Unit"]["Wants"]


def systemd_expand(line: str, instance: str) -> str:
    """What systemd makes of an ExecStart= line: specifiers, then ``$$``.

    Only what our units use: ``%I``/``%i`` (the instance), ``%%`` (a literal ``%``) and
    ``$$`` (a literal ``$``, so no environment substitution).
    """
    out, i = [], 0
    while i < len(line):
        pair = line[i : i + 2]
        if pair in ("%I", "%i"):
            out.append(instance)
        elif pair == "%%":
            out.append("%")
        elif pair == "$$":
            out.append("$")
        else:
            out.append(line[i])
            i += 1
            continue
        i += 2
    return "".join(out)


@pytest.mark.parametrize(
    ("instance", "queue"),
    [("posts", "posts"), ("posts:2", "posts"), ("bounce-handling:10", "bounce-handling")],
)
def test_worker_instance_name_maps_to_its_queue(tmp_path: Path, instance: str, queue: str) -> None:
    exec_start = unit("maildefer-worker@.service")["Service"]["ExecStart"]
    # The interpreter is replaced by a script that prints its arguments and its pid, to
    # see what python would get, and that the shell exec()s it (same pid: the main pid
    # that systemd accepts notifications from).
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "$$" "$@"\n')
    stub.chmod(0o755)
    argv = shlex.split(systemd_expand(exec_start, instance).replace(INSTALL_PYTHON, str(stub)))
    shell = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    out, _ = shell.communicate(timeout=30)
    pid, *args = out.split()
    assert args == ["-m", "maildefer", "worker", "--queue", queue]
    assert int(pid) == shell.pid
