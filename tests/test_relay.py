"""The relay against a real smarthost: STARTTLS, implicit TLS, AUTH, To/Cc/Bcc, failures.

Contract §2/§3 (0.2): ``[relay]`` starttls/tls/username/password/ca_file; ``relay.deliver``
sends to every To/Cc/Bcc recipient (Bcc never in the sent headers), verifies the
certificate, sends nothing in clear when STARTTLS is required and not offered, never logs
the password; a 4xx or no reply is temporary, a 5xx to the message permanent. The
smarthost is aiosmtpd on port 0 with a self-signed certificate made by ``openssl``.
"""

from __future__ import annotations

import asyncio
import io
import json
import textwrap
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from helpers.smarthost import PASSWORD, USER, Cert, Smarthost, start_smarthost
from helpers.smtp_server import make_settings, running, write_handlers

from maildefer import MailRequest, MailResponse, Router
from maildefer.errors import ConfigError
from maildefer.relay import Relay, RelayError
from maildefer.settings import Settings, load_settings
from tests.conftest import RunCli


class Running:
    """Start smarthosts in a test; all are closed at its end."""

    def __init__(self, cert: Cert) -> None:
        self.cert = cert
        self.servers: list[asyncio.Server] = []

    async def __call__(self, mode: str = "starttls", **kwargs: Any) -> Smarthost:
        host = Smarthost()
        self.servers.append(await start_smarthost(host, cert=self.cert, mode=mode, **kwargs))
        return host


@pytest.fixture
async def smarthost(cert: Cert) -> AsyncIterator[Running]:
    running_hosts = Running(cert)
    yield running_hosts
    for server in running_hosts.servers:
        server.close()
        await server.wait_closed()


def relay(host: Smarthost, cert: Cert | None, **kwargs: Any) -> Relay:
    """A relay to ``host`` that trusts ``cert`` (``None``: the system store only)."""
    options: dict[str, Any] = {"username": USER, "password": PASSWORD, "timeout": 10.0}
    options.update(kwargs)
    ca = str(cert.cert) if cert is not None else None
    return Relay("127.0.0.1", host.port, ca_file=ca, **options)


def reply_to(to: str = "ann@writers.org", **headers: str) -> MailResponse:
    return MailResponse(
        To=to, From="noreply@example.com", Subject="Re: hi", Body="Thanks.\n", headers=headers
    )


# -- TLS and AUTH ----------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_starttls_then_auth(smarthost: Running, cert: Cert, mechanism: str) -> None:
    other = {"PLAIN": "LOGIN", "LOGIN": "PLAIN"}[mechanism]
    host = await smarthost("starttls", exclude=(other,))
    reply = await relay(host, cert, starttls=True).deliver(reply_to())
    assert "queued as 1" in reply
    # AUTH came after the upgrade, with the mechanism the server offered.
    assert host.auth_attempts == [(mechanism, USER.encode(), True)]
    [got] = host.received
    assert (got.mail_from, got.rcpt_tos, got.tls, got.login) == (
        "noreply@example.com",
        ["ann@writers.org"],
        True,
        USER.encode(),
    )
    assert b"Subject: Re: hi" in got.data


async def test_implicit_tls_with_auth(smarthost: Running, cert: Cert) -> None:
    host = await smarthost("tls")
    await relay(host, cert, tls=True).deliver(reply_to())
    assert [m for m, _, _ in host.auth_attempts] == ["PLAIN"]
    [got] = host.received
    assert got.login == USER.encode() and got.rcpt_tos == ["ann@writers.org"]
    # The relay speaks TLS from the first byte: a plain client gets no SMTP banner.
    reader, writer = await asyncio.open_connection("127.0.0.1", host.port)
    writer.write(b"EHLO x\r\n")
    assert not (await reader.read(100)).startswith(b"220")
    writer.close()


async def test_wrong_password_is_temporary_and_sends_nothing(
    smarthost: Running, cert: Cert
) -> None:
    host = await smarthost("starttls")
    with pytest.raises(RelayError) as caught:
        await relay(host, cert, starttls=True, password="wrong").deliver(reply_to())
    # 535 is a 5xx, but about our credentials: the mail waits for the fix (contract §3).
    assert (caught.value.code, caught.value.temporary) == (535, True)
    assert host.auth_attempts and host.mails == 0 and host.received == []


async def test_starttls_required_but_not_offered_sends_nothing(
    smarthost: Running, cert: Cert
) -> None:
    host = await smarthost("plain")
    with pytest.raises(RelayError) as caught:
        await relay(host, cert, starttls=True).deliver(reply_to())
    assert caught.value.temporary and "STARTTLS" in caught.value.text
    # No MAIL FROM ever reached the server, nor the credentials.
    assert (host.connections, host.mails, host.auth_attempts, host.received) == (1, 0, [], [])


@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_untrusted_certificate_sends_nothing(smarthost: Running, mode: str) -> None:
    host = await smarthost(mode)
    options = {"starttls": True} if mode == "starttls" else {"tls": True}
    with pytest.raises(RelayError) as caught:
        await relay(host, None, **options).deliver(reply_to())  # the system store only
    assert caught.value.temporary and "CERTIFICATE_VERIFY_FAILED" in caught.value.text
    assert (host.connections, host.mails, host.auth_attempts) == (1, 0, [])


async def test_a_certificate_for_another_name_is_refused(smarthost: Running, cert: Cert) -> None:
    host = await smarthost("starttls", bind="127.0.0.2")
    # The certificate is trusted, but names localhost and 127.0.0.1, not 127.0.0.2.
    r = Relay("127.0.0.2", host.port, starttls=True, ca_file=str(cert.cert), timeout=10)
    with pytest.raises(RelayError) as caught:
        await r.deliver(reply_to())
    assert "CERTIFICATE_VERIFY_FAILED" in caught.value.text and host.mails == 0


# -- recipients ------------------------------------------------------------------------------


async def test_to_cc_bcc_all_in_rcpt_and_no_bcc_header(smarthost: Running, cert: Cert) -> None:
    host = await smarthost("starttls")
    r = relay(host, cert, starttls=True)
    await r.deliver(reply_to("to@x.org", Cc="cc@x.org", Bcc="hidden@x.org"))
    message = EmailMessage()
    message["From"], message["To"], message["Bcc"] = "a@example.com", "to2@x.org", "hid2@x.org"
    message.set_content("hi")
    await r.deliver(message)
    # A received message pushed with a Bcc header (an EmailMessage's bytes in a queue):
    raw = (
        b"From: a@example.com\r\nTo: to3@x.org\r\nBcc: hid3@x.org,\r\n  hid4@x.org\r\n"
        b"Subject: s\r\n\r\nBcc: in the body stays\r\n"
    )
    request = MailRequest(raw, mail_from="bounce@example.com", rcpt_tos=["env@x.org"])
    await r.deliver(request)

    first, second, third = host.received
    assert sorted(first.rcpt_tos) == ["cc@x.org", "hidden@x.org", "to@x.org"]
    assert sorted(second.rcpt_tos) == ["hid2@x.org", "to2@x.org"]
    for got in (first, second):
        assert b"bcc" not in got.data.lower() and b"hid" not in got.data
    assert b"Cc: cc@x.org" in first.data
    # A MailRequest goes to its envelope, byte-exact but for the Bcc field (folded too).
    assert (third.mail_from, third.rcpt_tos) == ("bounce@example.com", ["env@x.org"])
    assert third.data == raw.replace(b"Bcc: hid3@x.org,\r\n  hid4@x.org\r\n", b"")


async def test_5xx_to_the_message_is_permanent_4xx_temporary(
    smarthost: Running, cert: Cert
) -> None:
    host = await smarthost("starttls")
    r = relay(host, cert, starttls=True)
    cases = [
        ({"RCPT": "550 5.1.1 no such user"}, 550, False),
        ({"RCPT": "450 4.2.1 mailbox busy"}, 450, True),
        ({"MAIL": "553 5.7.1 sender not allowed"}, 553, False),
        ({"DATA": "554 5.6.0 content rejected"}, 554, False),
        ({"DATA": "451 4.3.0 try later"}, 451, True),
        ({"MAIL": "530 5.7.0 authentication required"}, 530, True),  # our setup, not it
    ]
    for replies, code, temporary in cases:
        host.replies = replies
        with pytest.raises(RelayError) as caught:
            await r.deliver(reply_to())
        assert (caught.value.code, caught.value.temporary) == (code, temporary), replies
        assert caught.value.reply == next(iter(replies.values()))
    assert host.received == []


async def test_some_recipients_refused_the_rest_get_it(
    smarthost: Running, cert: Cert, log_out: io.StringIO
) -> None:
    host = await smarthost("starttls")
    host.replies = {"RCPT gone@x.org": "550 5.1.1 gone"}
    await relay(host, cert, starttls=True).deliver(reply_to("ok@x.org, gone@x.org"))
    assert [got.rcpt_tos for got in host.received] == [["ok@x.org"]]
    [line] = [json.loads(x) for x in log_out.getvalue().splitlines() if "refused" in x]
    assert line["event"] == "relay_recipients_refused"
    assert line["refused"] == {"gone@x.org": "550 5.1.1 gone"}


async def test_unreachable_is_temporary() -> None:
    with pytest.raises(RelayError) as caught:
        await Relay("127.0.0.1", 1, timeout=5).deliver(reply_to())
    assert caught.value.temporary and caught.value.code is None
    assert isinstance(caught.value.__cause__, OSError)


# -- connection reuse ------------------------------------------------------------------------


async def test_connections_reused_inside_async_with_only(smarthost: Running, cert: Cert) -> None:
    host = await smarthost("starttls")
    r = relay(host, cert, starttls=True)
    for _ in range(3):
        await r.deliver(reply_to())
    assert (host.connections, len(host.auth_attempts)) == (3, 3)  # one each, outside
    async with r:
        for _ in range(5):
            await r.deliver(reply_to())
        # Concurrent deliveries take a connection each, and give them back.
        await asyncio.gather(*(r.deliver(reply_to()) for _ in range(3)))
    assert len(host.received) == 11
    assert host.connections == 3 + 3  # the five shared one; the three concurrent used 3
    assert len(host.auth_attempts) == 6  # one TLS handshake and AUTH per connection


async def test_a_connection_dropped_while_idle_is_replaced(smarthost: Running, cert: Cert) -> None:
    host = await smarthost("starttls")
    r = relay(host, cert, starttls=True)
    async with r:
        await r.deliver(reply_to())
        # The smarthost drops the idle connection (its timeout, a restart), and the
        # relay has not seen it yet: the NOOP before reuse finds out, nothing is lost.
        for protocol in host.protocols:
            assert protocol.transport is not None
            protocol.transport.close()
        await r.deliver(reply_to())
        # Once the loss was seen (is_connected false), no NOOP is even tried.
        for protocol in host.protocols[1:]:
            assert protocol.transport is not None
            protocol.transport.close()
        await asyncio.sleep(0.1)
        await r.deliver(reply_to())
    assert (len(host.received), host.connections) == (3, 3)


async def test_a_failed_transaction_never_leaves_its_connection_for_reuse(
    smarthost: Running, cert: Cert
) -> None:
    host = await smarthost("starttls")
    r = relay(host, cert, starttls=True)
    async with r:
        host.replies = {"DATA": "451 4.3.0 later"}
        with pytest.raises(RelayError):
            await r.deliver(reply_to())
        host.replies = {}
        await r.deliver(reply_to())
    assert (len(host.received), host.connections) == (1, 2)


# -- the password ----------------------------------------------------------------------------


async def test_password_in_no_log_line_repr_or_error(
    smarthost: Running, cert: Cert, log_out: io.StringIO, tmp_path: Path
) -> None:
    host = await smarthost("starttls")
    outbox = Router.from_modules(["maildefer.handlers.outbox"])
    message = MailRequest(b"Subject: x\r\n\r\nhi\r\n", mail_from="a@x.org", rcpt_tos=["b@y.org"])
    good = relay(host, cert, starttls=True)
    with good.active():
        assert await outbox.deliver(message) == 1
    bad = relay(host, cert, starttls=True, password=PASSWORD + "-wrong")
    with bad.active(), pytest.raises(RelayError) as caught:
        await outbox.deliver(message)
    settings = Settings(root=tmp_path, relay={"username": USER, "password": PASSWORD})
    texts = [
        log_out.getvalue(),
        str(caught.value),
        repr(caught.value),
        repr(good),
        repr(bad),
        repr(settings),
        str(settings.model_dump()),
        repr(Relay.from_settings(settings)),
    ]
    assert len(host.received) == 1 and '"relay_sent"' in log_out.getvalue()
    assert "handler failed" in log_out.getvalue()  # the failure was logged, without it
    for text in texts:
        assert PASSWORD not in text


# -- settings --------------------------------------------------------------------------------


def write_settings(root: Path, relay_table: str) -> Path:
    (root / "config").mkdir(exist_ok=True)
    path = root / "config" / "settings.toml"
    path.write_text("[relay]\n" + textwrap.dedent(relay_table))
    return path


def test_relay_settings_defaults_and_env_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cert: Cert
) -> None:
    r = Settings().relay
    assert (r.starttls, r.tls, r.username, r.password.get_secret_value(), r.ca_file) == (
        False,
        False,
        "",
        "",
        "",
    )
    monkeypatch.setenv("MAILDEFER_RELAY__PASSWORD", PASSWORD)
    path = write_settings(tmp_path, f'starttls = true\nusername = "{USER}"\nca_file = "c.pem"\n')
    (tmp_path / "c.pem").write_bytes(cert.cert.read_bytes())  # relative to the root
    settings = load_settings(path)
    assert settings.relay.password.get_secret_value() == PASSWORD
    built = Relay.from_settings(settings)
    assert (built.starttls, built.username, built.ca_file) == (True, USER, str(tmp_path / "c.pem"))


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("starttls = true\ntls = true\n", "relay.tls = True: Value error, starttls and tls"),
        ('ca_file = "nope.pem"\n', "relay.ca_file = 'nope.pem': no such file"),
        (f"password = 12345\nusername = '{USER}'\n", "relay.password = '**********'"),
    ],
)
def test_bad_relay_settings_one_line_exit_2(
    tmp_path: Path, run_cli: RunCli, table: str, expected: str
) -> None:
    path = write_settings(tmp_path, table)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert expected in str(caught.value) and "12345" not in str(caught.value)
    done = run_cli("routes", cwd=tmp_path)
    err = done.stderr.decode()
    assert done.returncode == 2 and expected in err and len(err.strip().splitlines()) == 1


# -- serve: a handler that relays ------------------------------------------------------------

RELAYING = """
from maildefer import MailResponse, relay, route, stateless

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    await relay.deliver(MailResponse(To=message.mail_from, From="bot@example.com",
                                     Subject="Got it", Body="ok"))
"""


async def test_serve_answers_451_when_the_smarthost_refuses(
    smarthost: Running, cert: Cert, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    host = await smarthost("starttls")
    settings = make_settings(tmp_path, write_handlers(tmp_path, RELAYING))
    import aiosmtplib

    with relay(host, cert, starttls=True).active():
        async with running(settings) as server:
            sent = await aiosmtplib.send(
                b"Subject: hi\r\n\r\nhello\r\n",
                sender="ann@writers.org",
                recipients=["post@example.com"],
                hostname="127.0.0.1",
                port=server.port,
            )
            assert sent[1] == "2.0.0 Ok: queued"
            host.replies = {"RCPT": "550 5.1.1 no such user"}
            # The smarthost's 550 is about our reply, not the sender's message: 451.
            with pytest.raises(aiosmtplib.SMTPDataError) as caught:
                await aiosmtplib.send(
                    b"Subject: hi\r\n\r\nhello\r\n",
                    sender="ann@writers.org",
                    recipients=["post@example.com"],
                    hostname="127.0.0.1",
                    port=server.port,
                )
    assert caught.value.code == 451
    assert [got.rcpt_tos for got in host.received] == [["ann@writers.org"]]
