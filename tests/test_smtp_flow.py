"""serve end to end on real sockets: the blog flow, recipients, replies, LMTP, byte-exactness."""

from __future__ import annotations

import asyncio
import email.policy
import smtplib
import sys
from pathlib import Path

import aiosmtplib
import pytest
from helpers.smtp_server import (
    RawClient,
    make_settings,
    queued,
    running,
    write_handlers,
)

from maildefer.cli.log import log_server
from maildefer.mail import MailResponse
from maildefer.relay import Relay
from maildefer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
MSG = b"From: ann@sender.org\r\nTo: news@example.com\r\nSubject: hello\r\n\r\nbody line\r\n"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.fixture
def handlers(project: Path) -> str:
    return write_handlers(project)


def calls(module: str) -> list[str]:
    return list(sys.modules[module].CALLS)


def sendmail(port: int, rcpts: list[str], msg: bytes, **kw: object) -> dict[str, object]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        return client.sendmail("ann@sender.org", rcpts, msg, **kw)  # type: ignore[arg-type]


async def test_blog_flow_end_to_end(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    settings = make_settings(project, "app.handlers.posting")
    async with running(settings) as server:
        port = server.port
        assert port
        refused = await asyncio.to_thread(sendmail, port, ["my-first-post@example.com"], MSG)
        assert refused == {}
    [message] = queued(project / "run" / "posts")
    assert message.raw == MSG
    assert message.mail_from == "ann@sender.org"
    assert message.rcpt_tos == ["my-first-post@example.com"]
    assert message.peer.startswith("127.0.0.1:")


async def test_each_recipient_including_bcc_gets_one_handler_call(
    project: Path, handlers: str
) -> None:
    async with running(make_settings(project, handlers)) as server:
        # Bcc: in the envelope only, never in the headers.
        rcpts = ["news@example.com", "other@example.com", "hidden@example.com"]
        assert await asyncio.to_thread(sendmail, server.port, rcpts, MSG) == {}
    assert sorted(calls(handlers)) == sorted(rcpts)
    messages = queued(project / "run" / "posts")
    assert sorted(m.rcpt_to for m in messages) == sorted(rcpts)
    assert all(m.rcpt_tos == rcpts and m.raw == MSG for m in messages)


async def test_unknown_recipient_550_and_never_relays(project: Path, handlers: str) -> None:
    async with running(make_settings(project, handlers)) as server:
        client = await RawClient.connect(server.port)
        await client.cmd("EHLO c")
        await client.cmd("MAIL FROM:<a@b.org>")
        code, text = await client.cmd("RCPT TO:<someone@elsewhere.org>")
        assert (code, text[4:9]) == (550, "5.1.1")
        code, _ = await client.cmd("DATA")
        assert code == 503  # no recipient accepted: no transaction
        await client.close()
    assert calls(handlers) == []


async def test_too_many_recipients_452(project: Path, handlers: str) -> None:
    async with running(make_settings(project, handlers, max_recipients=2)) as server:
        client = await RawClient.connect(server.port)
        await client.cmd("EHLO c")
        await client.cmd("MAIL FROM:<a@b.org>")
        assert (await client.cmd("RCPT TO:<a@example.com>"))[0] == 250
        assert (await client.cmd("RCPT TO:<b@example.com>"))[0] == 250
        code, text = await client.cmd("RCPT TO:<c@example.com>")
        assert (code, text[4:9]) == (452, "4.5.3")
        assert (await client.cmd("DATA"))[0] == 354
        await client.send(MSG + b".\r\n")
        assert (await client.reply())[0] == 250
        await client.close()
    assert sorted(calls(handlers)) == ["a@example.com", "b@example.com"]


async def test_oversize_552_with_and_without_size(project: Path, handlers: str) -> None:
    async with running(make_settings(project, handlers, max_message_size=10_000)) as server:
        client = await RawClient.connect(server.port)
        code, text = await client.cmd("EHLO c")
        assert "SIZE 10000" in text
        code, text = await client.cmd("MAIL FROM:<a@b.org> SIZE=20000")
        assert (code, text[4:9]) == (552, "5.3.4")
        # Without SIZE the server reads to the end of DATA, keeps nothing, answers 552.
        big = MSG + (b"x" * 70 + b"\r\n") * 300 + b".\r\n"
        code, text = await client.transaction("a@b.org", ["news@example.com"], big)
        assert (code, text[4:9]) == (552, "5.3.4")
        # The session is still usable.
        code, _ = await client.transaction("a@b.org", ["news@example.com"], MSG + b".\r\n")
        assert code == 250
        await client.close()
    assert len(queued(project / "run" / "posts")) == 1


async def test_handler_raises_451_and_nothing_queued(project: Path, handlers: str) -> None:
    async with running(make_settings(project, handlers)) as server:
        with pytest.raises(smtplib.SMTPDataError) as info:
            await asyncio.to_thread(sendmail, server.port, ["fail@example.com"], MSG)
    assert info.value.smtp_code == 451
    assert info.value.smtp_error.startswith(b"4.3.0")
    assert queued(project / "run" / "posts") == []


async def test_handler_timeout_451(project: Path, handlers: str) -> None:
    async with running(make_settings(project, handlers, handler_timeout=0.3)) as server:
        with pytest.raises(smtplib.SMTPDataError) as info:
            await asyncio.to_thread(sendmail, server.port, ["slow-5@example.com"], MSG)
        assert info.value.smtp_code == 451
        # Several recipients: the deadline covers the whole DATA.
        with pytest.raises(smtplib.SMTPDataError) as info:
            rcpts = ["slow-5@example.com", "ok@example.com"]
            await asyncio.to_thread(sendmail, server.port, rcpts, MSG)
        assert info.value.smtp_code == 451


async def test_smtp_error_gives_its_own_reply(project: Path, handlers: str) -> None:
    async with running(make_settings(project, handlers)) as server:
        client = await RawClient.connect(server.port)
        await client.cmd("EHLO c")
        code, text = await client.transaction("a@b.org", ["refuse@example.com"], MSG + b".\r\n")
        assert (code, text) == (550, "550 5.7.1 Not wanted here")
        # Mixed outcomes in SMTP: a transient failure wins, so the sender retries.
        code, text = await client.transaction(
            "a@b.org", ["refuse@example.com", "busy@example.com"], MSG + b".\r\n"
        )
        assert code == 450
        await client.close()


async def test_lmtp_one_status_per_recipient(project: Path, handlers: str) -> None:
    async with running(make_settings(project, handlers, lmtp=True)) as server:
        client = await RawClient.connect(server.port)
        assert (await client.cmd("EHLO c"))[0] == 500  # LMTP speaks LHLO
        assert (await client.cmd("LHLO c"))[0] == 250
        assert (await client.cmd("MAIL FROM:<a@b.org>"))[0] == 250
        assert (await client.cmd("RCPT TO:<ok@example.com>"))[0] == 250
        assert (await client.cmd("RCPT TO:<x@nowhere.org>"))[0] == 550
        assert (await client.cmd("RCPT TO:<fail@example.com>"))[0] == 250
        assert (await client.cmd("RCPT TO:<refuse@example.com>"))[0] == 250
        assert (await client.cmd("DATA"))[0] == 354
        await client.send(MSG + b".\r\n")
        statuses = [await client.reply() for _ in range(3)]
        assert [c for c, _ in statuses] == [250, 451, 550]
        assert statuses[2][1] == "550 5.7.1 Not wanted here"
        assert (await client.cmd("NOOP"))[0] == 250  # nothing extra was sent
        await client.close()
    [message] = queued(project / "run" / "posts")
    assert message.rcpt_to == "ok@example.com"


async def test_corpus_through_serve_byte_exact(
    project: Path, handlers: str, corpus: list[Path]
) -> None:
    originals = []
    async with running(make_settings(project, handlers)) as server:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, start_tls=False)
        await client.connect()
        for i, path in enumerate(corpus):
            data = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            if not data.endswith(b"\r\n"):
                data += b"\r\n"
            originals.append(data)
            await client.sendmail("a@b.org", [f"msg{i:03d}@example.com"], data)
        await client.quit()
    messages = {m.rcpt_to: m for m in queued(project / "run" / "posts")}
    assert len(messages) == len(corpus)
    for i, data in enumerate(originals):
        message = messages[f"msg{i:03d}@example.com"]
        assert message.raw == data, corpus[i].name
        message.get("Subject")  # header access does not raise


async def test_8bitmime_and_smtputf8_byte_exact(project: Path, handlers: str) -> None:
    eight_bit = (
        (
            "Subject: café crème\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
        ).encode()
        + "Ça coûte 5 € — déjà vu\r\n".encode("latin-1", "replace")
        + b"\xff\xfe\x80\r\n"
    )
    utf8 = (
        "From: José <josé@exämple.org>\r\nSubject: 日本語\r\n\r\n"
        "\u041f\u0440\u0438\u0432\u0435\u0442\r\n"
    ).encode()
    async with running(make_settings(project, handlers)) as server:
        client = await RawClient.connect(server.port)
        code, text = await client.cmd("EHLO c")
        assert "8BITMIME" in text and "SMTPUTF8" in text
        code, _ = await client.cmd("MAIL FROM:<a@b.org> BODY=8BITMIME")
        assert code == 250
        assert (await client.cmd("RCPT TO:<eight@example.com>"))[0] == 250
        assert (await client.cmd("DATA"))[0] == 354
        await client.send(eight_bit + b".\r\n")
        assert (await client.reply())[0] == 250
        code, _ = await client.cmd("MAIL FROM:<josé@exämple.org> SMTPUTF8".encode())
        assert code == 250
        assert (await client.cmd("RCPT TO:<utf@example.com>"))[0] == 250
        assert (await client.cmd("DATA"))[0] == 354
        await client.send(utf8 + b".\r\n")
        assert (await client.reply())[0] == 250
        await client.close()
    messages = {m.rcpt_to: m for m in queued(project / "run" / "posts")}
    assert messages["eight@example.com"].raw == eight_bit
    assert messages["utf@example.com"].raw == utf8
    assert messages["utf@example.com"].mail_from == "josé@exämple.org"


async def test_relay_delivers_to_the_log_server(project: Path) -> None:
    settings = Settings(root=project, server={"port": 0, "hostname": "mx.test"})
    server = log_server(settings, "run/queue")
    await server.start()
    try:
        relay = Relay("127.0.0.1", server.port or 0, timeout=10)
        reply = MailResponse(To=["a@x.org", "b@y.org"], From="blog@example.com", Subject="Hi")
        assert "Ok" in await relay.deliver(reply)
        await relay.deliver(MSG, mail_from="m@x.org", rcpt_tos=["z@z.org"])
    finally:
        await server.shutdown()
    first, second = queued(project / "run" / "queue")
    # One push per message, whatever the number of recipients; the envelope kept.
    assert first.rcpt_tos == ["a@x.org", "b@y.org"] and first["Subject"] == "Hi"
    assert second.raw == MSG and second.mail_from == "m@x.org"
    assert first.email.policy is not None and email.policy.default is not None
