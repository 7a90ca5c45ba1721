"""Helpers for testing handler modules without a server (Lamson's ``lamson.testing``).

Build a router from your handler modules, then talk to it as one sender would: every
message goes through the same routing, state functions and locks as under ``serve``.
Installed with ``pip install 'maildefer[testing]'``, this package is also a pytest plugin
(:mod:`maildefer.testing.plugin`, loaded through the ``pytest11`` entry point) whose
``maildefer_*`` fixtures build all of this from the project's settings.

Example:
    >>> import asyncio, sys, types
    >>> mod = types.ModuleType("doc_testing_app"); sys.modules["doc_testing_app"] = mod
    >>> exec('''
    ... from maildefer import route, route_like
    ... @route("(name)@(host)")
    ... async def START(message, name, host):
    ...     return POSTING
    ... @route_like(START)
    ... async def POSTING(message, name, host):
    ...     return None
    ... ''', mod.__dict__)
    >>> async def demo():
    ...     router = Router.from_modules(["doc_testing_app"])
    ...     ann = Conversation(router, "ann@writers.org")
    ...     await ann.say("hello@example.com", "first post")
    ...     return await ann.state("doc_testing_app")
    >>> asyncio.run(demo())
    'POSTING'
"""

from __future__ import annotations

from collections.abc import Mapping

from maildefer.mail import MailRequest, MailResponse
from maildefer.routing import START, Router

__all__ = ["Conversation", "RouterConversation", "make_message"]


def make_message(
    to: str,
    *,
    sender: str = "tester@example.com",
    subject: str = "test",
    body: str = "test\n",
    headers: Mapping[str, str] | None = None,
) -> MailRequest:
    """A well-formed message with its envelope, as ``serve`` would hand it to handlers.

    Example:
        >>> m = make_message("a@example.com", subject="Hi")
        >>> m.rcpt_to, m["Subject"], m.mail_from
        ('a@example.com', 'Hi', 'tester@example.com')
    """
    response = MailResponse(
        To=to, From=sender, Subject=subject, Body=body, headers=dict(headers or {})
    )
    return MailRequest(response.as_bytes(), mail_from=sender, rcpt_tos=[to], peer="127.0.0.1:0")


class Conversation:
    """One sender writing to a router, message after message.

    Args:
        router: the router under test.
        sender: the envelope sender (and ``From:``) of every message.
        subject: the default subject.

    Example:
        >>> Conversation(Router([]), "ann@x.org").sender
        'ann@x.org'
    """

    def __init__(self, router: Router, sender: str, subject: str = "test") -> None:
        self.router = router
        self.sender = sender
        self.subject = subject
        self.sent: list[MailRequest] = []

    async def say(
        self, to: str, body: str = "test\n", *, subject: str | None = None, **headers: str
    ) -> int:
        """Deliver one message to ``to``; returns how many handlers ran.

        Raises:
            NoRouteError: no route matches ``to`` (``serve`` would answer 550).

        Example:
            >>> import asyncio
            >>> asyncio.run(Conversation(Router([]), "a@x").say("b@x"))
            Traceback (most recent call last):
            ...
            maildefer.errors.NoRouteError: no route matches 'b@x'
        """
        message = make_message(
            to,
            sender=self.sender,
            subject=self.subject if subject is None else subject,
            body=body,
            headers=headers,
        )
        self.sent.append(message)
        return await self.router.deliver(message)

    async def state(self, module: str) -> str:
        """This sender's state in a handler module (``START`` before any message).

        Example:
            >>> import asyncio
            >>> asyncio.run(Conversation(Router([]), "a@x").state("app.handlers.posting"))
            'START'
        """
        stored = await self.router.state.get(Router.state_key(module, self.sender))
        return stored or START


class RouterConversation:
    """A conversation that says the subject first (Lamson's ``RouterConversation``).

    A :class:`Conversation` underneath (same routing, states and locks); what the
    ``maildefer_conversation`` fixture makes.

    Args:
        router: the router under test.
        sender: the envelope sender (and ``From:``) of every message.
        subject: the subject when :meth:`say` is given none.

    Example:
        >>> import asyncio
        >>> conv = RouterConversation(Router([]), "ann@x.org")
        >>> conv.sender, asyncio.run(conv.state("app.handlers.posting"))
        ('ann@x.org', 'START')
    """

    def __init__(self, router: Router, sender: str, subject: str = "test") -> None:
        self.conversation = Conversation(router, sender, subject)

    @property
    def sender(self) -> str:
        """The envelope sender of every message."""
        return self.conversation.sender

    @property
    def sent(self) -> list[MailRequest]:
        """The messages said so far, in order."""
        return self.conversation.sent

    async def say(
        self, to: str, subject: str | None = None, body: str = "test\n", **headers: str
    ) -> int:
        """Deliver one message with this subject to ``to``; returns how many handlers ran.

        Raises:
            NoRouteError: no route matches ``to`` (``serve`` would answer 550).

        Example:
            >>> import asyncio
            >>> asyncio.run(RouterConversation(Router([]), "a@x").say("b@x", "Hi", "text"))
            Traceback (most recent call last):
            ...
            maildefer.errors.NoRouteError: no route matches 'b@x'
        """
        return await self.conversation.say(to, body, subject=subject, **headers)

    async def state(self, module: str) -> str:
        """This sender's state in a handler module (``START`` before any message).

        Example:
            >>> import asyncio
            >>> asyncio.run(RouterConversation(Router([]), "a@x").state("app.handlers.index"))
            'START'
        """
        return await self.conversation.state(module)
