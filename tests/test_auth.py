"""Sender authentication at receipt (issue 15): SPF, DKIM, DMARC through a real serve.

A dnslib server started here on a free port of 127.0.0.1 publishes the records (SPF,
DMARC, the public key of a DKIM keypair made here with openssl); messages are signed here
with dkimpy and sent over real SMTP to a real ``Server`` on port 0 whose ``[auth]
nameservers`` point at that server. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import io
import json
import shutil
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest
from helpers.dns_server import RunningDns, Zone, dns_server, silent_dns
from helpers.smtp_server import RawClient, queued, running, write_handlers
from hypothesis import given
from hypothesis import strategies as st

from maildefer.auth import AuthResults, stamp
from maildefer.errors import ConfigError
from maildefer.mail import MailRequest
from maildefer.settings import Settings, load_settings
from maildefer.smtp.authcheck import AuthChecker
from maildefer.smtp.authdns import DnsClient

REPO = Path(__file__).resolve().parent.parent
HOSTNAME = "mx.test"

HANDLERS = """
from maildefer import Queue, route, stateless

SEEN = []

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    SEEN.append(message.auth)
    await Queue("run/posts").push(message)
"""


@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    """(private key PEM, public key base64 for the DNS record), made by openssl here."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the DKIM keypair")
    key = tmp_path_factory.mktemp("dkim") / "key.pem"
    subprocess.run(
        ["openssl", "genrsa", "-traditional", "-out", str(key), "1024"],
        check=True,
        capture_output=True,
    )
    der = subprocess.run(
        ["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    return key.read_bytes(), base64.b64encode(der).decode()


@pytest.fixture
def dns(dkim_key: tuple[bytes, str]) -> Iterator[RunningDns]:
    zone = Zone()
    # The sender's domain: 127.0.0.1 may send for it, DMARC reject, a DKIM key.
    zone.txt("example.test", "v=spf1 ip4:127.0.0.1 -all")
    zone.txt("_dmarc.example.test", "v=DMARC1; p=reject; adkim=r; aspf=r")
    zone.txt("sel._domainkey.example.test", f"v=DKIM1; k=rsa; p={dkim_key[1]}")
    # A mailing list's bounce domain: SPF passes for it, but it is not the author's.
    zone.txt("lists.other.test", "v=spf1 ip4:127.0.0.1 -all")
    # A domain someone spoofs from 127.0.0.1: only 192.0.2.1 may send for it.
    zone.txt("spoofed.test", "v=spf1 ip4:192.0.2.1 -all")
    zone.txt("_dmarc.spoofed.test", "v=DMARC1; p=reject")
    # Alignment: a subdomain's SPF passes; relaxed (example.test) or strict (strict.test).
    zone.txt("bounces.example.test", "v=spf1 ip4:127.0.0.1 -all")
    zone.txt("bounces.strict.test", "v=spf1 ip4:127.0.0.1 -all")
    zone.txt("_dmarc.strict.test", "v=DMARC1; p=reject; aspf=s")
    # A HELO name with SPF, for bounces (null sender).
    zone.txt("client.example.test", "v=spf1 ip4:127.0.0.1 -all")
    with dns_server(zone) as running_dns:
        yield running_dns


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path, write_handlers(tmp_path, HANDLERS)


def settings_for(root: Path, module: str, **auth: Any) -> Settings:
    return Settings(
        root=root,
        server={"port": 0, "hostname": HOSTNAME, "handlers": [module], "grace_period": 5.0},
        router={"defaults": {"host": r"example\.com"}},
        auth=auth,
    )


def message(body: str = "Hello.\r\n", sender: str = "alice@example.test", extra: str = "") -> bytes:
    return (
        f"{extra}From: Alice <{sender}>\r\nTo: post@example.com\r\nSubject: hi\r\n"
        f"Message-ID: <1@example.test>\r\n\r\n{body}"
    ).encode()


def signed(raw: bytes, key: bytes, domain: bytes = b"example.test") -> bytes:
    signature = dkim.sign(raw, b"sel", domain, key, include_headers=[b"from", b"subject"])
    return bytes(signature) + raw


async def send(port: int, raw: bytes, mail_from: str = "alice@example.test") -> tuple[int, bytes]:
    def talk() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.example.test")
            client.mail(mail_from)
            client.rcpt("post@example.com")
            return client.data(raw)

    return await asyncio.to_thread(talk)


def seen(module: str) -> list[AuthResults | None]:
    return list(importlib.import_module(module).SEEN)


async def test_signed_mail_from_an_authorized_address_passes_all_three(
    project: tuple[Path, str], dns: RunningDns, dkim_key: tuple[bytes, str]
) -> None:
    root, module = project
    raw = signed(message(), dkim_key[0])
    settings = settings_for(root, module, verify=True, nameservers=[dns.nameserver])
    async with running(settings) as server:
        code, _ = await send(server.port or 0, raw)
        assert code == 250
        again, _ = await send(server.port or 0, raw)  # the same records, from the cache
        assert again == 250
    [auth, _] = seen(module)
    assert auth is not None
    assert (auth.spf, auth.dkim, auth.dmarc) == ("pass", "pass", "pass")
    assert auth.from_domain == "example.test" and auth.dkim_domains == ("example.test",)
    assert auth.header.startswith(f"{HOSTNAME}; spf=pass smtp.mailfrom=alice@example.test;")
    assert "dkim=pass header.d=example.test header.s=sel" in auth.header
    # On top of the stored message, and the rest is the message as sent, byte for byte.
    stored = queued(root / "run" / "posts")[0].raw
    top = b"Authentication-Results: mx.test;\r\n\tspf=pass smtp.mailfrom=alice@example.test;\r\n"
    assert stored.startswith(top)
    assert stored.endswith(b"\r\n" + raw)
    assert stored.count(b"Authentication-Results:") == 1
    # Cached for the records' TTL: the second message asked DNS for nothing new.
    assert dns.zone.count("_dmarc.example.test") == 1
    assert dns.zone.count("sel._domainkey.example.test") == 1
    assert dns.zone.count("example.test") == 1


async def test_a_changed_body_byte_fails_dkim_and_so_dmarc(
    project: tuple[Path, str], dns: RunningDns, dkim_key: tuple[bytes, str]
) -> None:
    root, module = project
    raw = signed(message("Pay 100 euros.\r\n"), dkim_key[0]).replace(b"100", b"900")
    settings = settings_for(root, module, verify=True, nameservers=[dns.nameserver])
    async with running(settings) as server:
        # The list's bounce address passes SPF, but is not aligned with the author's domain.
        code, _ = await send(server.port or 0, raw, mail_from="bounce@lists.other.test")
        assert code == 250
    [auth] = seen(module)
    assert auth is not None
    assert (auth.spf, auth.dkim, auth.dmarc) == ("pass", "fail", "fail")
    assert auth.dkim_domains == ()


async def test_a_spoofed_domain_with_dash_all_fails_spf(
    project: tuple[Path, str], dns: RunningDns
) -> None:
    root, module = project
    raw = message(sender="ceo@spoofed.test")
    settings = settings_for(root, module, verify=True, nameservers=[dns.nameserver])
    async with running(settings) as server:
        code, _ = await send(server.port or 0, raw, mail_from="ceo@spoofed.test")
        assert code == 250  # a verdict, not a refusal: handlers decide (@authenticated)
    [auth] = seen(module)
    assert auth is not None
    assert (auth.spf, auth.dkim, auth.dmarc) == ("fail", "none", "fail")
    assert "spf=fail smtp.mailfrom=ceo@spoofed.test" in auth.header


@pytest.mark.slow
async def test_a_dns_server_that_never_answers_is_temperror_within_the_timeout(
    project: tuple[Path, str], dkim_key: tuple[bytes, str]
) -> None:
    root, module = project
    raw = signed(message(), dkim_key[0])
    with silent_dns() as nameserver:
        settings = settings_for(root, module, verify=True, nameservers=[nameserver], timeout=3.0)
        async with running(settings) as server:
            port = server.port or 0
            started = time.monotonic()
            first = asyncio.ensure_future(send(port, raw))
            await asyncio.sleep(0.3)
            # While that message waits on DNS, another session is served at once: the
            # checks run in threads, never on the event loop.
            other = await RawClient.connect(port)
            assert (await other.cmd("EHLO other.test"))[0] == 250
            assert (await other.cmd("NOOP"))[0] == 250
            assert time.monotonic() - started < 2.0  # a blocked loop: >= 3.0
            await other.close()
            code, _ = await first
            elapsed = time.monotonic() - started
    assert code == 250
    assert 2.5 < elapsed < 3.0 + 4.0, elapsed  # bounded by [auth] timeout, loosely
    [auth] = seen(module)
    assert auth is not None
    assert (auth.spf, auth.dkim, auth.dmarc) == ("temperror", "temperror", "temperror")


async def test_verify_off_leaves_message_auth_none_and_the_bytes_alone(
    project: tuple[Path, str], dkim_key: tuple[bytes, str]
) -> None:
    root, module = project
    forged = "Authentication-Results: mx.test; dmarc=pass\r\n"
    raw = signed(message(extra=forged), dkim_key[0])
    async with running(settings_for(root, module)) as server:
        assert (await send(server.port or 0, raw))[0] == 250
    assert seen(module) == [None]
    assert queued(root / "run" / "posts")[0].raw == raw


async def test_forged_results_with_our_authserv_id_are_removed_others_kept(
    project: tuple[Path, str], dns: RunningDns
) -> None:
    root, module = project
    forged = (
        "Authentication-Results: MX.TEST; spf=pass; dkim=pass; dmarc=pass\r\n"
        "Authentication-Results: upstream.example.org;\r\n spf=pass smtp.mailfrom=x.org\r\n"
        "authentication-results:  (sneaky) mx.test 1;\r\n\tdmarc=pass\r\n"
    )
    raw = message(sender="ceo@spoofed.test", extra=forged)
    settings = settings_for(root, module, verify=True, nameservers=[dns.nameserver])
    async with running(settings) as server:
        assert (await send(server.port or 0, raw, mail_from="ceo@spoofed.test"))[0] == 250
    stored = queued(root / "run" / "posts")[0]
    fields = stored.email.get_all("Authentication-Results")
    assert len(fields) == 2
    assert str(fields[0]).replace("\t", " ").startswith("mx.test; spf=fail")  # ours, on top
    assert str(fields[1]).startswith("upstream.example.org;")  # another server's: kept
    assert b"dmarc=pass" not in stored.raw
    assert stored.raw.endswith(message(sender="ceo@spoofed.test"))


PIECES = [
    b"Authentication-Results: mx.test; dkim=pass\r\n",
    b"authentication-results :(c) MX.test;\r\n\tspf=pass\r\n",
    b"Authentication-Results: other.test; spf=fail\r\n",
    b" folded\r\n",
    b"\tfolded\n",
    b"Subject: x\r\n",
    b"junk without colon\r\n",
    b"\r\n",
    b"\n",
    b"\x00\xff\r",
]


@given(st.lists(st.sampled_from(PIECES), max_size=12), st.binary(max_size=20))
def test_stamp_leaves_one_field_of_ours_on_top_whatever_the_head(
    pieces: list[bytes], tail: bytes
) -> None:
    raw = b"".join(pieces) + tail
    m = MailRequest(raw)
    m.replace_head(stamp(m.head, "mx.test; spf=none; dkim=none; dmarc=none", HOSTNAME))
    assert m.raw.startswith(b"Authentication-Results: mx.test;")
    head = m.head
    # Our field, and after it no line of the head that continues it or claims our id.
    first_end = head.index(b"\tdmarc=none") + len(b"\tdmarc=none")
    rest = head[first_end:].split(b"\n", 1)[1] if b"\n" in head[first_end:] else b""
    assert rest[:1] not in (b" ", b"\t")
    for line in rest.split(b"\n"):
        if line.strip() in (b"", b"\r"):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authentication-results":
            assert b"mx.test" not in value.lower()
    # The body, from the blank line on, is the one received.
    assert m.raw.endswith(raw[len(MailRequest(raw).head) :])


# -- the requirement, and the example blog that uses it ----------------------------------------


async def test_the_example_blog_publishes_only_dmarc_authenticated_posts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dns: RunningDns, dkim_key: tuple[bytes, str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    settings = settings_for(tmp_path, "app.handlers.posting", verify=True)
    settings = Settings(
        root=tmp_path,
        server=settings.server.model_dump(),
        router=settings.router.model_dump(),
        auth={"verify": True, "nameservers": [dns.nameserver]},
    )
    async with running(settings) as server:
        port = server.port or 0
        good = signed(message(), dkim_key[0])
        assert (await send(port, good))[0] == 250
        spoofed = message(sender="ceo@spoofed.test")
        code, text = await send(port, spoofed, mail_from="ceo@spoofed.test")
        assert (code, text) == (550, b"5.7.1 Sender domain not authenticated (DMARC fail)")
    [post] = queued(tmp_path / "run" / "posts")  # only the authentic one was published
    assert post.raw.endswith(good)
    assert post.raw.startswith(b"Authentication-Results: mx.test;")


async def test_the_requirement_answers_451_when_dns_cannot_tell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    with silent_dns() as nameserver:
        settings = Settings(
            root=tmp_path,
            server={"port": 0, "hostname": HOSTNAME, "handlers": ["app.handlers.posting"]},
            router={"defaults": {"host": r"example\.com"}},
            auth={"verify": True, "nameservers": [nameserver], "timeout": 0.5},
        )
        async with running(settings) as server:
            code, text = await send(server.port or 0, message())
    assert code == 451 and text.startswith(b"4.7.0"), text
    assert queued(tmp_path / "run" / "posts") == []


async def test_verify_off_lets_required_handlers_run_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_out: io.StringIO
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    settings = Settings(
        root=tmp_path,
        server={"port": 0, "hostname": HOSTNAME, "handlers": ["app.handlers.posting"]},
        router={"defaults": {"host": r"example\.com"}},
    )
    async with running(settings) as server:
        assert (await send(server.port or 0, message()))[0] == 250
    lines = [json.loads(line) for line in log_out.getvalue().splitlines()]
    [warning] = [line for line in lines if line.get("event") == "auth_not_verified"]
    assert "app.handlers.posting.START" in warning["handlers"]


def checker_for(dns: RunningDns, **kwargs: Any) -> AuthChecker:
    return AuthChecker(HOSTNAME, DnsClient([("127.0.0.1", dns.port)]), **kwargs)


def test_alignment_is_relaxed_or_strict_as_the_record_says(dns: RunningDns) -> None:
    checker = checker_for(dns)
    try:
        verdicts = []
        for domain in ("example.test", "strict.test"):
            m = MailRequest(message(sender=f"a@{domain}"), mail_from=f"b@bounces.{domain}")
            r = checker.check(m, ip="127.0.0.1", helo="h", deadline=time.monotonic() + 5)
            verdicts.append((r.spf, r.dmarc))
        # A bounce (null sender): SPF of the HELO name, which DMARC cannot align with From.
        bounce = MailRequest(message(), mail_from="")
        r = checker.check(
            bounce, ip="127.0.0.1", helo="client.example.test", deadline=time.monotonic() + 5
        )
    finally:
        checker.close()
    assert verdicts == [("pass", "pass"), ("pass", "fail")]
    assert (r.spf, r.dmarc) == ("pass", "pass")  # relaxed: client.example.test ~ example.test
    assert "smtp.helo=client.example.test" in r.header


def test_a_message_over_max_verify_size_is_not_dkim_verified(
    dns: RunningDns, dkim_key: tuple[bytes, str]
) -> None:
    raw = signed(message("x" * 2000 + "\r\n"), dkim_key[0])
    checker = checker_for(dns, max_verify_size=1000)
    try:
        m = MailRequest(raw, mail_from="alice@example.test")
        r = checker.check(m, ip="127.0.0.1", helo="h", deadline=time.monotonic() + 5)
    finally:
        checker.close()
    assert (r.spf, r.dkim, r.dmarc) == ("pass", "permerror", "pass")  # DMARC through SPF
    assert "(message too large to verify)" in r.header


def test_an_arc_sealed_message_is_verified(dns: RunningDns, dkim_key: tuple[bytes, str]) -> None:
    # A forwarder (upstream.test, sealing with example.test's key) recorded its verdicts.
    forwarded = b"Authentication-Results: upstream.test; spf=pass\r\n" + message()
    seal = dkim.arc_sign(
        forwarded,
        b"sel",
        b"example.test",
        dkim_key[0],
        b"upstream.test",
        include_headers=[b"from", b"subject"],
    )
    checker = checker_for(dns)
    try:
        verdicts = []
        for raw in (b"".join(seal) + forwarded, b"".join(seal) + forwarded + b"tampered\r\n"):
            m = MailRequest(raw, mail_from="alice@example.test")
            r = checker.check(m, ip="127.0.0.1", helo="h", deadline=time.monotonic() + 5)
            verdicts.append(r.arc)
    finally:
        checker.close()
    assert verdicts == ["pass", "fail"]
    assert "arc=" in r.header


# -- the corpus, settings ------------------------------------------------------------------------


async def test_the_corpus_goes_through_with_verify_on(
    project: tuple[Path, str], dns: RunningDns, corpus: list[Path]
) -> None:
    root, module = project
    settings = settings_for(root, module, verify=True, nameservers=[dns.nameserver])
    sent = []
    async with running(settings) as server:
        client = await RawClient.connect(server.port or 0)
        assert (await client.cmd("EHLO corpus.test"))[0] == 250
        for path in corpus:
            raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            if not raw.endswith(b"\r\n"):
                raw += b"\r\n"
            stuffed = b"".join(
                b"." + line if line.startswith(b".") else line
                for line in raw.splitlines(keepends=True)
            )
            code, text = await client.transaction(
                "someone@unpublished.test", ["post@example.com"], stuffed + b".\r\n"
            )
            assert code == 250, (path.name, text)
            sent.append(raw)
        await client.close()
    stored = queued(root / "run" / "posts")
    assert len(stored) == len(sent)
    for message_, raw in zip(stored, sent, strict=True):
        head = message_.raw.split(b"\r\n", 1)[0]
        assert head == b"Authentication-Results: mx.test;"
        assert message_.raw.endswith(raw)
    assert all(a is not None and a.spf == "none" for a in seen(module))


def test_a_bad_nameserver_is_a_one_line_settings_error(tmp_path: Path) -> None:
    config = tmp_path / "config" / "settings.toml"
    config.parent.mkdir()
    config.write_text('[auth]\nverify = true\nnameservers = ["dns.example.org"]\n')
    with pytest.raises(ConfigError, match=r"auth\.nameservers .*dns\.example\.org") as err:
        load_settings(config)
    assert "\n" not in str(err.value)
    config.write_text('[auth]\nverify = true\nnameservers = ["127.0.0.1:70000"]\n')
    with pytest.raises(ConfigError, match="port"):
        load_settings(config)
    config.write_text("[server]\nhandler_timeout = 5.0\n[auth]\nverify = true\ntimeout = 5.0\n")
    with pytest.raises(ConfigError, match=r"auth\.timeout"):
        load_settings(config)


def test_message_auth_survives_for_recipient() -> None:
    results = AuthResults(spf="pass", dkim="none", dmarc="pass", header="mx.test; spf=pass")
    m = MailRequest(b"\r\n", rcpt_tos=["a@x", "b@x"], auth=results)
    assert m.for_recipient("b@x").auth is results
    assert sys.modules["maildefer"].AuthResults is AuthResults


SPOOLED_HANDLERS = """
from maildefer import Queue, route, stateless

SEEN = []

@route("(name)@(host)")
@stateless
async def START(message, name, host):
    SEEN.append((type(message).__name__, message.auth))
    await Queue("run/posts").push(message)
"""


async def test_a_spooled_message_is_verified_and_stamped_byte_exact(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dns: RunningDns,
    dkim_key: tuple[bytes, str],
) -> None:
    """A message over the spool threshold lives on disk: DKIM still sees every byte, and
    the header goes on top of the stored copy without the rest changing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = write_handlers(tmp_path, SPOOLED_HANDLERS)
    line = "x" * 76 + "\r\n"
    raw = signed(message(body=line * 30_000), dkim_key[0])  # 2.3 MB
    settings = Settings(
        root=tmp_path,
        server={
            "port": 0,
            "hostname": HOSTNAME,
            "handlers": [module],
            "spool_threshold": 65_536,
            "spool_dir": str(tmp_path / "spool"),
        },
        router={"defaults": {"host": r"example\.com"}},
        auth={"verify": True, "nameservers": [dns.nameserver]},
    )
    async with running(settings) as server:
        code, _ = await send(server.port or 0, raw)
        assert code == 250
    [(kind, auth)] = list(importlib.import_module(module).SEEN)
    assert kind == "SpooledMailRequest"  # the path under test, not the in-memory one
    assert auth is not None and (auth.spf, auth.dkim, auth.dmarc) == ("pass", "pass", "pass")
    stored = queued(tmp_path / "run" / "posts")[0].raw
    assert stored.startswith(b"Authentication-Results: mx.test;")
    assert stored.endswith(b"\r\n" + raw) and stored.count(b"Authentication-Results:") == 1
    assert list((tmp_path / "spool").iterdir()) == []  # the spool file went with the session


async def test_spf_checks_the_client_a_trusted_proxy_names(
    project: tuple[Path, str], dns: RunningDns
) -> None:
    """Behind a PROXY header, SPF sees the real client, not the proxy (127.0.0.1)."""
    root, module = project
    settings = Settings(
        root=root,
        server={"port": 0, "hostname": HOSTNAME, "handlers": [module], "proxy_protocol": True},
        router={"defaults": {"host": r"example\.com"}},
        auth={"verify": True, "nameservers": [dns.nameserver]},
    )
    raw = message(sender="mallory@spoofed.test") + b".\r\n"  # spoofed.test: only 192.0.2.1
    async with running(settings) as server:
        for client_ip in ("192.0.2.1", "198.51.100.9"):
            client = await RawClient.connect(server.port or 0, greet=False)
            await client.send(f"PROXY TCP4 {client_ip} 127.0.0.1 4242 25\r\n".encode())
            assert (await client.reply())[0] == 220
            assert (await client.cmd("EHLO client.example.test"))[0] == 250
            code, _ = await client.transaction("mallory@spoofed.test", ["post@example.com"], raw)
            assert code == 250
            await client.cmd("QUIT")
            await client.close()
    [allowed, other] = seen(module)
    assert allowed is not None and allowed.spf == "pass"  # 192.0.2.1 may send for it
    assert other is not None and other.spf == "fail"  # and 198.51.100.9 may not
    assert "smtp.mailfrom=mallory@spoofed.test" in allowed.header
