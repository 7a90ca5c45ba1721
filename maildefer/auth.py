"""Sender authentication as handlers see it: ``message.auth`` and ``@authenticated``.

With ``[auth] verify = true``, ``serve`` checks SPF, DKIM and DMARC (and ARC) on every
message it receives (:mod:`maildefer.smtp.authcheck`, the only part that speaks DNS) and
hands the verdicts to the handlers as ``message.auth``, an :class:`AuthResults`. The same
verdicts are written at the top of the stored message as an ``Authentication-Results``
header (RFC 8601) whose authserv-id is ``[server] hostname``; any such header that arrived
with the message claiming *our* authserv-id is a forgery and is removed (RFC 8601
section 5), by :func:`stamp`, a pure function on the header bytes.

A handler that must only see authentic mail says so with :func:`authenticated`:

* the check runs right before the handler is called, as if the handler began by raising
  :class:`~maildefer.errors.SMTPError` itself: a result that is not ``pass`` refuses the
  message with ``550`` (RFC 7489 section 7.3's ``5.7.1`` for DMARC, RFC 7372's ``5.7.20``
  and ``5.7.23`` for DKIM and SPF), and a ``temperror`` (DNS could not answer in time) with
  ``451 4.7.0``, so the sending MTA retries later. No state changes for a refused message;
  in a worker the same errors bury it (5xx) or retry it (4xx).
* It applies where a verification ran: ``message.auth is None`` (``verify = false``; in a
  worker, whose messages carry the header but not the object; an in-process test) lets
  the handler run. Put the requirement on the handlers ``serve`` runs.
  ``serve`` logs ``auth_not_verified`` at start when a loaded handler requires
  authentication and ``verify`` is off, so the gap is never silent.

Example:
    >>> results = AuthResults(spf="pass", dkim="fail", dmarc="pass",
    ...                       header="mx.example.com; spf=pass; dkim=fail; dmarc=pass")
    >>> results.passed("spf", "dmarc"), results.passed("dkim")
    (True, False)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeVar

from maildefer.errors import SMTPError

__all__ = [
    "RESULTS",
    "AuthResults",
    "Requirement",
    "authenticated",
    "authserv_id_of",
    "check_requirement",
    "remove_forged",
    "requirement_of",
    "stamp",
]

Result = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
RESULTS: Final = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
"""Every verdict ``message.auth.spf``, ``.dkim`` and ``.dmarc`` can hold (RFC 8601 2.7)."""

Method = Literal["spf", "dkim", "dmarc"]
METHODS: Final = ("spf", "dkim", "dmarc")

HEADER_NAME: Final = "Authentication-Results"
REQUIREMENT_ATTR: Final = "_maildefer_auth_required"
"""The attribute ``@authenticated`` sets on a handler: its :class:`Requirement`."""

# The refusal per method: RFC 7489 7.3 (DMARC: 5.7.1), RFC 7372 (5.7.20 no passing DKIM
# signature, 5.7.23 SPF validation failed).
_REFUSALS: Final = {
    "dmarc": "5.7.1 Sender domain not authenticated (DMARC {result})",
    "dkim": "5.7.20 No passing DKIM signature found (DKIM {result})",
    "spf": "5.7.23 SPF validation failed (SPF {result})",
}
_TEMPFAIL: Final = "4.7.0 Sender not authenticated yet ({method} {result}), try again later"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class AuthResults:
    """The verdicts on one received message, as ``message.auth`` (contract section 3).

    Attributes:
        spf: SPF of the client address for the MAIL FROM domain (the HELO name for the
            null sender).
        dkim: ``pass`` when a DKIM signature verified, ``none`` when unsigned.
        dmarc: DMARC of the ``From:`` domain, with SPF/DKIM alignment per its record.
        header: the ``Authentication-Results`` value (RFC 8601, unfolded), the one at the
            top of the stored message.
        arc: the ARC chain's validation (``none`` when the message carries no ARC set).
        from_domain: the ``From:`` domain DMARC judged (``""`` when there is none).
        dkim_domains: the ``d=`` of each DKIM signature that verified.

    Example:
        >>> AuthResults(spf="none", dkim="none", dmarc="none", header="h; none").arc
        'none'
    """

    spf: str
    dkim: str
    dmarc: str
    header: str
    arc: str = "none"
    from_domain: str = ""
    dkim_domains: tuple[str, ...] = ()

    def passed(self, *methods: str) -> bool:
        """Whether every named method (``"spf"``, ``"dkim"``, ``"dmarc"``) passed.

        Example:
            >>> AuthResults(spf="pass", dkim="none", dmarc="pass", header="").passed("spf")
            True
        """
        return all(getattr(self, method) == "pass" for method in methods)


class Authenticatable(Protocol):
    """What the requirement reads from a message (a ``MailRequest`` is one)."""

    @property
    def auth(self) -> AuthResults | None:
        """The verdicts, or ``None`` where no verification ran."""
        ...


@dataclass(frozen=True)
class Requirement:
    """What :func:`authenticated` asks of a message: these methods must pass.

    Example:
        >>> Requirement(("dmarc",)).refusal(
        ...     AuthResults(spf="pass", dkim="fail", dmarc="fail", header=""))
        SMTPError('550 5.7.1 Sender domain not authenticated (DMARC fail)')
    """

    methods: tuple[str, ...]

    def refusal(self, results: AuthResults | None) -> SMTPError | None:
        """The error that refuses a message with these results, or ``None`` to accept.

        A ``temperror`` in any required method is transient (``451``) and wins over a
        permanent failure in another: the sender retries, and the next try may pass.

        Example:
            >>> r = Requirement(("spf", "dkim"))
            >>> r.refusal(AuthResults(spf="temperror", dkim="fail", dmarc="none", header=""))
            SMTPError('451 4.7.0 Sender not authenticated yet (spf temperror), try again later')
            >>> r.refusal(None) is None  # nothing verified here: the handler runs
            True
        """
        if results is None:
            return None
        failed = [(m, getattr(results, m)) for m in self.methods if getattr(results, m) != "pass"]
        for method, result in failed:
            if result == "temperror":
                return SMTPError(451, _TEMPFAIL.format(method=method, result=result))
        if failed:
            method, result = failed[0]
            return SMTPError(550, _REFUSALS[method].format(result=result))
        return None


def authenticated(*methods: Method) -> Callable[[F], F]:
    """Call the decorated handler only for mail whose ``methods`` passed (default DMARC).

    Stack it with ``@route`` (in any order). What a refused message gets, and why mail
    that was not verified is let through, is in the module's docstring.

    Args:
        *methods: ``"spf"``, ``"dkim"``, ``"dmarc"``; every one named must be ``pass``.

    Raises:
        ValueError: an unknown method.

    Example:
        >>> import asyncio, sys, types
        >>> from maildefer.mail import MailRequest
        >>> from maildefer.routing import Router
        >>> app = sys.modules["doc_authenticated"] = types.ModuleType("doc_authenticated")
        >>> exec('''
        ... from maildefer import authenticated, route, stateless
        ... @route("post@(host)")
        ... @authenticated("dmarc")
        ... @stateless
        ... async def POST(message, host):
        ...     print("published, from", message.auth.from_domain)
        ... ''', app.__dict__)
        >>> router = Router.from_modules(["doc_authenticated"])
        >>> def mail(dmarc):
        ...     auth = AuthResults(spf="pass", dkim="pass", dmarc=dmarc, header="",
        ...                        from_domain="writers.example")
        ...     return MailRequest(b"\\n", rcpt_tos=["post@blog.example"], auth=auth)
        >>> asyncio.run(router.deliver(mail("pass")))
        published, from writers.example
        1
        >>> asyncio.run(router.deliver(mail("fail")))
        Traceback (most recent call last):
        ...
        maildefer.errors.SMTPError: 550 5.7.1 Sender domain not authenticated (DMARC fail)
    """
    wanted = tuple(methods) or ("dmarc",)
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise ValueError(f"authenticated({unknown[0]!r}): not one of {', '.join(METHODS)}")
    requirement = Requirement(wanted)

    def decorate(fn: F) -> F:
        setattr(fn, REQUIREMENT_ATTR, requirement)
        return fn

    return decorate


def requirement_of(fn: object) -> Requirement | None:
    """The requirement ``@authenticated`` put on a handler, or ``None``.

    Example:
        >>> @authenticated("spf", "dkim")
        ... async def START(message): ...
        >>> requirement_of(START), requirement_of(print)
        (Requirement(methods=('spf', 'dkim')), None)
    """
    found = getattr(fn, REQUIREMENT_ATTR, None)
    return found if isinstance(found, Requirement) else None


def check_requirement(fn: object, message: Authenticatable) -> None:
    """Raise the refusal for ``message`` if handler ``fn`` requires what it lacks.

    The router calls it before each handler.

    Raises:
        SMTPError: ``550`` (the required result is not ``pass``) or ``451`` (temperror).

    Example:
        >>> import types
        >>> @authenticated("spf")
        ... def START(message): ...
        >>> bad = AuthResults(spf="softfail", dkim="none", dmarc="none", header="")
        >>> check_requirement(START, types.SimpleNamespace(auth=bad))
        Traceback (most recent call last):
        ...
        maildefer.errors.SMTPError: 550 5.7.23 SPF validation failed (SPF softfail)
    """
    requirement = requirement_of(fn)
    if requirement is None:
        return
    error = requirement.refusal(message.auth)
    if error is not None:
        raise error


# -- the header, on the raw header bytes ------------------------------------------------------

_FIELD_NAME = re.compile(rb"^([^:\s]+)[ \t]*:")


def _skip_cfws(text: str, i: int) -> int:
    """The index past whitespace and (nested) comments from ``i`` (RFC 5322 CFWS)."""
    depth = 0
    while i < len(text):
        c = text[i]
        if depth and c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif not depth and c not in " \t\r\n":
            break
        i += 1
    return i


def authserv_id_of(value: bytes | str) -> str | None:
    """The authserv-id an ``Authentication-Results`` value claims (lowercased), if any.

    Args:
        value: what follows the colon, folded or not (bytes are read as Latin-1).

    Example:
        >>> authserv_id_of(b" (forged) MX.Example.COM 1; spf=pass")
        'mx.example.com'
        >>> authserv_id_of(' "mx.example.com"; none'), authserv_id_of(b"  ;")
        ('mx.example.com', None)
    """
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    i = _skip_cfws(text, 0)
    if i < len(text) and text[i] == '"':
        end = text.find('"', i + 1)
        found = text[i + 1 : end if end != -1 else len(text)]
    else:
        match = re.match(r"[^\s;()]+", text[i:])
        found = match.group(0) if match else ""
    return found.lower() or None


def _fields(head: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its continuation lines) and the rest from the blank line."""
    fields: list[bytes] = []
    pos = 0
    while pos < len(head):
        end = head.find(b"\n", pos)
        end = len(head) if end == -1 else end + 1
        line = head[pos:end]
        if line in (b"\r\n", b"\n"):
            break  # the blank line: it and whatever follows stay as they are
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
        pos = end
    return fields, head[pos:]


def remove_forged(head: bytes, authserv_id: str) -> bytes:
    """``head`` without the ``Authentication-Results`` fields that claim ``authserv_id``.

    Those with another authserv-id (an upstream server's) are kept, as RFC 8601 section 5
    says; the comparison ignores case. Anything that is not a well-formed field is kept.

    Example:
        >>> head = (b"Authentication-Results: mx.example.com; dmarc=pass\\r\\n"
        ...         b"Authentication-Results: upstream.example.org;\\r\\n spf=fail\\r\\n"
        ...         b"Subject: hi\\r\\n\\r\\n")
        >>> print(remove_forged(head, "MX.example.com").decode().replace("\\r", ""))
        Authentication-Results: upstream.example.org;
         spf=fail
        Subject: hi
        <BLANKLINE>
        <BLANKLINE>
    """
    fields, rest = _fields(head)
    ours = authserv_id.lower()
    kept = []
    for field in fields:
        match = _FIELD_NAME.match(field)
        if (
            match is not None
            and match.group(1).lower() == b"authentication-results"
            and authserv_id_of(field[match.end() :]) == ours
        ):
            continue
        kept.append(field)
    return b"".join(kept) + rest


def _fold(value: str, eol: str) -> str:
    """The value with each result on a line of its own (RFC 8601 allows folding at ``;``)."""
    parts = [p.strip() for p in value.split(";")]
    return f";{eol}\t".join(parts)


def stamp(head: bytes, value: str, authserv_id: str) -> bytes:
    """The header section with our ``Authentication-Results`` on top and forgeries removed.

    Args:
        head: the message's header section (through the blank line, if it has one).
        value: the header's value (:attr:`AuthResults.header`), which must start with
            ``authserv_id``.
        authserv_id: ours, ``[server] hostname``.

    Returns:
        The new header section. Its line ending is the message's own (CRLF unless the
        first line ends in a bare LF).

    Example:
        >>> head = b"Authentication-Results: mx.test; dkim=pass\\r\\nFrom: a@b.test\\r\\n\\r\\n"
        >>> print(stamp(head, "mx.test; spf=fail smtp.mailfrom=b.test; dkim=none", "mx.test")
        ...       .decode().replace("\\t", "    ").replace("\\r", ""))
        Authentication-Results: mx.test;
            spf=fail smtp.mailfrom=b.test;
            dkim=none
        From: a@b.test
        <BLANKLINE>
        <BLANKLINE>
    """
    first = head.find(b"\n")
    eol = "\n" if first == 0 or (first > 0 and head[first - 1 : first] != b"\r") else "\r\n"
    line = f"{HEADER_NAME}: {_fold(value, eol)}{eol}".encode("ascii", "replace")
    # A first line that starts with whitespace would fold into our header and have the
    # sender write in it: such lines (a malformed start, no field of their own) are dropped.
    while head[:1] in (b" ", b"\t"):
        end = head.find(b"\n")
        head = b"" if end == -1 else head[end + 1 :]
    return line + remove_forged(head, authserv_id)
