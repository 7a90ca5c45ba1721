"""serve's DATA loop answers and stores exactly as aiosmtpd's own ``smtp_DATA`` does.

The same byte streams go over real sockets to two listeners: maildefer's session and the
same session running aiosmtpd's loop. Small limits make the 500 (line too long) and 552
(too much data) paths easy to reach; fake terminators (``\\n.\\n``, ``\\r.\\r``...) and
dot-stuffing are in the alphabet.
"""

from __future__ import annotations

import asyncio
from functools import partial

from aiosmtpd.smtp import SMTP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maildefer.mail import MailRequest
from maildefer.settings import ServerSettings
from maildefer.smtp.session import AcceptAll, DeliveryPolicy, SessionTracker, SMTPSession

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
