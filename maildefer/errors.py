"""The exception tree of maildefer.

Every error maildefer raises on purpose derives from :class:`MaildeferError`, so an
application can catch the lot in one place::

    MaildeferError
    ├── ConfigError            bad settings or bad usage: the CLI exits 2
    ├── QueueError             a queue operation failed (disk, broker): SMTP answers 451
    │   └── CorruptMessageError  a queued file fails its envelope check (length, sha256)
    ├── RoutingError           a handler module or pattern is wrong
    │   └── NoRouteError         no route matches a recipient (SMTP: 550 at RCPT)
    └── SMTPError              a handler refuses a message with its own SMTP reply

Example:
    Catch everything maildefer raises on purpose, and nothing else:

    >>> from maildefer import Router
    >>> from maildefer.errors import MaildeferError
    >>> try:
    ...     Router.from_modules(["app.handlers.nope"])
    ... except MaildeferError as exc:
    ...     print(type(exc).__name__)
    RoutingError
"""

from __future__ import annotations


class MaildeferError(Exception):
    """Base class of every error maildefer raises on purpose.

    Example:
        >>> try:
        ...     raise NoRouteError("no route matches 'a@x'")
        ... except MaildeferError as exc:
        ...     print("refused:", exc)
        refused: no route matches 'a@x'
    """


class ConfigError(MaildeferError):
    """Settings or command-line usage are invalid; the CLI exits with status 2.

    Example:
        >>> str(ConfigError("server.port = 'x': expected an integer"))
        "server.port = 'x': expected an integer"
    """


class QueueError(MaildeferError):
    """A queue operation failed (ENOSPC, EIO, broker down); the message is not queued.

    Example:
        >>> raise QueueError("run/posts: push failed: No space left on device")
        Traceback (most recent call last):
        ...
        maildefer.errors.QueueError: run/posts: push failed: No space left on device
    """


class CorruptMessageError(QueueError):
    """A queued file does not match its own envelope record (truncated or altered).

    Example:
        A corrupt file is a queue error too, so one ``except`` covers both:

        >>> try:
        ...     raise CorruptMessageError("run/posts/new/k: sha256 does not match")
        ... except QueueError as exc:
        ...     print("451 4.3.0", exc)
        451 4.3.0 run/posts/new/k: sha256 does not match
    """


class RoutingError(MaildeferError):
    """A handler module cannot be loaded or a route pattern is invalid.

    Example:
        >>> str(RoutingError("no module named app.handlers.nope"))
        'no module named app.handlers.nope'
    """


class NoRouteError(RoutingError):
    """No route matches the recipient a message is delivered to.

    Example:
        >>> import asyncio
        >>> from maildefer import MailRequest, Router
        >>> try:
        ...     asyncio.run(Router([]).deliver(MailRequest(b"\\n", rcpt_tos=["a@x.org"])))
        ... except NoRouteError as exc:
        ...     print("550 5.1.1", exc)
        550 5.1.1 no route matches 'a@x.org'
    """


class SMTPError(MaildeferError):
    """Raised by a handler to refuse a message with a specific SMTP reply.

    Args:
        code: the SMTP reply code, e.g. 550.
        message: the reply text, e.g. ``"5.7.1 Not accepted here"``.

    Example:
        >>> err = SMTPError(550, "5.7.1 Go away")
        >>> err.reply
        '550 5.7.1 Go away'
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message

    @property
    def reply(self) -> str:
        """The full SMTP reply line, code and text."""
        return f"{self.code} {self.message}"
