"""Files from other mail systems keep their envelope: header rules, and a real Postfix.

A file that Postfix (``virtual(8)``, ``local(8)``), Dovecot or procmail delivers into a
maildir has no maildefer envelope record: its envelope is in ``Return-Path:`` and
``Delivered-To:`` / ``X-Original-To:``, and only without those in ``From:`` / ``To:`` /
``Cc:`` (contract §4, 0.2; ``maildefer/queue/envelope.py``, ``header_envelope``).
"""

from __future__ import annotations

import asyncio
import mailbox
import re
import smtplib
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import postfix as postfix_helper
from hypothesis import given, settings
from hypothesis import strategies as st

from maildefer.errors import CorruptMessageError, NoRouteError
from maildefer.mail import MailRequest
from maildefer.queue.envelope import header_envelope, message_parts, request_from_file, unwrap
from maildefer.queue.maildir import MaildirQueue
from maildefer.routing import Router
from maildefer.worker import Worker

README = Path(__file__).resolve().parent.parent / "README.md"

# What Postfix virtual(8) wrote for a Bcc recipient (its field order, LF line ends): the
# recipient is in no To: or Cc:, the envelope sender differs from From:.
VIRTUAL_BCC = (
    b"Return-Path: <bounces+ann@lists.sender.test>\n"
    b"X-Original-To: box@example.test\n"
    b"Delivered-To: box@example.test\n"
    b"Received: from [127.0.0.1] (localhost [127.0.0.1])\n"
    b"\tby postfix.example.test (Postfix) with ESMTP id DC16A25401E\n"
    b"\tfor <box@example.test>; Tue,  1 Dec 2026 20:31:14 +0000 (UTC)\n"
    b"From: Ann <ann@sender.test>\n"
    b"To: someone@else.test\n"
    b"Cc: other@else.test\n"
    b"Subject: bcc test\n"
    b"\n"
    b"hello\n"
)


def envelope_of(data: bytes) -> tuple[str, list[str], str]:
    request = request_from_file(data)
    return request.mail_from, request.rcpt_tos, request.rcpt_to


# -- the header rules --------------------------------------------------------------------


def test_return_path_and_delivered_to_keep_a_bcc_recipient() -> None:
    assert envelope_of(VIRTUAL_BCC) == (
        "bounces+ann@lists.sender.test",
        ["box@example.test"],
        "box@example.test",
    )
    # Byte for byte what was dropped in: nothing is added or removed.
    assert request_from_file(VIRTUAL_BCC).raw == VIRTUAL_BCC


def test_x_original_to_alone_is_the_recipient() -> None:
    # local(8) mailbox delivery: no Delivered-To by default (prepend_delivered_header).
    data = (
        b"Return-Path: <ann@sender.test>\r\n"
        b"X-Original-To: postmaster@example.test\r\n"
        b"From: ann@sender.test\r\nTo: list@example.test\r\n\r\nhi\r\n"
    )
    assert envelope_of(data) == (
        "ann@sender.test",
        ["postmaster@example.test"],
        "postmaster@example.test",
    )


def test_the_top_delivered_to_is_the_final_recipient() -> None:
    # Forwarded twice (alice -> bob -> box), then aliased: each delivery prepended its
    # Delivered-To, X-Original-To is the address before this host's rewriting.
    data = (
        b"Return-Path: <ann@sender.test>\n"
        b"X-Original-To: alias@example.test\n"
        b"Delivered-To: box@example.test\n"
        b"Received: by mx.example.test\n"
        b"X-Original-To: bob@b.test\n"
        b"Delivered-To: bob@b.test\n"
        b"Delivered-To: alice@a.test\n"
        b"From: ann@sender.test\nTo: alice@a.test\n\nhi\n"
    )
    assert envelope_of(data) == ("ann@sender.test", ["box@example.test"], "box@example.test")
    # Only Delivered-To lines (a .forward chain, procmail below it): still the top one.
    chain = (
        b"Delivered-To: box@example.test\nDelivered-To: bob@b.test\nDelivered-To: alice@a.test\n\n"
    )
    assert envelope_of(chain)[1:] == (["box@example.test"], "box@example.test")


def test_the_null_sender_stays_null() -> None:
    # A bounce: From: names the mailer daemon, but the reverse-path is empty and must stay
    # so (RFC 5321 §4.5.5: never answer it).
    data = (
        b"Return-Path: <>\nDelivered-To: box@example.test\n"
        b"From: Mail Delivery System <MAILER-DAEMON@mx.sender.test>\nTo: box@example.test\n\n"
    )
    assert envelope_of(data) == ("", ["box@example.test"], "box@example.test")


def test_without_delivery_fields_from_to_cc_are_read() -> None:
    data = b"From: Ann <ann@x.org>\nTo: bob@y.org\nCc: cat@z.org\nBcc: dan@w.org\n\nhi\n"
    assert envelope_of(data) == ("ann@x.org", ["bob@y.org", "cat@z.org"], "bob@y.org")


def test_sender_and_recipient_fall_back_each_on_its_own() -> None:
    only_sender = b"Return-Path: <env@x.org>\nFrom: hdr@x.org\nTo: bob@y.org\n\n"
    only_rcpt = b"Delivered-To: box@y.org\nFrom: hdr@x.org\nTo: bob@y.org\n\n"
    assert envelope_of(only_sender) == ("env@x.org", ["bob@y.org"], "bob@y.org")
    assert envelope_of(only_rcpt) == ("hdr@x.org", ["box@y.org"], "box@y.org")


def test_field_spelling_folding_and_comments() -> None:
    data = (
        b"return-path:\r\n <ann@x.org> (the envelope sender)\r\n"
        b"DELIVERED-TO :  box@y.org\r\n"
        b"Subject: not\r\n Delivered-To: folded@inside.subject\r\n\r\n"
    )
    assert envelope_of(data) == ("ann@x.org", ["box@y.org"], "box@y.org")


def test_fields_in_the_body_do_not_count() -> None:
    data = (
        b"From: ann@x.org\nTo: bob@y.org\n\nReturn-Path: <evil@z.org>\nDelivered-To: evil@z.org\n"
    )
    assert envelope_of(data) == ("ann@x.org", ["bob@y.org"], "bob@y.org")
    # No header block at all (the file starts with its empty line).
    assert envelope_of(b"\nDelivered-To: evil@z.org\n\nx\n") == ("", [], "")


def test_an_empty_delivered_to_falls_through() -> None:
    data = b"Delivered-To:\nX-Original-To: <orig@y.org>\nFrom: a@x.org\nTo: b@y.org\n\n"
    assert envelope_of(data)[1:] == (["orig@y.org"], "orig@y.org")


def test_non_utf8_and_utf8_addresses() -> None:
    data = "Return-Path: <jörg@bücher.test>\nDelivered-To: zoë@example.test\n\n".encode()
    assert envelope_of(data)[0::2] == ("jörg@bücher.test", "zoë@example.test")
    # Invalid UTF-8 survives as surrogates and a push of the file keeps it.
    broken = b"Return-Path: <\xff@x.org>\nDelivered-To: box@y.org\n\n"
    sender = envelope_of(broken)[0]
    assert sender.encode("utf-8", "surrogateescape") == b"\xff@x.org"


HEADER_NAMES = [b"Return-Path", b"Delivered-To", b"X-Original-To", b"From", b"To", b"Cc", b"Subj"]


@st.composite
def broken_header_blocks(draw: st.DrawFn) -> bytes:
    """Header blocks of the fields read here, with any bytes as values and line ends."""
    lines = draw(
        st.lists(
            st.tuples(
                st.sampled_from(HEADER_NAMES),
                st.sampled_from([b":", b" :", b"", b"::"]),
                st.binary(max_size=40),
                st.sampled_from([b"\n", b"\r\n", b"\r", b"\n "]),
            ),
            max_size=8,
        )
    )
    return b"".join(b"".join(parts) for parts in lines) + draw(st.binary(max_size=20))


@settings(max_examples=400, deadline=None)
@given(broken_header_blocks())
def test_broken_headers_never_raise(data: bytes) -> None:
    try:
        request = request_from_file(data)
    except CorruptMessageError:
        # Only a file that starts like our own record may be refused as corrupt.
        assert data.startswith(b"X-") or data[:1] in (b"X", b"x")
        return
    assert isinstance(request.mail_from, str)
    assert all(isinstance(r, str) and r for r in request.rcpt_tos)
    assert request.rcpt_to == (request.rcpt_tos[0] if request.rcpt_tos else "")
    assert request.raw == data
    _raw, envelope = message_parts(data)
    assert (envelope.mail_from, envelope.rcpt_tos) == (request.mail_from, request.rcpt_tos)


# -- push(bytes) reads the same fields ----------------------------------------------------


async def test_pushing_the_bytes_of_a_delivered_file_reads_the_same_envelope(
    tmp_path: Path,
) -> None:
    q = MaildirQueue(tmp_path / "q")
    q.ensure()
    (q.dir("new") / "1700000000.V801I42M1.mx").write_bytes(VIRTUAL_BCC)  # dropped in
    pushed = await q.push(VIRTUAL_BCC)
    seen = {}
    for name in sorted(n for batch in q.scan_new() for n in batch):
        claim = q.claim_sync(name)
        assert claim is not None
        m = claim.message
        seen[name == pushed] = (m.mail_from, m.rcpt_tos, m.rcpt_to, m.raw)
        q.ack_sync(claim)
    assert seen[True] == seen[False]
    assert seen[True][:3] == (
        "bounces+ann@lists.sender.test",
        ["box@example.test"],
        "box@example.test",
    )
    # The pushed copy carries our record, with the envelope read from the fields.
    envelope = header_envelope(VIRTUAL_BCC)
    assert envelope.mail_from == "bounces+ann@lists.sender.test"


def test_push_of_an_email_message_reads_return_path() -> None:
    msg = MailRequest(VIRTUAL_BCC).email
    _, envelope = message_parts(msg)
    assert (envelope.mail_from, envelope.rcpt_tos) == (
        "bounces+ann@lists.sender.test",
        ["box@example.test"],
    )


# -- the README's plain-maildir handler -------------------------------------------------


def readme_handler_module(maildirs: Path) -> str:
    """The README's example handler as an importable module, its MAILDIRS under a temp dir."""
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    source = next(b for b in blocks if "def deliver_to_maildir" in b)
    name = "readme_plain_maildir"
    module = sys.modules[name] = types.ModuleType(name)
    exec(compile(source, str(README), "exec"), module.__dict__)
    module.MAILDIRS = str(maildirs)  # type: ignore[attr-defined]
    return name


@pytest.fixture
def readme_module(tmp_path: Path) -> Iterator[str]:
    name = readme_handler_module(tmp_path / "mail")
    yield name
    sys.modules.pop(name, None)


async def test_readme_handler_writes_a_plain_maildir_copy(
    tmp_path: Path, readme_module: str
) -> None:
    raw = b"From: ann@sender.test\r\nTo: list@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    everyone = ["list@example.org", "secret@example.org", "bcc@example.org"]
    message = MailRequest(raw, mail_from="ann@sender.test", rcpt_tos=everyone)
    router = Router.from_modules([readme_module])
    assert await router.deliver(message.for_recipient("bcc@example.org")) == 1
    with pytest.raises(NoRouteError):  # the user group's regex keeps paths out
        await router.deliver(message.for_recipient("../x@example.org"))
    path = tmp_path / "mail" / "bcc" / "Maildir"
    box = mailbox.Maildir(str(path), create=False)
    [key] = box.keys()
    data = box.get_bytes(key)
    # What a mail reader sees: the original, byte for byte, under Postfix's two fields;
    # no queue record, and nothing about the other envelope recipients.
    assert data == b"Return-Path: <ann@sender.test>\r\nDelivered-To: bcc@example.org\r\n" + raw
    assert unwrap(data)[0] is None and b"secret@example.org" not in data
    # And a maildefer worker on that maildir would read the envelope back.
    assert envelope_of(data) == ("ann@sender.test", ["bcc@example.org"], "bcc@example.org")
    assert sorted(p.name for p in path.iterdir()) == ["cur", "new", "tmp"]


# -- a real Postfix delivers, a worker drains ---------------------------------------------


@pytest.fixture
def postfix() -> Iterator[postfix_helper.Postfix]:
    reason = postfix_helper.missing()
    if reason:
        pytest.skip(reason)
    with postfix_helper.running_postfix(["box"]) as instance:
        yield instance


def send(instance: postfix_helper.Postfix, sender: str, rcpt: str, data: bytes) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with smtplib.SMTP("127.0.0.1", instance.port, timeout=10) as client:
                refused = client.sendmail(sender, [rcpt], data)
            assert refused == {}, refused
            return
        except (ConnectionRefusedError, smtplib.SMTPServerDisconnected):
            # master opens the listener before `postfix start` returns; retried in case.
            assert time.monotonic() < deadline, instance.log()
            time.sleep(0.1)


@pytest.mark.timeout(60)
async def test_postfix_virtual_delivery_keeps_the_bcc_recipient(
    postfix: postfix_helper.Postfix,
) -> None:
    maildir = postfix.maildir("box")
    bcc = b"From: Ann <ann@sender.test>\r\nTo: someone@else.test\r\nSubject: bcc\r\n\r\nhello\r\n"
    bounce = (
        b"From: Mail Delivery System <MAILER-DAEMON@mx.sender.test>\r\n"
        b"To: someone@else.test\r\nSubject: bounce\r\n\r\nundeliverable\r\n"
    )
    await asyncio.to_thread(send, postfix, "bounces+ann@sender.test", "box@example.test", bcc)
    await asyncio.to_thread(send, postfix, "", "box@example.test", bounce)

    deadline = time.monotonic() + 20
    new = maildir / "new"
    while not (new.is_dir() and len(list(new.iterdir())) == 2):
        assert time.monotonic() < deadline, f"Postfix delivered nothing to {new}:\n{postfix.log()}"
        await asyncio.sleep(0.05)
    files = {p.name: p.read_bytes() for p in new.iterdir()}
    assert all(b"X-Maildefer-Envelope" not in d for d in files.values())

    seen: list[MailRequest] = []

    async def deliver(message: MailRequest) -> None:
        seen.append(message)

    queue = MaildirQueue(maildir)
    stats = await Worker(queue, deliver, burst=True, concurrency=2).serve()
    assert stats.handled == 2, postfix.log()
    by_subject = {m["Subject"]: m for m in seen}
    assert set(by_subject) == {"bcc", "bounce"}
    first, second = by_subject["bcc"], by_subject["bounce"]
    # The Bcc recipient (in no To: or Cc:) is the recipient; Return-Path the sender.
    assert (first.mail_from, first.rcpt_tos, first.rcpt_to) == (
        "bounces+ann@sender.test",
        ["box@example.test"],
        "box@example.test",
    )
    # The null sender stays null though From: names a mailer daemon.
    assert (second.mail_from, second.rcpt_to) == ("", "box@example.test")
    # The handler saw the file byte for byte, and it left the queue.
    assert sorted(m.raw for m in seen) == sorted(files.values())
    assert await queue.count() == 0 and list(new.iterdir()) == []
