"""MailRequest on real messages (tests/corpus/) and on arbitrary bytes: never raises."""

from __future__ import annotations

import email.policy
from email.parser import BytesParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maildefer import MailRequest, MailResponse

# Parametrized at import time, so not through conftest's fixture; the corpus is in the
# repository and test_corpus_is_not_empty fails (never skips) if it went missing.
CORPUS = sorted((Path(__file__).resolve().parent / "corpus").glob("*.eml"))
HEADERS = ("Subject", "From", "To", "Content-Type", "Date", "Message-ID", "X-Not-There")


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_message_header_and_body_access(path: Path) -> None:
    data = path.read_bytes()
    message = MailRequest(data, mail_from="a@x.org", rcpt_tos=["b@y.org"])
    legacy = BytesParser(policy=email.policy.compat32).parsebytes(data)
    for name in HEADERS:
        value = message[name]
        # Present in the raw headers <=> not None; decoded to text either way.
        assert (value is None) == (legacy[name] is None), name
        assert value is None or isinstance(value, str)
        assert message.get(name, "fallback") == (value if value is not None else "fallback")
    assert message["X-Not-There"] is None
    names, legacy_names = message.keys(), legacy.keys()
    assert [k.lower() for k in names] == [k.lower() for k in legacy_names]
    assert isinstance(message.body(), str)
    assert message.raw == data  # byte-exact, never re-serialized
    assert message.for_recipient("c@y.org").raw is data


def test_corpus_is_not_empty() -> None:
    assert len(CORPUS) >= 20


def test_encoded_and_eight_bit_headers_decode() -> None:
    raw = (
        "Subject: =?utf-8?q?caf=C3=A9?=\r\n"
        "From: Zoë <zoe@example.com>\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
        "crème brûlée\r\n"
    ).encode()
    message = MailRequest(raw)
    assert message["Subject"] == "café"
    assert message["From"] is not None and "zoe@example.com" in message["From"]
    assert message.body().strip() == "crème brûlée"
    assert message.raw == raw


def test_body_of_bad_charset_and_broken_base64_does_not_raise() -> None:
    raw = (
        b"Content-Type: text/plain; charset=x-no-such-charset\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        b"!!!not base64\xff\xfe\r\n"
    )
    assert isinstance(MailRequest(raw).body(), str)


def test_mail_response_round_trips_through_mail_request() -> None:
    response = MailResponse(To="a@x.org", From="blog@y.org", Subject="Thanks", Body="Posted.")
    message = MailRequest(response.as_bytes())
    assert message["Subject"] == "Thanks"
    assert message.body().strip() == "Posted."


header_line = st.tuples(
    st.sampled_from(
        [b"Subject", b"From", b"To", b"Content-Type", b"Content-Transfer-Encoding", b"X"]
    ),
    st.binary(max_size=120),
).map(lambda kv: kv[0] + b": " + kv[1] + b"\r\n")
messages = st.one_of(
    st.binary(max_size=2000),
    st.tuples(st.lists(header_line, max_size=8), st.binary(max_size=500)).map(
        lambda hb: b"".join(hb[0]) + b"\r\n" + hb[1]
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=messages)
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    message = MailRequest(raw, mail_from="a@x.org", rcpt_tos=["b@y.org"])
    for name in HEADERS:
        value = message[name]
        assert value is None or isinstance(value, str)
    names = message.keys()
    assert all(isinstance(k, str) for k in names)
    assert isinstance(message.body(), str)
    assert message.raw is raw
