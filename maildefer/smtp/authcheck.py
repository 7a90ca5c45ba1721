"""Sender authentication at receipt: SPF, DKIM, DMARC (and ARC) for ``[auth] verify``.

:class:`AuthChecker` is built by the ``Server`` from ``[auth]`` and called once per
message by :class:`~maildefer.smtp.policy.DeliveryPolicy` before the handlers run. It
sets ``message.auth`` (:class:`~maildefer.auth.AuthResults`) and puts the
``Authentication-Results`` header on top of the message (:func:`maildefer.auth.stamp`,
which also removes forged ones claiming our authserv-id).

The libraries, and what each is used for:

- SPF: ``pyspf`` (RFC 7208: macros, include/redirect, the 10-lookup and 2-void limits),
  whose DNS goes through our :class:`~maildefer.smtp.authdns.DnsClient` by overriding
  its one DNS method (``query.dns``; checked against pyspf 2.0.14, hence the pin).
- DKIM and ARC: ``dkimpy`` (every ``DKIM-Signature`` up to :data:`MAX_SIGNATURES`; the
  ARC chain when the message has an ``ARC-Seal``), given our DNS function.
- DMARC: evaluated here (RFC 7489 6.6: the From domain's record, else its organizational
  domain's; relaxed or strict alignment per ``adkim``/``aspf``) with ``authheaders``'
  record parser and public suffix list, loaded once. ``authheaders.authenticate_message``
  itself is not used: it re-reads that list on every call (measured: 60 ms per look-up,
  several per message), calls an unsigned message ``dkim=fail`` and a DNS timeout
  ``fail`` instead of ``temperror``, and writes untrusted values into the header unquoted.

The checks are synchronous: they run in a thread pool owned by the checker (ONE hop per
message, never the loop's default executor, which other work shares), all the DNS of one
message within ``[auth] timeout`` counted from when it was submitted, so a dead resolver
makes ``temperror`` in bounded time and never stalls another session.

Example:
    >>> import asyncio, io
    >>> from maildefer import logs; logs.configure(stream=io.StringIO())
    >>> from maildefer.mail import MailRequest
    >>> from maildefer.settings import Settings
    >>> settings = Settings(server={"hostname": "mx.test"},
    ...                     auth={"verify": True, "nameservers": ["127.0.0.1:9"], "timeout": 0.3})
    >>> checker = AuthChecker.from_settings(settings)
    >>> message = MailRequest(b"From: a@b.test\\r\\n\\r\\nhi\\r\\n", mail_from="a@b.test")
    >>> asyncio.run(checker.apply(message, ip="192.0.2.1", helo="client.test"))
    >>> message.auth.spf, message.auth.dkim, message.auth.dmarc  # port 9 never answers
    ('temperror', 'none', 'temperror')
    >>> message.raw.split(b"\\r\\n")[0]
    b'Authentication-Results: mx.test;'
    >>> checker.close()
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import email.utils
import importlib.resources
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import dkim
import dns.resolver
import spf
import structlog
from authheaders.dmarc_lookup import DMARCException, answer_to_dict
from publicsuffix2 import PublicSuffixList

from maildefer.auth import AuthResults, stamp
from maildefer.errors import ConfigError
from maildefer.mail import MailRequest
from maildefer.settings import Settings, nameserver_address
from maildefer.smtp.authdns import DnsClient, DnsFailure

log = structlog.get_logger("maildefer.smtp")

MAX_SIGNATURES: Final = 5
"""DKIM signatures tried per message at most (each costs a DNS lookup and a hash)."""
THREADS: Final = 16
"""Checks running at once; more wait their turn (their deadline runs while they wait)."""
LARGE: Final = 1_048_576
"""Bytes past which a message is DKIM/ARC-verified one at a time: dkimpy holds about 3.6
times the message while it verifies (measured: 36 MiB for a 10 MiB message), so large ones
never add up in memory."""
_SPF_RESULTS: Final = frozenset(
    {"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"}
)
# A property value written into the header: a token or local-part@domain (RFC 8601
# pvalue). Anything else from the sender is left out rather than quoted.
_SAFE_VALUE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]{1,255}")


def _silent_logger() -> logging.Logger:
    """A logger for dkimpy that says nothing: a bad signature is a verdict, not an error."""
    return logging.Logger("maildefer.smtp.authcheck.dkimpy", logging.CRITICAL + 1)


@dataclass(frozen=True)
class _Spf:
    result: str
    prop: str  # "smtp.mailfrom=..." or "smtp.helo=..." or ""
    domain: str  # the identity's domain, for DMARC alignment


@dataclass(frozen=True)
class _Dkim:
    result: str
    passed: tuple[str, ...]  # d= of each signature that verified
    props: str


def _prop(name: str, value: str) -> str:
    return f" {name}={value}" if _SAFE_VALUE.fullmatch(value) else ""


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().rstrip(".").lower()


class _SpfQuery(spf.query):  # type: ignore[misc]  # pyspf is untyped
    """pyspf's query with its DNS through our client and our deadline."""

    def __init__(self, client: DnsClient, deadline: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._client = client
        self._deadline = deadline

    def dns(
        self, name: str, qtype: str, cnames: object = None, ignore_void: bool = False
    ) -> list[object]:
        # The contract of pyspf's own method: a list of values per type (TXT: a list of
        # strings to join), [] for no data, TempError on a DNS failure, and the void
        # lookup limit of RFC 7208 4.6.4 (dnspython has followed any CNAME already).
        if qtype == "SPF":
            return []  # type 99 is obsolete (RFC 7208 3.1); only the harsh mode asks
        try:
            found = self._client.lookup(str(name), qtype, deadline=self._deadline)
        except DnsFailure as exc:
            raise spf.TempError(f"DNS {exc}") from None
        result: list[object] = [(r,) if qtype == "TXT" else r for r in found]
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


class AuthChecker:
    """SPF, DKIM, DMARC and ARC for each message; owns its threads, DNS client and cache.

    Args:
        authserv_id: ours, ``[server] hostname``.
        client: the DNS client (nameservers, cache).
        timeout: seconds for all the DNS of one message (``[auth] timeout``).
        max_verify_size: larger messages are not DKIM/ARC-verified (``permerror``).

    Example:
        >>> checker = AuthChecker("mx.test", DnsClient([("127.0.0.1", 9)]), timeout=0.1)
        >>> checker.org_domain("mail.example.co.uk"), checker.org_domain("a.b.example.test")
        ('example.co.uk', 'example.test')
        >>> checker.close()
    """

    def __init__(
        self,
        authserv_id: str,
        client: DnsClient,
        *,
        timeout: float = 5.0,
        max_verify_size: int = 10_485_760,
    ) -> None:
        self.authserv_id = authserv_id
        self.client = client
        self.timeout = timeout
        self.max_verify_size = max_verify_size
        self._executor = ThreadPoolExecutor(THREADS, thread_name_prefix="maildefer-auth")
        ref = importlib.resources.files("authheaders") / "public_suffix_list.txt"
        with ref.open("r", encoding="utf-8") as suffixes:
            self._psl = PublicSuffixList(suffixes)
        self._logger = _silent_logger()
        self._large = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthChecker:
        """The checker ``[auth]`` describes (whether or not ``verify`` is on).

        Example:
            >>> s = Settings(server={"hostname": "mx.test"}, auth={"nameservers": ["::1"]})
            >>> c = AuthChecker.from_settings(s); c.client.nameservers; c.close()
            ['::1:53']
        """
        auth = settings.auth
        try:
            client = DnsClient(
                [nameserver_address(n) for n in auth.nameservers], timeout=auth.timeout
            )
        except dns.resolver.NoResolverConfiguration as exc:
            raise ConfigError(
                f"auth.nameservers = []: the system has no resolver configured ({exc})"
            ) from None
        return cls(
            settings.server.hostname,
            client,
            timeout=auth.timeout,
            max_verify_size=auth.max_verify_size,
        )

    def close(self) -> None:
        """Stop the threads (a check still running finishes within its deadline)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def org_domain(self, domain: str) -> str:
        """The organizational domain (RFC 7489 3.2), from the public suffix list.

        A name under a suffix the list does not know takes the implicit ``*`` rule:
        its last two labels (publicsuffix2 would answer with the bare TLD).
        """
        domain = domain.lower().rstrip(".")
        found = str(self._psl.get_public_suffix(domain) or domain)
        labels = domain.split(".")
        if "." not in found and len(labels) >= 2:
            return ".".join(labels[-2:])
        return found

    async def apply(self, message: MailRequest, *, ip: str | None, helo: str | None) -> None:
        """Check ``message``; set ``message.auth`` and stamp the header on it.

        Never raises for what the message or DNS holds: every failure is a verdict.
        """
        deadline = time.monotonic() + self.timeout
        loop = asyncio.get_running_loop()
        job = partial(self.check, message, ip=ip, helo=helo, deadline=deadline)
        results = await loop.run_in_executor(self._executor, job)
        message.auth = results
        message.replace_head(stamp(message.head, results.header, self.authserv_id))
        log.debug("auth", spf=results.spf, dkim=results.dkim, dmarc=results.dmarc)

    def check(
        self, message: MailRequest, *, ip: str | None, helo: str | None, deadline: float
    ) -> AuthResults:
        """The verdicts on ``message`` (synchronous: :meth:`apply` runs it in a thread).

        Example:
            >>> from maildefer.mail import MailRequest
            >>> checker = AuthChecker("mx.test", DnsClient([("127.0.0.1", 9)]))
            >>> r = checker.check(MailRequest(b"\\r\\n", mail_from=""), ip=None, helo=None,
            ...                   deadline=0)  # no time left: nothing is looked up
            >>> r.header
            'mx.test; spf=none; dkim=none; dmarc=permerror'
            >>> checker.close()
        """
        head = message.head
        spf_result = self._guarded(
            "spf", lambda: self._spf(ip, message.mail_from, helo or "", deadline)
        )
        dkim_result, arc = self._signatures(message, head, deadline)
        from_domain, dmarc, dmarc_props = self._guarded(
            "dmarc", lambda: self._dmarc(head, spf_result, dkim_result, deadline)
        )
        parts = [
            self.authserv_id,
            f"spf={spf_result.result}{spf_result.prop}",
            f"dkim={dkim_result.result}{dkim_result.props}",
            f"dmarc={dmarc}{dmarc_props}",
        ]
        if arc != "absent":
            parts.append(f"arc={arc}")
        return AuthResults(
            spf=spf_result.result,
            dkim=dkim_result.result,
            dmarc=dmarc,
            header="; ".join(parts),
            arc="none" if arc == "absent" else arc,
            from_domain=from_domain,
            dkim_domains=dkim_result.passed,
        )

    def _guarded(self, method: str, run: Callable[[], Any]) -> Any:
        """Run one check; a library that raises on odd input gives a verdict, not a crash."""
        try:
            return run()
        except Exception as exc:
            log.warning("auth_check_failed", method=method, error=f"{type(exc).__name__}: {exc}")
            if method == "spf":
                return _Spf("permerror", "", "")
            if method == "dkim":
                return _Dkim("permerror", (), "")
            if method == "arc":
                return "fail"
            return "", "permerror", ""

    # -- SPF -----------------------------------------------------------------------------------

    def _spf(self, ip: str | None, mail_from: str, helo: str, deadline: float) -> _Spf:
        # RFC 7208 2.4: the MAIL FROM identity, or the HELO one for the null sender.
        identity = mail_from if mail_from else f"postmaster@{helo}" if helo else ""
        domain = _domain_of(identity) if identity else ""
        prop = _prop("smtp.mailfrom", mail_from) if mail_from else _prop("smtp.helo", helo)
        if not ip or not domain:
            return _Spf("none", prop, domain)
        query = _SpfQuery(self.client, deadline, i=ip, s=mail_from, h=helo, querytime=0)
        result = str(query.check()[0]).lower()
        return _Spf(result if result in _SPF_RESULTS else "permerror", prop, domain)

    # -- DKIM and ARC ----------------------------------------------------------------------------

    def _dnsfunc(self, deadline: float, failures: list[str]) -> Callable[..., bytes | None]:
        """The DNS function for dkimpy: the TXT record of a key name, through our client."""

        def get_txt(name: bytes, timeout: float = 5.0) -> bytes | None:
            try:
                records = self.client.txt(name.decode("ascii"), deadline=deadline)
            except UnicodeDecodeError:
                return None
            except DnsFailure as exc:
                failures.append(str(exc))
                # dkimpy turns this into a failed verification; `failures` says why.
                raise dkim.DnsTimeoutError(str(exc)) from None
            return records[0] if records else None

        return get_txt

    def _signatures(self, message: MailRequest, head: bytes, deadline: float) -> tuple[_Dkim, str]:
        """DKIM and ARC, which need the whole message: a large one waits for its turn."""
        signed = re.search(rb"(?im)^(dkim-signature|arc-seal)[ \t]*:", head) is not None
        if not signed:
            return _Dkim("none", (), ""), "absent"
        raw = message.raw  # a spooled message is read here, in this thread
        large = len(raw) > LARGE
        if large and not self._large.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return _Dkim("temperror", (), " (busy verifying larger mail)"), "absent"
        try:
            dkim_result = self._guarded("dkim", lambda: self._dkim(raw, head, deadline))
            arc = self._guarded("arc", lambda: self._arc(raw, head, deadline))
        finally:
            if large:
                self._large.release()
        return dkim_result, arc

    def _dkim(self, raw: bytes, head: bytes, deadline: float) -> _Dkim:
        count = len(re.findall(rb"(?im)^dkim-signature[ \t]*:", head))
        if count == 0:
            return _Dkim("none", (), "")
        if len(raw) > self.max_verify_size:
            return _Dkim("permerror", (), " (message too large to verify)")
        verifier = dkim.DKIM(raw, logger=self._logger, timeout=self.timeout)
        passed: list[str] = []
        first_props = ""
        worst = "fail"
        for idx in range(min(count, MAX_SIGNATURES)):
            failures: list[str] = []
            try:
                ok = verifier.verify(idx=idx, dnsfunc=self._dnsfunc(deadline, failures))
            except dkim.DKIMException:
                # A body hash mismatch, a malformed signature or key: RFC 6376's PERMFAIL.
                ok = False
            fields = getattr(verifier, "signature_fields", {}) or {}
            d = bytes(fields.get(b"d", b"")).decode("ascii", "replace").lower()
            s = bytes(fields.get(b"s", b"")).decode("ascii", "replace")
            props = _prop("header.d", d) + _prop("header.s", s)
            if ok:
                passed.append(d)
                if len(passed) == 1:
                    first_props = props
            elif failures:
                worst = "temperror"
            if idx == 0 and not first_props:
                first_props = props
        result = "pass" if passed else worst
        return _Dkim(result, tuple(passed), first_props)

    def _arc(self, raw: bytes, head: bytes, deadline: float) -> str:
        if not re.search(rb"(?im)^arc-seal[ \t]*:", head):
            return "absent"
        if len(raw) > self.max_verify_size:
            return "permerror"
        failures: list[str] = []
        verifier = dkim.ARC(raw, logger=self._logger, timeout=self.timeout)
        cv, _, _ = verifier.verify(dnsfunc=self._dnsfunc(deadline, failures))
        if failures:
            return "temperror"
        return {b"pass": "pass", b"none": "none"}.get(cv, "fail")

    # -- DMARC -------------------------------------------------------------------------------------

    def _dmarc(
        self, head: bytes, spf_result: _Spf, dkim_result: _Dkim, deadline: float
    ) -> tuple[str, str, str]:
        """(From domain, result, header properties); RFC 7489 section 6.6."""
        # As text, so an internationalized (UTF-8) From stays readable; invalid bytes are
        # kept as surrogates, which no domain can hold.
        text = head.decode("utf-8", "surrogateescape")
        parsed = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(text)
        values = [str(v) for v in parsed.get_all("From") or []]
        addresses = [a for _, a in email.utils.getaddresses(values) if a]
        # 6.6.1: exactly one author domain; none, several or an unreadable one is an error.
        domains = {_domain_of(a) for a in addresses if "@" in a}
        if len(values) != 1 or len(addresses) != 1 or len(domains) != 1:
            return "", "permerror", ""
        domain = domains.pop()
        if not domain.isascii():
            try:  # an internationalized From (SMTPUTF8): its A-labels are what DNS holds
                domain = domain.encode("idna").decode("ascii")
            except UnicodeError:
                return "", "permerror", ""
        if not re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)+", domain):
            return "", "permerror", ""
        props = _prop("header.from", domain)
        try:
            record = self._dmarc_record(domain, deadline)
        except DnsFailure:
            return domain, "temperror", props
        if record is None:
            return domain, "none", props

        def aligned(other: str, mode: str) -> bool:
            if not other:
                return False
            if mode == "s":
                return other == domain
            return self.org_domain(other) == self.org_domain(domain)

        spf_ok = spf_result.result == "pass" and aligned(spf_result.domain, record.get("aspf", "r"))
        dkim_ok = any(aligned(d, record.get("adkim", "r")) for d in dkim_result.passed)
        return domain, "pass" if spf_ok or dkim_ok else "fail", props

    def _dmarc_record(self, domain: str, deadline: float) -> dict[str, str] | None:
        """The policy record for ``domain``: its own, else its organizational domain's."""
        org = self.org_domain(domain)
        for name in dict.fromkeys((domain, org)):
            found = [
                r
                for r in self.client.txt(f"_dmarc.{name}", deadline=deadline)
                if r.startswith(b"v=DMARC1")
            ]
            if len(found) > 1:
                return None  # 6.6.3: several records are as none
            if found:
                try:
                    tags: dict[str, str] = answer_to_dict(found[0].decode("ascii", "replace"))
                except DMARCException:
                    return None  # a record that does not parse is ignored (6.6.3)
                return tags if "p" in tags else None
        return None
