"""A pre-imported parent that forks queue children for the crash tests.

Importing maildefer takes ~0.6 s here; 50 crash rounds would spend most of their time
starting Python. This process imports once, then forks one child per command. Every
line goes out with a single ``os.write`` on fd 1 (atomic below PIPE_BUF), so what a child
wrote before it was SIGKILLed is in the pipe, and nothing is buffered twice by a fork.

Commands on stdin, one per line:
    push QUEUE SEED    fork a child that pushes random messages forever, writing
                       ``key <key> <sha256 of the original>`` after each push returns
    push_sync QUEUE SEED   the same with ``push_sync``, from plain synchronous code
    claim QUEUE FILE   fork a child that claims FILE, writes ``claimed <key>``, then sleeps
    wait PID           reap a child: writes ``reaped <pid>``
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sys
import time

from maildefer.queue.maildir import MaildirQueue


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


async def push_forever(path: str, seed: int) -> None:
    rng = random.Random(seed)
    q = MaildirQueue(path)
    while True:
        size = rng.choice([200, 4096, 65536, 300_000])
        raw = b"Subject: crash\r\n\r\n" + rng.randbytes(size)
        key = await q.push(raw)
        say(f"key {key} {hashlib.sha256(raw).hexdigest()}")


def push_sync_forever(path: str, seed: int) -> None:
    rng = random.Random(seed)
    q = MaildirQueue(path)
    while True:
        size = rng.choice([200, 4096, 65536, 300_000])
        raw = b"Subject: crash\r\n\r\n" + rng.randbytes(size)
        key = q.push_sync(raw)
        say(f"key {key} {hashlib.sha256(raw).hexdigest()}")


def child(command: list[str]) -> None:
    if command[0] == "push":
        asyncio.run(push_forever(command[1], int(command[2])))
    elif command[0] == "push_sync":
        push_sync_forever(command[1], int(command[2]))
    elif command[0] == "claim":
        claim = MaildirQueue(command[1]).claim_sync(command[2])
        say(f"claimed {claim.key if claim else '-'}")
        time.sleep(3600)


def main() -> None:
    say("ready")
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "wait":
            os.waitpid(int(command[1]), 0)
            say(f"reaped {command[1]}")
            continue
        pid = os.fork()
        if pid == 0:
            try:
                child(command)
            finally:
                os._exit(0)
        say(f"pid {pid}")


if __name__ == "__main__":
    main()
