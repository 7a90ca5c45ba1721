"""The exception tree of maildefer.

Every error maildefer raises on purpose derives from :class:`MaildeferError`, so an
application can catch the lot in one place::

    MaildeferError
    ├── ConfigError            bad settings or bad usage: the CLI exits 2
    ├── QueueError             a queue operation failed (disk, broker): SMTP answers 451
    │   └── CorruptMessageError  a queued file fails its envelope check (length, sha256)
    ├── RoutingError           a handler module or pattern is wrong
    │   └── NoRouteError         no route matches a recipient (SMTP: 550 at RCPT)
    ├── SMTPError              a handler refuses a message with its own SMTP reply
    │                            (in a worker, a 5xx is permanent: buried at once)
    └── Retry                  a worker handler asks for another attempt after a delay

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


class LifespanError(MaildeferError):
    """A handler module's ``lifespan`` raised while starting: the daemon exits 1.

    Args:
        module: the handler module whose lifespan failed.
        error: the exception, as ``"Type: message"``.

    Example:
        >>> err = LifespanError("app.handlers.db", "OSError: connection refused")
        >>> err.module, str(err)
        ('app.handlers.db', 'lifespan of app.handlers.db failed: OSError: connection refused')
    """

    def __init__(self, module: str, error: str) -> None:
        super().__init__(f"lifespan of {module} failed: {error}")
        self.module = module
        self.error = error


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


class Retry(MaildeferError):
    """Raised by a worker handler: try this message again after ``delay`` seconds.

    The retry counts as an attempt: the message is buried (reason ``"failed"``) once
    ``max_attempts`` is reached, as after any failure, and never earlier. The error
    recorded beside the message says it was a requested retry. The delay replaces the
    queue's backoff for this one retry; it is a minimum (a maildir worker picks the
    message up once it is due; a RabbitMQ queue rounds it up to its ladder of delay
    queues). In ``serve`` it is a temporary failure like any other exception: ``451``.

    Args:
        delay: seconds to wait at least before the next attempt (0: at once).
        reason: why, for the error record and the log line.

    Raises:
        ValueError: ``delay`` is negative or not a finite number.

    Example:
        A handler that waits for a resource to be ready (arq's ``Retry(defer=...)``)::

            @route("(address)@(host)")
            @stateless
            async def START(message, address, host):
                if not await thumbnails_ready(message.key):
                    raise Retry(delay=60, reason="thumbnails not ready")

        >>> str(Retry(delay=1.5, reason="not ready"))
        'retry requested by the handler in 1.5 s: not ready'
    """

    def __init__(self, delay: float = 0.0, reason: str = "") -> None:
        delay = float(delay)
        # NaN fails both comparisons: refused with the negatives and the infinities.
        if not 0.0 <= delay < float("inf"):
            raise ValueError(f"Retry(delay={delay!r}): expected a finite number >= 0")
        text = f"retry requested by the handler in {delay:g} s"
        super().__init__(f"{text}: {reason}" if reason else text)
        self.delay = delay
        self.reason = reason
