"""``maildefer send --to ADDR [--from] [--subject] [--body] [--host] [--port]``: one test mail.

Builds a plain text message and sends it over SMTP, by default to this project's own
``serve`` (``[server] host``/``port``), to try routes by hand (Lamson's ``lamson send``).
Prints the server's reply; exit 0 when it accepted the message, 1 with the reply on
stderr when it refused it or could not be reached.

Example:
    >>> p = argparse.ArgumentParser(); add_arguments(p)
    >>> p.parse_args(["--to", "a@example.com"]).subject
    'Test message'
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiosmtplib

from maildefer.mail import MailResponse
from maildefer.relay import Relay, RelayError
from maildefer.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``maildefer send``.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["--to", "a@x", "--port", "2525"]).port
        2525
    """
    parser.add_argument("--to", required=True, action="append", help="recipient (repeatable)")
    parser.add_argument("--from", dest="sender", default="test@localhost", help="sender")
    parser.add_argument("--subject", default="Test message")
    parser.add_argument("--body", default="This is a test message from maildefer send.\n")
    parser.add_argument("--host", default=None, help="server address ([server] host)")
    parser.add_argument("--port", type=int, default=None, help="server port ([server] port)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per SMTP step")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Send the message; 0 if accepted.

    Example:
        >>> ns = argparse.Namespace(to=["a@x"], sender="b@x", subject="s", body="b",
        ...                         host="127.0.0.1", port=1, timeout=2.0)
        >>> run(ns, Settings())  # nothing listens on port 1
        1
    """
    message = MailResponse(To=args.to, From=args.sender, Subject=args.subject, Body=args.body)
    relay = Relay(
        args.host or settings.server.host,
        args.port if args.port is not None else settings.server.port,
        args.timeout,
    )
    try:
        reply = asyncio.run(relay.deliver(message, mail_from=args.sender, rcpt_tos=args.to))
    except RelayError as exc:
        refused = exc.__cause__
        if isinstance(refused, aiosmtplib.SMTPRecipientsRefused):
            for r in refused.recipients:
                print(f"{r.recipient}: {r.code} {r.message}", file=sys.stderr)
        else:
            print(exc.reply if exc.code is not None else f"maildefer send: {exc}", file=sys.stderr)
        return 1
    print(reply)
    return 0
