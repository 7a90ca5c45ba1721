"""The pytest plugin of ``maildefer[testing]``: fixtures for testing an application.

pytest loads it through the ``pytest11`` entry point ``maildefer`` wherever maildefer is
installed, so every fixture name starts with ``maildefer_`` (no clash with a project's
own), and importing it imports nothing of maildefer but :mod:`maildefer.testing`: the
fixtures import the rest when used.

The project is the pytest root directory (or the working directory) holding
``config/settings.toml``. Each test gets its queues under its ``tmp_path``, and runs
there (``Queue("run/posts")`` in a handler lands in ``tmp_path/run/posts``):

- ``maildefer_settings``: the project's settings, queue paths in ``tmp_path``, port 0;
- ``maildefer_router``: the ``Router`` of ``[server] handlers``, states in memory;
- ``maildefer_conversation("ann@x.org")``: a :class:`RouterConversation` with it;
- ``maildefer_relay``: a :class:`~maildefer.testing.kit.CapturedRelay`, active;
- ``maildefer_queues``: :class:`~maildefer.testing.kit.TestQueues` (``pushed``, ``run``);
- ``maildefer_serve``: a :class:`~maildefer.testing.kit.TestServer` on a free port.

Example:
    In a project's ``tests/test_posting.py``::

        async def test_a_post_is_queued(maildefer_conversation, maildefer_queues):
            ann = maildefer_conversation("ann@writers.org")
            await ann.say("hello@example.com", "First post", "Hello.")
            assert len(await maildefer_queues.pushed("posts")) == 1
            assert await ann.state("app.handlers.posting") == "POSTING"

    >>> from maildefer.testing import plugin
    >>> sorted(n for n in vars(plugin) if n.startswith("maildefer_"))[:2]
    ['maildefer_conversation', 'maildefer_queues']
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from maildefer.testing import RouterConversation

if TYPE_CHECKING:
    from maildefer.routing import Router
    from maildefer.settings import Settings
    from maildefer.testing.kit import CapturedRelay, TestQueues, TestServer


def _project_root(config: pytest.Config) -> Path:
    for root in (config.rootpath, Path.cwd()):
        if (root / "config" / "settings.toml").is_file():
            return root
    return config.rootpath


@pytest.fixture
def maildefer_settings(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The project's settings, its queues under ``tmp_path``, ``[server] port = 0``.

    The test runs in ``tmp_path`` (handlers' relative paths land there) with the
    project's root first on ``sys.path`` (``app.handlers.*`` import).
    """
    from maildefer.testing.kit import project_settings

    root = _project_root(request.config)
    monkeypatch.syspath_prepend(str(root))
    settings = project_settings(root, tmp_path)
    monkeypatch.chdir(tmp_path)
    return settings


@pytest.fixture
def maildefer_queues(maildefer_settings: Settings) -> Iterator[TestQueues]:
    """The project's queues in ``tmp_path``, active for every ``Queue(...)`` of the test."""
    import asyncio

    from maildefer.testing.kit import TestQueues

    queues = TestQueues(maildefer_settings)
    with queues.registry.active():
        yield queues
    asyncio.run(queues.close())


@pytest.fixture
def maildefer_relay() -> Iterator[CapturedRelay]:
    """A relay that captures what handlers send (``delivered(to=..., subject=...)``)."""
    from maildefer.testing.kit import CapturedRelay

    relay = CapturedRelay()
    with relay.active():
        yield relay


@pytest.fixture
def maildefer_router(
    maildefer_settings: Settings, maildefer_queues: TestQueues
) -> Iterator[Router]:
    """The router of ``[server] handlers`` with states in memory, templates active."""
    from maildefer.routing import Router
    from maildefer.state import MemoryStateStore
    from maildefer.view import View

    router = Router.from_modules(
        maildefer_settings.server.handlers,
        defaults=maildefer_settings.router.defaults,
        state=MemoryStateStore(),
    )
    with View.from_settings(maildefer_settings).active():
        yield router


@pytest.fixture
def maildefer_conversation(maildefer_router: Router) -> Callable[[str], RouterConversation]:
    """Conversations with the router: ``maildefer_conversation("ann@x.org")``."""

    def start(sender: str, subject: str = "test") -> RouterConversation:
        return RouterConversation(maildefer_router, sender, subject)

    return start


# pytest loads this plugin wherever maildefer is installed, with or without the testing
# extra: without pytest-asyncio, only the one async fixture is missing (it says why).
if TYPE_CHECKING or find_spec("pytest_asyncio") is not None:
    import pytest_asyncio

    @pytest_asyncio.fixture
    async def maildefer_serve(
        maildefer_settings: Settings, maildefer_router: Router
    ) -> AsyncIterator[TestServer]:
        """A real ``serve`` of the router on a free port: ``.port``, ``await .send(...)``."""
        from maildefer.testing.kit import TestServer

        async with TestServer(maildefer_settings, maildefer_router) as server:
            yield server

else:  # pragma: no cover - maildefer installed without the testing extra

    @pytest.fixture
    def maildefer_serve() -> None:
        """Needs pytest-asyncio: ``pip install 'maildefer[testing]'``."""
        pytest.skip("maildefer_serve needs pytest-asyncio (pip install 'maildefer[testing]')")
