"""The MAIL/RCPT address fast path gives exactly what aiosmtpd's own parser gives."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from maildefer.settings import ServerSettings
from maildefer.smtp.session import AcceptAll, DeliveryPolicy, SessionTracker, SMTPSession


def _session(local_part_limit: int = 0) -> SMTPSession:
    async def make() -> SMTPSession:
        settings = ServerSettings(hostname="mx.test")
        session = SMTPSession(
            DeliveryPolicy(AcceptAll(), settings), SessionTracker(), settings=settings
        )
        session.local_part_limit = local_part_limit
        return session

    return asyncio.run(make())


def _reference(session: SMTPSession, arg: str) -> tuple[Any, Any]:
    """aiosmtpd's parser, with the session's handling of the stdlib parser's crashes."""
    try:
        return SMTP._getaddr(session, arg)  # type: ignore[no-any-return]
    except Exception:
        return None, None


PLAIN = [
    "<a@b.test>",
    "<post@bench.test> SIZE=4096",
    "<A.B+tag@Sub.Example.COM>  BODY=8BITMIME SMTPUTF8",
    "<a@b.c>\tX",
    "<a@b.c>X",
    "<a@b.c> ",
    "<a@b.c>\x0b X",
    "<a!#$%&*+/=?^_`{|}~-@x-y.z>",
    "<a@b.c>\r\n",
]
OTHER = [
    "",
    "<>",
    "<> SIZE=1",
    "<a@b.c>(comment) X",
    "<a@b.c> (comment) X",
    "<a..b@c>",
    "<a@b..c>",
    "<.a@b>",
    "<a@b.>",
    "<a@b c>",
    "<a@[1.2.3.4]>",
    '<"a b"@c>',
    "<@relay.test:a@b.c>",
    "a@b.c",
    " <a@b.c>",
    "<a@b.c",
    "<",
    "<x@",
    "<postmaster>",
    "<caf\u00e9@b.c>",
]


@pytest.mark.parametrize("arg", PLAIN + OTHER)
def test_same_as_aiosmtpd(arg: str) -> None:
    session = _session()
    assert session._getaddr(arg) == _reference(session, arg)


def test_local_part_limit_applies_on_the_fast_path() -> None:
    session = _session(local_part_limit=3)
    assert session._getaddr("<abcd@b.c>") == (None, None) == _reference(session, "<abcd@b.c>")
    assert session._getaddr("<abc@b.c> X") == ("abc@b.c", "X")


@pytest.mark.parametrize("arg", PLAIN)
def test_plain_paths_skip_the_stdlib_parser(arg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The point of the fast path: the stdlib header parser (40 us a command) is not run.
    def refuse(self: SMTP, arg: str) -> tuple[Any, Any]:
        raise AssertionError(f"aiosmtpd's parser called for {arg!r}")

    session = _session()
    expected = _reference(session, arg)
    monkeypatch.setattr(SMTP, "_getaddr", refuse)
    assert session._getaddr(arg) == expected


_ALPHABET = 'ab.@<> \t()"[]:,\\-+=_~\x0b\r\n\u00e9Z9'


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=24))
def test_random_arguments_same_as_aiosmtpd(arg: str) -> None:
    session = _SESSION
    assert session._getaddr(arg) == _reference(session, arg)


@settings(max_examples=1500, deadline=None)
@given(
    st.from_regex(r"<[a-z.+]{0,6}@[a-z.\-]{0,6}>[ \t(a-z=]{0,6}", fullmatch=True),
)
def test_near_plain_arguments_same_as_aiosmtpd(arg: str) -> None:
    session = _SESSION
    assert session._getaddr(arg) == _reference(session, arg)


_SESSION = _session()
