"""Differential tests: maildefer's SMTP session against aiosmtpd's own code, same inputs.

These pin maildefer/smtp/session.py's use of aiosmtpd internals (the list is in that
module's docstring; pyproject.toml bounds aiosmtpd below 1.5 for it). A failure here after
an aiosmtpd upgrade means session.py must be re-checked against the new aiosmtpd before the
bound is raised.

- DATA: serve's DATA loop answers and stores exactly as aiosmtpd's own ``smtp_DATA`` does.
  The same byte streams go over real sockets to two listeners: maildefer's session and
  the same session running aiosmtpd's loop. Small limits make the 500 (line too long) and
  552 (too much data) paths easy to reach; fake terminators (``\\n.\\n``, ``\\r.\\r``...)
  and dot-stuffing are in the alphabet.
- Addresses: the MAIL/RCPT address fast path (``SMTPSession._getaddr``) gives exactly
  what aiosmtpd's own parser gives.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maildefer.mail import MailRequest
from maildefer.settings import ServerSettings
from maildefer.smtp.policy import AcceptAll, DeliveryPolicy, SessionTracker
from maildefer.smtp.session import SMTPSession

# -- DATA: our loop against aiosmtpd's smtp_DATA ------------------------------------------

LINE_LIMIT = 40
SIZE_LIMIT = 300


class _Ours(SMTPSession):
    line_length_limit = LINE_LIMIT


class _Reference(_Ours):
    async def _smtp_data(self, arg: str) -> None:
        await SMTP.smtp_DATA(self, arg)


async def _transcript(cls: type[SMTPSession], stream: bytes) -> tuple[bytes, list[bytes]]:
    """Everything the server said to ``stream``, and the messages it delivered."""
    stored: list[bytes] = []

    async def sink(message: MailRequest) -> None:
        stored.append(message.raw)

    config = ServerSettings(hostname="mx.test", max_message_size=SIZE_LIMIT, max_bad_commands=50)
    policy = DeliveryPolicy(AcceptAll(sink), config, per_recipient=False)
    factory = partial(cls, policy, SessionTracker(), settings=config)
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(stream)
        await writer.drain()
        said = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    return said, stored


def _compare(body: bytes) -> None:
    stream = (
        b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@b.test>\r\nDATA\r\n"
        + body
        + b"\r\n.\r\nQUIT\r\n"
    )

    async def both() -> None:
        ours = await _transcript(_Ours, stream)
        reference = await _transcript(_Reference, stream)
        assert ours == reference

    asyncio.run(both())


def test_plain_message_same_as_aiosmtpd() -> None:
    _compare(b"Subject: x\r\n\r\n" + b"line\r\n" * 5 + b"..dot-stuffed\r\n.x")


def test_line_too_long_same_as_aiosmtpd() -> None:
    _compare(b"Subject: x\r\n\r\n" + b"y" * (LINE_LIMIT * 3) + b"\r\nafter")


def test_line_at_the_limit_same_as_aiosmtpd() -> None:
    _compare(b"y" * (LINE_LIMIT - 2) + b"\r\n" + b"z" * (LINE_LIMIT - 1) + b"\r\nend")


def test_too_much_data_same_as_aiosmtpd() -> None:
    _compare(b"Subject: x\r\n\r\n" + b"0123456789\r\n" * 40)


_PIECES = [
    b"x",
    b"yyyyyyyyyyyyyyyyyyyy",
    b".",
    b"..",
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n.\n",
    b"\n.\r\n",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_PIECES), max_size=60))
def test_random_bodies_same_as_aiosmtpd(pieces: list[bytes]) -> None:
    _compare(b"".join(pieces))


# -- Addresses: our _getaddr against aiosmtpd's parser --------------------------------------


def _session(local_part_limit: int = 0) -> SMTPSession:
    async def make() -> SMTPSession:
        config = ServerSettings(hostname="mx.test")
        session = SMTPSession(
            DeliveryPolicy(AcceptAll(), config), SessionTracker(), settings=config
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
def test_address_same_as_aiosmtpd(arg: str) -> None:
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
