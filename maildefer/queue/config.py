"""Settings to backends: which backend a path or URL names, and a process's registry.

:func:`open_backend` picks the backend from the path or URL (a maildir for a path, RabbitMQ
for ``amqp://``); :class:`QueueRegistry` holds the backends of one process (serve or
worker) so that every ``Queue("run/posts")`` a handler makes shares one backend and its
group commit; :func:`queue_options`, :func:`resolve_queue` and :func:`backend_for` turn
``[queues.NAME]`` tables into backend options.

Example:
    >>> from maildefer.settings import Settings
    >>> s = Settings(root=Path("/srv/app"), queues={"posts": {"path": "run/posts"}})
    >>> resolve_queue(s, "posts")
    '/srv/app/run/posts'
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from maildefer.errors import ConfigError
from maildefer.queue.backend import QueueBackend, QueueOptions
from maildefer.queue.maildir import MaildirQueue
from maildefer.settings import QueueSettings, Settings


def open_backend(
    ref: str | os.PathLike[str],
    *,
    options: QueueOptions | None = None,
    undeliverable: str | os.PathLike[str] | None = None,
) -> QueueBackend:
    """A new backend for a queue path or URL.

    Raises:
        ConfigError: the URL's scheme names no backend.

    Example:
        >>> from maildefer.queue.amqp import AmqpQueue
        >>> from maildefer.queue.maildir import MaildirQueue
        >>> isinstance(open_backend("/tmp/q-doc6"), MaildirQueue)
        True
        >>> isinstance(open_backend("amqp://h/?queue=q"), AmqpQueue)
        True
        >>> open_backend("ftp://h/q")
        Traceback (most recent call last):
        ...
        maildefer.errors.ConfigError: queue 'ftp://h/q': no backend for scheme 'ftp' ...
    """
    text = os.fspath(ref)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        if scheme in ("amqp", "amqps"):
            # Imported here so that maildir-only users never import aio-pika.
            from maildefer.queue.amqp import AmqpQueue

            return AmqpQueue(text, options=options, undeliverable=undeliverable)
        raise ConfigError(f"queue {text!r}: no backend for scheme {scheme!r} (expected a path)")
    return MaildirQueue(text, options=options, undeliverable=undeliverable)


class QueueRegistry:
    """The backends of one process (serve or worker), shared by every ``Queue(...)``.

    Example:
        >>> from maildefer.queue import Queue
        >>> reg = QueueRegistry()
        >>> with reg.active():
        ...     Queue("/tmp/q-doc7").backend is Queue("/tmp/q-doc7").backend
        True
    """

    def __init__(
        self,
        *,
        undeliverable: str | os.PathLike[str] | None = None,
        options: Mapping[str, QueueOptions] | None = None,
    ) -> None:
        self._backends: dict[str, QueueBackend] = {}
        self._by_ref: dict[str, QueueBackend] = {}
        self._undeliverable = undeliverable
        # The [queues.NAME] options by absolute path or URL: a handler's Queue("run/posts")
        # pushes with the options of the table that names that queue (its sync mode).
        self._options = dict(options or {})

    @classmethod
    def from_settings(cls, settings: Settings) -> QueueRegistry:
        """A registry whose queues get the options of the ``[queues.NAME]`` naming them.

        Example:
            >>> from maildefer.settings import Settings
            >>> s = Settings(root=Path("/srv"), queues={"q": {"path": "run/q", "sync": "fsync"}})
            >>> QueueRegistry.from_settings(s).get("/srv/run/q").options.sync
            'fsync'
        """
        return cls(
            undeliverable=settings.undeliverable_ref(),
            options={
                resolve_queue(settings, name): queue_options(queue)
                for name, queue in settings.queues.items()
            },
        )

    @staticmethod
    def _normal(ref: str | os.PathLike[str]) -> str:
        text = os.fspath(ref)
        return text if "://" in text else str(Path(text).absolute())

    def get(
        self, ref: str | os.PathLike[str], *, options: QueueOptions | None = None
    ) -> QueueBackend:
        """The shared backend for a queue, opened on first use.

        Example:
            >>> QueueRegistry().get("/tmp/q-doc8").url
            '/tmp/q-doc8'
        """
        text = os.fspath(ref)
        # Handlers call Queue("run/posts") once per message: look the name up as written
        # first, so the hot path pays no getcwd. serve and worker set their working
        # directory once, before any handler runs, so a relative name means one place.
        backend = self._by_ref.get(text)
        if backend is not None:
            return backend
        key = self._normal(text)
        backend = self._backends.get(key)
        if backend is None:
            if options is None:
                options = self._options.get(key)
            backend = open_backend(ref, options=options, undeliverable=self._undeliverable)
            self._backends[key] = backend
        self._by_ref[text] = backend
        return backend

    @contextmanager
    def active(self) -> Iterator[QueueRegistry]:
        """Make this registry the one ``Queue(...)`` uses in this context.

        Example:
            >>> from maildefer.queue import Queue
            >>> with QueueRegistry().active() as reg:
            ...     Queue("/tmp/q-doc7").backend is reg.get("/tmp/q-doc7")
            True
        """
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    async def close(self) -> None:
        """Close every backend.

        Example:
            >>> import asyncio
            >>> reg = QueueRegistry(); first = reg.get("/tmp/q-doc8")
            >>> asyncio.run(reg.close()); reg.get("/tmp/q-doc8") is first
            False
        """
        for backend in self._backends.values():
            await backend.close()
        self._backends.clear()
        self._by_ref.clear()


def active_registry() -> QueueRegistry | None:
    """The registry made active by :meth:`QueueRegistry.active` in this context, if any.

    Example:
        >>> active_registry() is None
        True
        >>> with QueueRegistry().active() as reg:
        ...     active_registry() is reg
        True
    """
    return _ACTIVE.get()


# A context variable, not a global registry: serve and worker each set their own, and
# tasks inherit it, so a handler's Queue("run/posts") finds the process's shared backend.
_ACTIVE: contextvars.ContextVar[QueueRegistry | None] = contextvars.ContextVar(
    "maildefer_queue_registry", default=None
)


def queue_options(queue: QueueSettings) -> QueueOptions:
    """The backend options of a ``[queues.NAME]`` table.

    Example:
        >>> from maildefer.settings import QueueSettings
        >>> queue_options(QueueSettings(path="q", max_attempts=2)).max_attempts
        2
    """
    return QueueOptions(
        max_attempts=queue.max_attempts,
        retry_delay=queue.retry_delay,
        retry_max_delay=queue.retry_max_delay,
        lease=queue.lease,
        max_recoveries=queue.max_recoveries,
        shared_fs=queue.shared_fs,
        poll_interval=queue.poll_interval,
        rescan_interval=queue.rescan_interval,
        sync=queue.sync,
        connect_timeout=queue.connect_timeout,
        publish_timeout=queue.publish_timeout,
    )


def resolve_queue(settings: Settings, ref: str) -> str:
    """The path or URL of a queue given by name (``posts``), path or URL.

    Relative paths are taken from the project root (the directory holding ``config/``).

    Example:
        >>> from maildefer.settings import Settings
        >>> s = Settings(root=Path("/srv/app"), queues={"posts": {"path": "run/posts"}})
        >>> resolve_queue(s, "posts"), resolve_queue(s, "run/other")
        ('/srv/app/run/posts', '/srv/app/run/other')
    """
    target = settings.queues[ref].path if ref in settings.queues else ref
    return target if "://" in target else str(settings.resolve(target))


def backend_for(settings: Settings, ref: str) -> QueueBackend:
    """A backend for a queue named in the CLI, with its settings' options.

    Example:
        >>> from maildefer.settings import Settings
        >>> backend_for(Settings(root=Path("/srv/app")), "run/x").url
        '/srv/app/run/x'
    """
    return open_backend(
        resolve_queue(settings, ref),
        options=queue_options(settings.queue_settings(ref)),
        undeliverable=settings.undeliverable_ref(),
    )
