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
    >>> from maildefer.errors import QueueError, MaildeferError
    >>> issubclass(QueueError, MaildeferError)
    True
"""

from __future__ import annotations


class MaildeferError(Exception):
    """Base class of every error maildefer raises on purpose.

    Example:
        >>> isinstance(ConfigError("x"), MaildeferError)
        True
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
        >>> issubclass(CorruptMessageError, QueueError)
        True
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
        >>> issubclass(NoRouteError, RoutingError)
        True
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
