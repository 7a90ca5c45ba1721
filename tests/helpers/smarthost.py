"""A real smarthost for the relay tests: aiosmtpd on port 0, STARTTLS or implicit TLS, AUTH.

The certificate is self-signed, made by the ``openssl`` CLI for ``localhost`` and
``127.0.0.1``; it is the CA bundle a trusting relay is given (``ca_file``).
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

USER, PASSWORD = "mailer", "Tr0ub4dor&3-never-logged"


@dataclass(frozen=True)
class Cert:
    """A self-signed certificate and its key (the certificate is its own CA bundle)."""

    cert: Path
    key: Path


def make_cert(directory: Path) -> Cert:
    """``openssl req -x509`` for CN=localhost, SAN localhost and 127.0.0.1, one day."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make the smarthost's test certificate")
    cert, key = directory / "c.pem", directory / "k.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-days", "1", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return Cert(cert, key)


@dataclass
class Received:
    """One message as the smarthost's handler got it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    login: bytes | None


@dataclass
class Smarthost:
    """What a running smarthost saw; ``replies`` makes it refuse (``{"RCPT": "550 ..."}``)."""

    port: int = 0
    connections: int = 0
    mails: int = 0
    auth_attempts: list[tuple[str, bytes, bool]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    replies: dict[str, str] = field(default_factory=dict)
    protocols: list[SMTP] = field(default_factory=list)

    # -- aiosmtpd handler hooks --------------------------------------------------------------

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.mails += 1
        if "MAIL" in self.replies:
            return self.replies["MAIL"]
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.replies.get(f"RCPT {address}", self.replies.get("RCPT"))
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if "DATA" in self.replies:
            return self.replies["DATA"]
        self.received.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                session.ssl is not None,
                getattr(session.auth_data, "login", None),
            )
        )
        return "250 2.0.0 queued as 1"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        self.auth_attempts.append((mechanism, auth_data.login, session.ssl is not None))
        ok = (auth_data.login, auth_data.password) == (USER.encode(), PASSWORD.encode())
        return AuthResult(success=ok, handled=False, auth_data=auth_data)


def server_context(cert: Cert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert.cert, cert.key)
    return context


async def start_smarthost(
    host: Smarthost,
    *,
    cert: Cert | None,
    mode: str = "starttls",
    exclude: tuple[str, ...] = (),
    port: int = 0,
    bind: str = "127.0.0.1",
) -> asyncio.Server:
    """Serve ``host`` on ``bind`` (127.0.0.1): ``mode`` is ``starttls``, ``tls`` (465) or ``plain``.

    ``starttls`` offers STARTTLS (with ``cert``) and AUTH only after it; ``tls`` speaks TLS
    from the first byte; ``plain`` offers neither STARTTLS nor AUTH.
    """
    loop = asyncio.get_running_loop()
    tls = server_context(cert) if cert is not None and mode != "plain" else None

    def protocol() -> SMTP:
        host.connections += 1
        smtp = SMTP(
            host,
            hostname="smarthost.test",
            tls_context=tls if mode == "starttls" else None,
            authenticator=host.authenticate if mode != "plain" else None,
            # Implicit TLS: aiosmtpd knows only its own STARTTLS as "TLS", so it is told
            # not to insist (the transport is TLS from the first byte all the same).
            auth_require_tls=mode == "starttls",
            auth_exclude_mechanism=exclude,
        )
        host.protocols.append(smtp)
        return smtp

    server = await loop.create_server(protocol, bind, port, ssl=tls if mode == "tls" else None)
    host.port = server.sockets[0].getsockname()[1]
    return server
