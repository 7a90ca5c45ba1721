"""Queue keys: unique, collision-proof names for messages, shared by every backend.

A key is ``<sec>.M<usec>P<pid>Q<seq>R<random>.<host>`` (DJB's maildir spec, with
Courier's ``R`` random part), the host escaped so it holds no ``/``, ``:`` or ``,``. The
maildir backend uses it as the file name's stable part (:mod:`maildefer.queue.maildir.names`
adds the state fields); the RabbitMQ backend as the message id. Its first part is the
time it was made, which :func:`key_time` reads back.

Example:
    >>> key = NameGenerator(host="mx.example.org").next_key()
    >>> key.endswith(".mx.example.org"), abs(key_time(key) - time.time()) < 60
    (True, True)
"""

from __future__ import annotations

import os
import random
import socket
import time
from dataclasses import dataclass, field


def escape_host(host: str) -> str:
    r"""A host name made safe for a maildir name (``/``, ``:``, ``,``, ``~`` and ``\``).

    Example:
        >>> escape_host("a/b:c,d")
        'a\\057b\\072c\\054d'
    """
    return (
        host.replace("\\", "\\134")
        .replace("/", "\\057")
        .replace(":", "\\072")
        .replace(",", "\\054")
        .replace("~", "\\176")
    )


def key_time(name: str) -> float | None:
    """When a message was queued, from the ``<sec>.M<usec>`` start of its key.

    A maildir name starts with the Unix time of its delivery (DJB's spec), so a name
    made by another maildir writer (``<sec>.<pid>.<host>``) gives its second too.
    ``name`` may be a bare key or a whole file name with fields and info.

    Example:
        >>> key_time("1700000000.M250000P1Q1Rab.host,A=2")
        1700000000.25
        >>> key_time("1700000000.12345.host"), key_time("mutt-dropped-file:2,S")
        (1700000000.0, None)
    """
    # The key ends at the first "," (fields) or ":" (info), as in MaildirName.parse;
    # partitions rather than a parse: a claim reads its key time on the hot path.
    key = name.partition(":")[0].partition(",")[0]
    sec, _, rest = key.partition(".")
    if not sec.isdigit():
        return None
    usec = rest[1:].partition("P")[0] if rest.startswith("M") else ""
    return int(sec) + (int(usec) / 1e6 if usec.isdigit() else 0.0)


@dataclass
class NameGenerator:
    """Makes unique maildir keys for one process (pid read per call: fork-safe).

    Example:
        >>> gen = NameGenerator(host="mx")
        >>> a, b = gen.next_key(), gen.next_key()
        >>> a != b and a.endswith(".mx")
        True
    """

    host: str = field(default_factory=socket.gethostname)
    _seq: int = 0
    _random: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._escaped = escape_host(self.host)

    def next_key(self) -> str:
        """A new key: time, microseconds, pid, sequence, 64 random bits, host.

        Example:
            >>> NameGenerator(host="h").next_key().count(".")
            2
        """
        now = time.time_ns() // 1000
        self._seq += 1
        sec, usec = divmod(now, 1_000_000)
        rand = self._random.getrandbits(64)
        return f"{sec}.M{usec}P{os.getpid()}Q{self._seq}R{rand:016x}.{self._escaped}"
