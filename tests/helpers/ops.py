"""Helpers for the operations tests: waiting on a condition, a stand-in notify socket."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


class Notify:
    """A datagram socket standing in for systemd's notify socket; remembers every field."""

    def __init__(self, path: Path) -> None:
        assert len(str(path)) < 100, "AF_UNIX paths are short"
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.fields: list[str] = []

    def wait(self, field: str, *, count: int = 1, timeout: float = 20.0) -> str:
        """Receive until ``count`` datagrams have had a line starting with ``field``.

        Returns the whole datagram of the last one.
        """
        deadline = time.monotonic() + timeout
        while True:
            seen = [f for f in self.fields if f.startswith(field)]
            if len(seen) >= count:
                return seen[count - 1]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {field!r} x{count} in {self.fields}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            # One entry per line, each prefixed by its whole datagram's first line, so a
            # READY=1 datagram's STATUS= stays findable.
            lines = data.split("\n")
            self.fields.extend("\n".join([line, *lines]) for line in lines)

    def count(self, field: str) -> int:
        return len([f for f in self.fields if f.startswith(field)])

    def close(self) -> None:
        self.sock.close()
