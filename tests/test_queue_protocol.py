"""Every queue backend satisfies QueueBackend: each member present, of the same kind, with
a compatible signature and the same types.

``isinstance(backend, QueueBackend)`` checks only that the names exist; a member added to
the Protocol with a signature a backend does not follow would pass it and fail in the
worker. No broker is needed: the backends are only constructed, never connected.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from maildefer.mail import MailRequest
from maildefer.queue.amqp import AmqpQueue
from maildefer.queue.backend import Claim, Pushable, QueueBackend, RecoveryReport
from maildefer.queue.maildir import MaildirQueue

P = inspect.Parameter


def protocol_members() -> list[str]:
    """The public members of QueueBackend: its methods, properties and data attributes."""
    names = set(QueueBackend.__annotations__)
    names |= {name for name in vars(QueueBackend) if not name.startswith("_")}
    return sorted(names)


MEMBERS = protocol_members()


def _kind_fits(wanted: inspect._ParameterKind, got: inspect._ParameterKind) -> bool:
    # A backend may accept a parameter in more ways than the Protocol promises, never fewer.
    if wanted is got:
        return True
    return got is P.POSITIONAL_OR_KEYWORD and wanted in (P.POSITIONAL_ONLY, P.KEYWORD_ONLY)


def signature_problems(wanted: Callable[..., Any], got: Callable[..., Any]) -> list[str]:
    """How ``got`` (a backend's method) fails to be callable as ``wanted`` (the Protocol's)."""
    problems: list[str] = []
    if inspect.iscoroutinefunction(wanted) != inspect.iscoroutinefunction(got):
        problems.append("async in one and not the other")
    want_sig, got_sig = inspect.signature(wanted), inspect.signature(got)
    want_hints, got_hints = get_type_hints(wanted), get_type_hints(got)
    want_positional = [
        name for name, p in want_sig.parameters.items() if p.kind is not P.KEYWORD_ONLY
    ]
    got_positional = [
        name for name, p in got_sig.parameters.items() if p.kind is not P.KEYWORD_ONLY
    ]
    if got_positional[: len(want_positional)] != want_positional:
        problems.append(f"positional parameters {got_positional}, expected {want_positional}")
    left = dict(got_sig.parameters)
    for name, want in want_sig.parameters.items():
        have = left.pop(name, None)
        if have is None:
            problems.append(f"no parameter {name!r}")
            continue
        if not _kind_fits(want.kind, have.kind):
            problems.append(
                f"parameter {name!r} is {have.kind.description}, not {want.kind.description}"
            )
        if want.default is not P.empty and have.default is P.empty:
            problems.append(f"parameter {name!r} has no default")
        if want_hints.get(name) != got_hints.get(name):
            problems.append(f"parameter {name!r}: {got_hints.get(name)} != {want_hints.get(name)}")
    for name, extra in left.items():
        if extra.default is P.empty and extra.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD):
            problems.append(f"extra parameter {name!r} without a default")
    if want_hints.get("return") != got_hints.get("return"):
        problems.append(f"returns {got_hints.get('return')}, not {want_hints.get('return')}")
    return problems


def member_problems(backend: object, name: str) -> list[str]:
    """How ``backend`` fails to provide the Protocol member ``name``."""
    wanted = inspect.getattr_static(QueueBackend, name, None)
    got = inspect.getattr_static(type(backend), name, None)
    if wanted is None:  # a data attribute: annotated on the Protocol only
        if not hasattr(backend, name):
            return ["missing"]
        kind = get_type_hints(QueueBackend)[name]
        value = getattr(backend, name)
        return [] if isinstance(value, kind) else [f"{value!r} is not a {kind.__name__}"]
    if got is None:
        return ["missing"]
    if isinstance(wanted, property):
        if not isinstance(got, property) or got.fget is None:
            return [f"{got!r} is not a property"]
        assert wanted.fget is not None
        return signature_problems(wanted.fget, got.fget)
    if not inspect.isfunction(got):
        return [f"{got!r} is not a method"]
    return signature_problems(wanted, got)


def make_maildir(tmp_path: Path) -> object:
    return MaildirQueue(tmp_path / "q")


def make_amqp(tmp_path: Path) -> object:
    return AmqpQueue("amqp://guest:guest@127.0.0.1:1/?queue=protocol")


BACKENDS = [pytest.param(make_maildir, id="maildir"), pytest.param(make_amqp, id="amqp")]


def test_the_member_list_is_the_protocols() -> None:
    # Guards the enumeration itself: an empty or partial list would make the rest vacuous.
    expected = {
        "url", "push", "count", "keys", "get", "remove", "pop", "clear", "consume",
        "claims", "lease_renewal", "renew", "ack", "retry", "bury", "release", "recover",
        "close", "push_sync", "close_sync",
    }  # fmt: skip
    assert set(MEMBERS) == expected


@pytest.mark.parametrize("make", BACKENDS)
@pytest.mark.parametrize("name", MEMBERS)
def test_backend_provides_member(make: Callable[[Path], object], name: str, tmp_path: Path) -> None:
    backend = make(tmp_path)
    assert member_problems(backend, name) == []


@pytest.mark.parametrize("make", BACKENDS)
def test_backend_is_a_queue_backend(make: Callable[[Path], object], tmp_path: Path) -> None:
    assert isinstance(make(tmp_path), QueueBackend)


# -- the checker itself catches what isinstance does not -------------------------------------


class _Drifted:
    """A backend whose members drift from the Protocol in the ways the checks must catch."""

    url = "x"

    def claims(self, *, prefetch: int, burst: bool) -> AsyncIterator[Claim]:  # no ready=
        raise NotImplementedError

    lease_renewal = 5.0  # a plain attribute, not a property

    def renew(self, claims: Sequence[Claim]) -> None:  # not async
        raise NotImplementedError

    async def retry(  # an extra parameter without a default
        self, claim: Claim, error: str, delay: float | None = None, *, urgent: bool
    ) -> bool:
        raise NotImplementedError

    async def recover(self) -> int:  # the wrong return type
        raise NotImplementedError

    async def bury(self, claim: Claim, error: str, *, reason: str) -> None:  # keyword-only
        raise NotImplementedError


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("claims", "no parameter 'ready'"),
        ("lease_renewal", "is not a property"),
        ("renew", "async in one and not the other"),
        ("retry", "extra parameter 'urgent' without a default"),
        ("recover", f"not {RecoveryReport}"),
        ("bury", "parameter 'reason' is keyword-only"),
        ("close", "missing"),
    ],
)
def test_the_checker_catches_a_drifted_backend(name: str, problem: str) -> None:
    problems = member_problems(_Drifted(), name)
    assert any(problem in p for p in problems), problems


def test_a_backend_may_add_optional_parameters() -> None:
    class Wider:
        async def push(self, message: Pushable, *, priority: int = 0) -> str:
            raise NotImplementedError

        async def pop(self, wait: float = 0.0) -> tuple[str, MailRequest] | None:
            raise NotImplementedError

    assert member_problems(Wider(), "push") == []
    assert member_problems(Wider(), "pop") == []
