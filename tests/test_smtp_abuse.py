"""Bad input and abusive clients on a real socket: proper codes, and everyone else served."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from helpers.smtp_server import RawClient, make_settings, queued, running, write_handlers

MSG = b"From: ann@sender.org\r\nSubject: hello\r\n\r\nbody line\r\n"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.fixture
def handlers(project: Path) -> str:
    return write_handlers(project)


async def still_serves(port: int) -> None:
    client = await RawClient.connect(port)
    await client.cmd("EHLO ok")
    code, text = await client.transaction("a@b.org", ["ok@example.com"], MSG + b".\r\n")
    assert code == 250, text
    await client.close()


async def test_garbage_commands_500_then_421(project: Path, handlers: str) -> None:
    async with running(make_settings(project, handlers, max_bad_commands=5)) as server:
        client = await RawClient.connect(server.port)
        for junk in (b"XYZZY", b"\x1b[31mRED", b"MAIL", b"", b"HELO"):
            code, text = await client.cmd(junk)
            assert 500 <= code <= 504, text
        code, text = await client.reply()
        assert (code, text[4:9]) == (421, "4.7.0")
        assert await client.closed()
        await still_serves(server.port)


async def test_address_harvesting_hits_the_error_cap(project: Path, handlers: str) -> None:
    async with running(make_settings(project, handlers, max_bad_commands=3)) as server:
        client = await RawClient.connect(server.port)
        await client.cmd("EHLO c")
        # A delivered message resets the count: two refusals, a message, two refusals.
        for _ in range(2):
            await client.cmd("MAIL FROM:<a@b.org>")
            assert (await client.cmd("RCPT TO:<x@nowhere.org>"))[0] == 550
            assert (await client.cmd("RCPT TO:<ok@example.com>"))[0] == 250
            assert (await client.cmd("DATA"))[0] == 354
            await client.send(MSG + b".\r\n")
            assert (await client.reply())[0] == 250
        await client.cmd("MAIL FROM:<a@b.org>")
        await client.cmd("RCPT TO:<y@nowhere.org>")
        await client.cmd("RCPT TO:<z@nowhere.org>")
        assert (await client.cmd("RCPT TO:<w@nowhere.org>"))[0] == 550
        assert (await client.reply())[0] == 421
        assert await client.closed()


async def test_five_thousand_byte_lines(project: Path, handlers: str) -> None:
    async with running(make_settings(project, handlers)) as server:
        client = await RawClient.connect(server.port)
        code, _ = await client.cmd(b"EHLO " + b"a" * 5000)
        assert code == 500
        await client.cmd("EHLO c")
        body = MSG + b"x" * 5000 + b"\r\n.\r\n"
        code, text = await client.transaction("a@b.org", ["long@example.com"], body)
        assert code == 500 and "Line too long" in text
        code, _ = await client.transaction("a@b.org", ["ok@example.com"], MSG + b".\r\n")
        assert code == 250
        await client.close()
    assert [m.rcpt_to for m in queued(project / "run" / "posts")] == ["ok@example.com"]


async def test_nul_bytes_and_bare_lf_stored_byte_exact(project: Path, handlers: str) -> None:
    weird = b"Subject: nul\x00byte\r\nX: bare\nlf\n\r\nbody\x00\x01\nend\r\n"
    async with running(make_settings(project, handlers)) as server:
        client = await RawClient.connect(server.port)
        await client.cmd("EHLO c")
        code, _ = await client.cmd(b"MAIL FROM:<a\x00b@x.org>")
        assert code >= 500 or code == 250
        await client.cmd("RSET")
        code, _ = await client.transaction("a@b.org", ["nul@example.com"], weird + b".\r\n")
        assert code == 250
        await client.close()
    [message] = queued(project / "run" / "posts")
    assert message.raw == weird
    message.get("Subject")  # never raises


@pytest.mark.parametrize("vector", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r"])
async def test_smuggling_one_message_per_data(project: Path, handlers: str, vector: bytes) -> None:
    smuggled = (
        b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nsend money\r\n"
    )
    body = b"Subject: first\r\n\r\nhello" + vector + smuggled + b".\r\n"
    async with running(make_settings(project, handlers)) as server:
        client = await RawClient.connect(server.port)
        await client.cmd("EHLO c")
        code, _ = await client.transaction("a@b.org", ["first@example.com"], body)
        assert code == 250
        assert (await client.cmd("NOOP"))[0] == 250  # no reply to a second DATA pending
        await client.close()
    [message] = queued(project / "run" / "posts")
    assert message.rcpt_tos == ["first@example.com"] and message.mail_from == "a@b.org"
    assert b"send money" in message.raw


async def test_stalled_data_times_out_while_others_are_served(project: Path, handlers: str) -> None:
    settings = make_settings(project, handlers, command_timeout=1.0, data_min_rate=500)
    async with running(settings) as server:
        staller = await RawClient.connect(server.port)
        await staller.cmd("EHLO s")
        await staller.cmd("MAIL FROM:<s@b.org>")
        await staller.cmd("RCPT TO:<stall@example.com>")
        assert (await staller.cmd("DATA"))[0] == 354
        await staller.send(b"Subject: stall\r\n\r\npart of a bo")
        started = time.monotonic()
        await still_serves(server.port)
        code, text = await staller.reply(within=5)
        assert (code, text[4:9]) == (421, "4.4.2")
        assert await staller.closed()
        assert time.monotonic() - started < 4
    assert [m.rcpt_to for m in queued(project / "run" / "posts")] == ["ok@example.com"]


async def test_slow_steady_upload_outlives_command_timeout(project: Path, handlers: str) -> None:
    # 4 KB every 0.1 s for 2.5 s: far above the minimum rate, longer than the timeout.
    settings = make_settings(project, handlers, command_timeout=1.0, data_min_rate=500)
    async with running(settings) as server:
        client = await RawClient.connect(server.port)
        await client.cmd("EHLO c")
        await client.cmd("MAIL FROM:<a@b.org>")
        await client.cmd("RCPT TO:<upload@example.com>")
        assert (await client.cmd("DATA"))[0] == 354
        await client.send(MSG)
        for _ in range(25):
            await client.send((b"y" * 78 + b"\r\n") * 50)
            await asyncio.sleep(0.1)
        await client.send(b".\r\n")
        assert (await client.reply())[0] == 250
        await client.close()


async def test_idle_client_gets_421(project: Path, handlers: str) -> None:
    async with running(make_settings(project, handlers, command_timeout=0.5)) as server:
        client = await RawClient.connect(server.port)
        await client.cmd("EHLO c")
        code, text = await client.reply(within=5)
        assert (code, text[4:9]) == (421, "4.4.2")
        assert await client.closed()


async def test_disconnect_mid_handler_leaves_nothing(project: Path, handlers: str) -> None:
    async with running(make_settings(project, handlers)) as server:
        client = await RawClient.connect(server.port)
        await client.cmd("EHLO c")
        await client.cmd("MAIL FROM:<a@b.org>")
        await client.cmd("RCPT TO:<slow-0.5@example.com>")
        await client.cmd("DATA")
        await client.send(MSG + b".\r\n")
        await asyncio.sleep(0.1)  # the handler is sleeping
        client.writer.transport.abort()
        await asyncio.sleep(0.8)  # past the handler's sleep: it must have been cancelled
        await still_serves(server.port)
    posts = project / "run" / "posts"
    assert [m.rcpt_to for m in queued(posts)] == ["ok@example.com"]
    assert list((posts / "tmp").iterdir()) == []


async def test_500_concurrent_connections_per_ip_cap(project: Path, handlers: str) -> None:
    settings = make_settings(project, handlers, max_connections_per_ip=50, max_connections=1000)
    async with running(settings) as server:

        async def open_one() -> tuple[int, RawClient]:
            client = await RawClient.connect(server.port, greet=False)
            code, _ = await client.reply(within=30)
            return code, client

        results = await asyncio.gather(*(open_one() for _ in range(500)))
        codes = [code for code, _ in results]
        assert codes.count(220) == 50
        assert codes.count(421) == 450
        for code, client in results:
            if code == 421:
                assert await client.closed()
        # The admitted ones still work, then the server serves newcomers.
        admitted = [c for code, c in results if code == 220]
        assert (await admitted[0].cmd("NOOP"))[0] == 250
        for client in admitted:
            await client.close()
        for _ in range(100):
            if server.tracker.count == 0:
                break
            await asyncio.sleep(0.02)
        await still_serves(server.port)


async def test_global_connection_cap(project: Path, handlers: str) -> None:
    async with running(make_settings(project, handlers, max_connections=2)) as server:
        first = await RawClient.connect(server.port)
        second = await RawClient.connect(server.port)
        third = await RawClient.connect(server.port, greet=False)
        code, text = await third.reply()
        assert (code, text[4:9]) == (421, "4.7.0")
        assert await third.closed()
        await first.close()
        await second.close()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=mx.test", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("openssl not available")
    return cert, key


async def test_starttls_offered_and_no_auth(
    project: Path, handlers: str, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    settings = make_settings(project, handlers, tls_cert=str(cert), tls_key=str(key))
    async with running(settings) as server:
        client = await RawClient.connect(server.port)
        code, text = await client.cmd("EHLO c")
        assert "STARTTLS" in text and "AUTH" not in text
        assert (await client.cmd("STARTTLS"))[0] == 220
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        await client.writer.start_tls(context)
        code, text = await client.cmd("EHLO c")
        assert code == 250 and "STARTTLS" not in text and "AUTH" not in text
        assert (await client.cmd("AUTH PLAIN AGZvbwBiYXI="))[0] >= 500
        code, _ = await client.transaction("a@b.org", ["tls@example.com"], MSG + b".\r\n")
        assert code == 250
        with contextlib.suppress(Exception):
            await client.close()
    assert [m.rcpt_to for m in queued(project / "run" / "posts")] == ["tls@example.com"]


async def test_shutdown_right_after_a_tls_client_quits(
    project: Path, handlers: str, certificate: tuple[Path, Path]
) -> None:
    """The 421 on shutdown skips a TLS transport already closing (it raised AttributeError)."""
    import aiosmtplib

    cert, key = certificate
    settings = make_settings(project, handlers, tls_cert=str(cert), tls_key=str(key))
    async with running(settings) as server:
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=server.port, tls_context=context, start_tls=False
        )
        await smtp.connect()
        await smtp.starttls()
        await smtp.sendmail("a@b.org", ["tls@example.com"], MSG)
        await smtp.quit()
        # shutdown() runs at once on leaving the block, while the TLS close is under way
    assert [m.rcpt_to for m in queued(project / "run" / "posts")] == ["tls@example.com"]
