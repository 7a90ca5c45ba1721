"""A maildefer daemon (serve, log) as a subprocess: its bound port, and a clean stop."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager


def listening_port(proc: subprocess.Popen[bytes]) -> int:
    """The port from the daemon's JSON ``listening`` line on stderr (30 s at most)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if line.startswith(b"{"):
            event = json.loads(line)
            if event.get("event") == "listening":
                return int(event["port"])
    raise AssertionError("the daemon did not start listening")


@contextmanager
def stops_cleanly(
    proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM
) -> Iterator[int]:
    """Yield the daemon's port; afterwards ``sig`` must stop it with exit status 0.

    Whatever happens, the process is gone and its stderr closed on the way out.
    """
    try:
        yield listening_port(proc)
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
    finally:
        reap(proc)


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill the daemon if it still runs, wait for it, close its stderr pipe."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()
