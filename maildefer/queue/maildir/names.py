"""Maildir file names: unique, collision-proof, and carrying the queue state of a message.

A name starts with the message's **key** (:mod:`maildefer.queue.keys`), which never
changes. maildefer appends its state as comma fields, the way Dovecot appends
``,S=<size>``, so that moving a message between states is one atomic ``rename`` and no
other file is written:

- ``,A=<n>``  failed attempts so far
- ``,R=<n>``  recoveries: times a worker died holding it (the poison count)
- ``,T=<ms>`` not before this Unix time in milliseconds (retry backoff), in ``later/``
- ``,W=<host>~<pid>~<start>`` the claiming worker, in ``cur/``

Fields maildefer does not know (``S=`` and the like) are kept as they came.

Example:
    >>> n = MaildirName.parse("1700000000.M1P2Q3Rab.host,A=2")
    >>> n.key, n.attempts
    ('1700000000.M1P2Q3Rab.host', 2)
    >>> n.with_fields(A=3).filename
    '1700000000.M1P2Q3Rab.host,A=3'
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class MaildirName:
    """A parsed maildir file name: the key, maildefer's state fields, the info suffix.

    Example:
        >>> MaildirName.parse("k,S=12:2,S").filename
        'k,S=12:2,S'
    """

    key: str
    # A value of None is a field written without "=" (another program's name): kept so
    # that parse(name).filename == name and a rename never invents a new file name.
    fields: tuple[tuple[str, str | None], ...] = ()
    info: str = ""

    @classmethod
    def parse(cls, filename: str) -> MaildirName:
        """Split a file name into key, fields and ``:info``.

        Example:
            >>> MaildirName.parse("k,A=1,W=h~1~2:2,").fields
            (('A', '1'), ('W', 'h~1~2'))
        """
        base, sep, info = filename.partition(":")
        key, *rest = base.split(",")
        parsed: list[tuple[str, str | None]] = []
        for item in rest:
            name, eq, value = item.partition("=")
            parsed.append((name, value if eq else None))
        return cls(key, tuple(parsed), sep + info)

    @classmethod
    def claimed(cls, key: str, owner: str) -> MaildirName:
        """A fresh key (no fields) claimed by ``owner``: the name ``key,W=owner``.

        The claim path's shortcut for ``parse(key).with_fields(W=owner)``, with the
        file name made once (it is joined again at ack).

        Example:
            >>> n = MaildirName.claimed("k", "h~1~2")
            >>> n == MaildirName.parse("k").with_fields(W="h~1~2"), n.filename
            (True, 'k,W=h~1~2')
        """
        name = cls(key, (("W", owner),))
        name.__dict__["filename"] = f"{key},W={owner}"  # the cached_property's slot
        return name

    @cached_property
    def filename(self) -> str:  # cached: a claim's name is joined again at ack
        """The file name this parses from (fields in their order).

        Example:
            >>> MaildirName("k", (("A", "1"),)).filename
            'k,A=1'
        """
        tail = "".join(f",{k}" if v is None else f",{k}={v}" for k, v in self.fields)
        return f"{self.key}{tail}{self.info}"

    def field(self, name: str) -> str | None:
        """One field's value, or ``None``.

        Example:
            >>> MaildirName.parse("k,T=5").field("T")
            '5'
        """
        for k, v in self.fields:
            if k == name:
                return "" if v is None else v
        return None

    def _int(self, name: str) -> int:
        value = self.field(name)
        try:
            return int(value) if value is not None else 0
        except ValueError:
            return 0

    @property
    def attempts(self) -> int:
        """Failed attempts recorded in the name (``A=``).

        Example:
            >>> MaildirName.parse("k").attempts
            0
        """
        return self._int("A")

    @property
    def recoveries(self) -> int:
        """Times a dead worker's claim on it was recovered (``R=``).

        Example:
            >>> MaildirName.parse("k,R=2").recoveries
            2
        """
        return self._int("R")

    @property
    def due_ms(self) -> int:
        """When a delayed message becomes due, Unix ms (``T=``), 0 if not delayed.

        Example:
            >>> MaildirName.parse("k,T=1500").due_ms
            1500
        """
        return self._int("T")

    def with_fields(self, **changes: str | int | None) -> MaildirName:
        """A copy with fields set (``None`` removes one); new fields go last.

        Example:
            >>> MaildirName.parse("k,A=1,W=x").with_fields(W=None, A=2).filename
            'k,A=2'
        """
        remaining = dict(changes)
        out: list[tuple[str, str | None]] = []
        for k, v in self.fields:
            if k in remaining:
                new = remaining.pop(k)
                if new is not None:
                    out.append((k, str(new)))
            else:
                out.append((k, v))
        out.extend((k, str(v)) for k, v in remaining.items() if v is not None)
        return MaildirName(self.key, tuple(out), self.info)

    def fresh(self) -> MaildirName:
        """The name with every state field and the info suffix dropped (a requeue).

        Example:
            >>> MaildirName.parse("k,A=5,R=1,S=9:2,S").fresh().filename
            'k,S=9'
        """
        ours = {"A", "R", "T", "W"}
        return MaildirName(self.key, tuple((k, v) for k, v in self.fields if k not in ours))
