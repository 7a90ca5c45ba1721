"""Answering a message without starting a mail loop: threading headers and RFC 3834.

:func:`respond` is :func:`maildefer.view.respond` for an answer to a received message:
addressed to its envelope sender, ``Re:`` once before its subject, ``In-Reply-To`` and
``References`` (RFC 5322 §3.6.4) so mail clients thread it, ``Auto-Submitted:
auto-replied`` (RFC 3834 §5) so other responders leave it alone, and ``None`` where
RFC 3834 §2 says an automatic response must not be sent (:func:`refusal` says why).

Example:
    >>> from maildefer import MailRequest
    >>> bounce = MailRequest(b"Subject: Undelivered\\r\\n\\r\\n", mail_from="")
    >>> refusal(bounce)
    'null sender'
    >>> post = MailRequest(b"Subject: Re: Hi\\r\\nMessage-ID: <1@x.org>\\r\\n\\r\\n",
    ...                    mail_from="ann@x.org")
    >>> subject(post["Subject"]), threading_headers(post)["In-Reply-To"]
    ('Re: Hi', '<1@x.org>')
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from maildefer.mail import MailRequest, MailResponse
from maildefer.view import current_view

# RFC 2369 and RFC 2919: mail that carries any of these comes from a list (RFC 3834 §2).
LIST_HEADERS = (
    "List-Id",
    "List-Unsubscribe",
    "List-Subscribe",
    "List-Post",
    "List-Help",
    "List-Owner",
    "List-Archive",
)
# Precedence (RFC 2076, not standard but what lists and bulk mailers set).
BULK_PRECEDENCE = frozenset({"bulk", "list", "junk"})
# Senders that are programs (vacation(1)'s junkmail rules, RFC 2142's postmaster).
DAEMON_SENDERS = frozenset({"mailer-daemon", "mailer", "postmaster"})

# One or more leading "Re:" (any case; "Re[2]:" and "Re(2):" of some clients; "Re :").
_RE_PREFIX = re.compile(r"^(?:\s*re\s*(?:\[\d+\]|\(\d+\))?\s*:)+\s*", re.IGNORECASE)
# Comments in a structured header value (RFC 5322 §3.2.2), not nested here.
_COMMENT = re.compile(r"\([^()]*\)")


def refusal(message: MailRequest) -> str | None:
    """Why RFC 3834 §2 says not to answer ``message`` automatically; ``None`` to answer.

    Not answered: the null sender (a bounce: RFC 5321 §4.5.5 too), ``Auto-Submitted:``
    other than ``no``, list mail (any ``List-*`` header of :data:`LIST_HEADERS`),
    ``Precedence: bulk``, ``list`` or ``junk``, and senders that are programs:
    ``MAILER-DAEMON``, ``mailer``, ``postmaster``, ``*-request``, ``owner-*``,
    ``*-owner`` (any case).

    Example:
        >>> from maildefer import MailRequest
        >>> refusal(MailRequest(b"Precedence: bulk\\n\\n", mail_from="news@x.org"))
        'Precedence: bulk'
        >>> refusal(MailRequest(b"Auto-Submitted: no\\n\\n", mail_from="ann@x.org")) is None
        True
    """
    sender = message.mail_from.strip()
    if sender in ("", "<>"):
        return "null sender"
    auto = message["Auto-Submitted"]
    if auto is not None:
        # auto-submitted = ("no" / "auto-generated" / "auto-replied" / ext) params
        keyword = _COMMENT.sub("", auto).split(";")[0].strip().lower()
        if keyword != "no":
            return f"Auto-Submitted: {keyword or auto.strip()}"
    for name in LIST_HEADERS:
        if message[name] is not None:
            return f"{name} present"
    precedence = _COMMENT.sub("", message["Precedence"] or "").strip().lower()
    if precedence in BULK_PRECEDENCE:
        return f"Precedence: {precedence}"
    local = sender.strip("<>").rpartition("@")[0].lower() or sender.lower()
    if (
        local in DAEMON_SENDERS
        or local.endswith(("-request", "-owner"))
        or local.startswith("owner-")
    ):
        return f"sender {sender} is a program"
    return None


def should_answer(message: MailRequest) -> bool:
    """Whether an automatic answer to ``message`` is allowed (:func:`refusal` is None).

    Example:
        >>> from maildefer import MailRequest
        >>> should_answer(MailRequest(b"\\n", mail_from="owner-blog@x.org"))
        False
        >>> should_answer(MailRequest(b"\\n", mail_from="ann@x.org"))
        True
    """
    return refusal(message) is None


def subject(original: str | None, fallback: str = "") -> str:
    """``Re: `` and the original subject without its own ``Re:`` prefixes ("Re:" once).

    Example:
        >>> subject("RE: re: Re[2]: Hello"), subject(None, fallback="your post")
        ('Re: Hello', 'Re: your post')
    """
    text = _RE_PREFIX.sub("", (original or "").strip()) or fallback
    return f"Re: {text}".rstrip()


def threading_headers(message: MailRequest) -> dict[str, str]:
    """``In-Reply-To`` and ``References`` for an answer (RFC 5322 §3.6.4).

    ``References`` is the message's own ``References`` (or, without them, its
    ``In-Reply-To``) followed by its ``Message-ID``. Empty when it has no Message-ID.

    Example:
        >>> from maildefer import MailRequest
        >>> m = MailRequest(b"Message-ID: <2@x>\\nReferences: <0@x> <1@x>\\n\\n")
        >>> threading_headers(m)
        {'In-Reply-To': '<2@x>', 'References': '<0@x> <1@x> <2@x>'}
    """
    message_id = (message["Message-ID"] or "").strip()
    if not message_id:
        return {}
    earlier = (message["References"] or message["In-Reply-To"] or "").split()
    return {"In-Reply-To": message_id, "References": " ".join([*earlier, message_id])}


def respond(
    message: MailRequest,
    variables: Mapping[str, Any],
    Body: str | None = None,
    Html: str | None = None,
    **headers: str | list[str],
) -> MailResponse | None:
    """An automatic answer to ``message`` from templates, or ``None`` if RFC 3834 forbids.

    :func:`maildefer.view.respond` with these defaults: ``To`` is the envelope sender
    (RFC 3834 §4: never ``Reply-To`` or ``From``), ``Subject`` is :func:`subject` of the
    original (a ``Subject`` given is used as it is), and the threading headers and
    ``Auto-Submitted: auto-replied`` are set. ``From`` and other headers are as for
    ``view.respond``. Templates render only when an answer is allowed.

    Example:
        In a handler, replies deferred to the outbox queue::

            reply = maildefer.reply.respond(message, locals(), "received.msg",
                                            Html="received.html", From=f"noreply@{host}")
            if reply is not None:
                await Queue("run/outbox").push(reply)

        >>> import tempfile, pathlib
        >>> from maildefer import MailRequest
        >>> from maildefer.view import View
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "thanks.msg").write_text("Thanks, {{ name }}.\\n")
        >>> post = MailRequest(b"Subject: Hello\\r\\nMessage-ID: <p1@x.org>\\r\\n\\r\\n",
        ...                    mail_from="ann@x.org")
        >>> with View(d).active():
        ...     answer = respond(post, {"name": "Ann"}, "thanks.msg", From="blog@y.org")
        ...     bounce = respond(MailRequest(b"\\n"), {}, "thanks.msg", From="blog@y.org")
        >>> answer.to, answer.subject, answer["Auto-Submitted"], answer.body, bounce
        (['ann@x.org'], 'Re: Hello', 'auto-replied', 'Thanks, Ann.\\n', None)
    """
    if not should_answer(message):
        return None
    headers.setdefault("To", message.mail_from.strip("<>"))
    headers.setdefault("Subject", subject(message["Subject"]))
    answer = current_view().respond(variables, Body, Html, **headers)
    for name, value in threading_headers(message).items():
        if name not in answer:
            answer[name] = value
    answer["Auto-Submitted"] = "auto-replied"
    return answer
