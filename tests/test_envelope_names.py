"""The envelope record (R6, byte-exact storage R30) and maildir names (R4)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from maildefer.errors import CorruptMessageError
from maildefer.mail import MailRequest
from maildefer.queue.envelope import HEADER, Envelope, unwrap, wrap
from maildefer.queue.keys import NameGenerator, escape_host
from maildefer.queue.maildir import MaildirQueue
from maildefer.queue.maildir.names import MaildirName

ENV = Envelope(
    "sender@example.org", ["a@x.org", "bcc-only@y.org"], "10.0.0.1:2525", 1.7e9, "a@x.org"
)


def _variants(raw: bytes) -> list[bytes]:
    lf = raw.replace(b"\r\n", b"\n")
    return [lf, lf.replace(b"\n", b"\r\n")]


def test_envelope_round_trip_every_field() -> None:
    raw = b"To: a@x.org\r\nSubject: hi\r\n\r\nbody\r\n"
    env, out = unwrap(wrap(raw, ENV))
    assert env == ENV
    assert out == raw


def test_prefix_uses_the_line_ending_of_the_original() -> None:
    assert b"\r\n" not in wrap(b"A: b\n\nx\n", ENV)
    crlf = wrap(b"A: b\r\n\r\nx\r\n", ENV)
    assert crlf.count(b"\n") == crlf.count(b"\r\n")


def test_corpus_is_byte_exact_through_wrap(corpus: list[Path]) -> None:
    for path in corpus:
        for raw in _variants(path.read_bytes()):
            env, out = unwrap(wrap(raw, ENV))
            assert out == raw, path.name
            assert env == ENV


async def test_corpus_is_byte_exact_through_the_queue(corpus: list[Path], tmp_path: Path) -> None:
    q = MaildirQueue(tmp_path / "q")
    for path in corpus:
        for raw in _variants(path.read_bytes()):
            request = MailRequest(raw, mail_from="s@x", rcpt_tos=["hidden@bcc.example"])
            key = await q.push(request)
            claim = q.claim_sync(key)
            assert claim is not None
            assert claim.message.raw == raw, path.name
            assert claim.message.rcpt_tos == ["hidden@bcc.example"]
            q.ack_sync(claim)
    assert await q.count() == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"Subject: caf\xc3\xa9 \xff\xfe\r\n\r\n8bit \x80\x81 body\r\n",
        b"Subject: nul\r\n\r\nbefore\x00after\x00\r\n",
        b"Subject: long\r\n\r\n" + b"x" * 100_000 + b"\r\n",
        b"X: " + b"y" * 5000 + b"\n\n\n\n",
        b"",
        b"\n",
        b"no headers, no newline at all",
        HEADER + b" looks like ours but is the original\n\n",
    ],
)
def test_binaryish_bytes_round_trip(raw: bytes) -> None:
    env, out = unwrap(wrap(raw, ENV))
    assert out == raw
    assert env == ENV


def test_file_without_envelope_is_returned_whole() -> None:
    raw = b"From: a@x\nTo: b@y\n\nhi\n"
    assert unwrap(raw) == (None, raw)


@pytest.mark.parametrize("name", ["cpython_msg_02.eml", "cpython_msg_11.eml"])
def test_every_single_bit_flip_and_truncation_is_detected(name: str, corpus: list[Path]) -> None:
    path = next(p for p in corpus if p.name == name)
    for raw in _variants(path.read_bytes()):
        data = wrap(raw, ENV)
        for offset in range(len(data)):
            for bit in range(8):
                flipped = bytearray(data)
                flipped[offset] ^= 1 << bit
                with pytest.raises(CorruptMessageError):
                    unwrap(bytes(flipped))
        for size in range(1, len(data)):
            with pytest.raises(CorruptMessageError):
                unwrap(data[:size])


async def test_corrupt_files_are_buried_not_handed_out(corpus: list[Path], tmp_path: Path) -> None:
    rng = random.Random(1234)
    q = MaildirQueue(tmp_path / "q", undeliverable=tmp_path / "dead")
    dead = MaildirQueue(tmp_path / "dead")
    q.ensure()
    expected = 0
    for path in corpus:
        data = wrap(path.read_bytes(), ENV)
        damaged = [data[: rng.randrange(1, len(data))] for _ in range(2)]
        for _ in range(2):
            flipped = bytearray(data)
            flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            damaged.append(bytes(flipped))
        for n, blob in enumerate(damaged):
            filename = f"{path.stem}-{n}.corrupt.host"
            (q.dir("new") / filename).write_bytes(blob)
            assert q.claim_sync(filename) is None
            expected += 1
            record = dead.error_record(filename)
            assert record is not None and record["reason"] == "corrupt", filename
            assert record["queue"] == str(q.path)
            assert dead.locate(filename) is not None
            assert (
                dead.dir(dead.locate(filename)[0]) / dead.locate(filename)[1]
            ).read_bytes() == blob
    assert await q.count() == 0
    assert await dead.count() == expected


# -- property tests ---------------------------------------------------------------------

# Any text, lone surrogates included (what surrogateescape-decoded 8-bit input looks like,
# and what code may pass to push()).
surrogates = st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3)
addresses = st.one_of(
    st.text(max_size=40),
    surrogates,
    st.lists(st.one_of(st.text(max_size=6), surrogates), max_size=4).map("".join),
)


@settings(max_examples=300, deadline=None)
@given(
    raw=st.binary(max_size=3000),
    mail_from=addresses,
    rcpt_tos=st.lists(addresses, max_size=5),
    peer=addresses,
    at=st.floats(allow_nan=False, allow_infinity=False),
    rcpt_to=addresses,
)
@example(
    raw=b"x", mail_from="\ud800", rcpt_tos=["\udcff"], peer="\udc80", at=0.0, rcpt_to="a\udfffb"
)
def test_wrap_unwrap_property(
    raw: bytes, mail_from: str, rcpt_tos: list[str], peer: str, at: float, rcpt_to: str
) -> None:
    envelope = Envelope(mail_from, rcpt_tos, peer, at, rcpt_to)
    data = wrap(raw, envelope)
    assert data.startswith(HEADER)
    got, out = unwrap(data)
    assert out == raw
    assert got == envelope


name_parts = st.text(
    alphabet=st.characters(blacklist_characters=":,/\x00", codec="utf-8"), min_size=1, max_size=12
)


@settings(max_examples=300, deadline=None)
@given(
    key=name_parts,
    fields=st.lists(
        st.tuples(
            st.text(alphabet=st.characters(blacklist_characters=":,=/\x00"), max_size=4),
            st.one_of(
                st.none(),
                st.text(alphabet=st.characters(blacklist_characters=":,/\x00"), max_size=8),
            ),
        ),
        max_size=4,
    ),
    info=st.one_of(
        st.just(""),
        st.text(alphabet=st.characters(blacklist_characters="/\x00"), max_size=8).map(
            lambda s: ":" + s
        ),
    ),
)
def test_name_parse_filename_round_trip(
    key: str, fields: list[tuple[str, str | None]], info: str
) -> None:
    tail = "".join(f",{k}" if v is None else f",{k}={v}" for k, v in fields)
    filename = f"{key}{tail}{info}"
    assert MaildirName.parse(filename).filename == filename
    assert MaildirName.parse(filename).key == key


@given(st.text())
def test_escape_host_property(host: str) -> None:
    escaped = escape_host(host)
    assert not set("/:,~") & set(escaped)
    # Injective: decoding the octal escapes gives the host back.
    decoded = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1), 8)), escaped)
    assert decoded == host


def test_escape_host_examples() -> None:
    assert escape_host("mx.example.org") == "mx.example.org"
    assert escape_host("a/b:c,d~e\\f") == "a\\057b\\072c\\054d\\176e\\134f"


def test_name_state_fields() -> None:
    name = MaildirName.parse("1.M2P3Q4Rab.h,S=99:2,S")
    later = name.with_fields(A=2, R=1, T=5000)
    assert later.filename == "1.M2P3Q4Rab.h,S=99,A=2,R=1,T=5000:2,S"
    assert (later.attempts, later.recoveries, later.due_ms) == (2, 1, 5000)
    assert later.fresh().filename == "1.M2P3Q4Rab.h,S=99"
    assert MaildirName.parse("k,A=junk").attempts == 0


def test_keys_are_unique_with_a_frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("maildefer.queue.keys.time.time_ns", lambda: 1_700_000_000_000_000_000)
    a, b = NameGenerator(host="h"), NameGenerator(host="h")
    keys = {gen.next_key() for gen in (a, b) for _ in range(5000)}
    assert len(keys) == 10_000
