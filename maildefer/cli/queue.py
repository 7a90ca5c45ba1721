"""``maildefer queue QUEUE ACTION``: look into a queue and manage it from the shell.

Actions: ``count``, ``keys``, ``show KEY``, ``pop``, ``remove KEY``, ``clear``,
``requeue``. ``QUEUE`` is a path, a URL or a queue name from settings. ``requeue`` on a
queue moves its buried messages back from the undeliverable queue; on the undeliverable
queue itself it sends every buried message back to the queue it came from.

On an ``amqp://`` queue, ``count`` is the messages waiting in the queue and its delay
queues (maildir's ``new/`` and ``later/``; those a consumer holds unacked are not
reported by the broker), read without declaring anything; ``requeue`` works as on a
maildir (:mod:`maildefer.queue.amqp.admin`: each copy confirmed before its dead letter is
acked); ``pop`` and ``clear`` go through the backend; ``keys``, ``show`` and ``remove``
exit 2 with one line: a broker queue cannot be browsed without taking messages off it.

Example:
    >>> import tempfile
    >>> from maildefer.cli import main
    >>> main(["queue", tempfile.mkdtemp(), "count"])
    0
    0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TextIO

from maildefer.errors import ConfigError, CorruptMessageError
from maildefer.queue.backend import QueueBackend
from maildefer.queue.config import backend_for, queue_options, resolve_queue
from maildefer.queue.maildir import MaildirQueue
from maildefer.queue.maildir.names import MaildirName
from maildefer.settings import Settings

ACTIONS = ("count", "keys", "show", "pop", "remove", "clear", "requeue")
AMQP_REFUSED = ("keys", "show", "remove")
"""What a broker queue cannot do: browse (handing messages back counts toward their
delivery limit, so browsing would turn them into poison)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``maildefer queue``.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["run/posts", "show", "KEY"]).key
        'KEY'
    """
    parser.add_argument("queue", help="queue path, URL, or name from settings")
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("key", nargs="?", help="message key (show, remove)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one queue action; prints to stdout.

    Example:
        >>> import tempfile
        >>> ns = argparse.Namespace(queue=tempfile.mkdtemp(), action="keys", key=None)
        >>> run(ns, Settings())
        0
    """
    if args.action in ("show", "remove") and not args.key:
        raise ConfigError(f"queue {args.action}: a KEY is required")
    return asyncio.run(_run(args, settings, sys.stdout))


async def _run(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    if resolve_queue(settings, args.queue).startswith(("amqp://", "amqps://")):
        return await _run_amqp(args, settings, out)
    backend = backend_for(settings, args.queue)
    if not isinstance(backend, MaildirQueue):
        raise ConfigError(f"queue {args.queue}: only maildir and amqp queues are supported here")
    if args.action == "count":
        print(await backend.count(), file=out)
    elif args.action == "keys":
        for key in await backend.keys():
            print(key, file=out)
    elif args.action == "show":
        return await _show(backend, args.key, out)
    elif args.action == "pop":
        return await _pop(backend, out)
    elif args.action == "remove":
        if not await backend.remove(args.key):
            print(f"no message {args.key} in {backend.url}", file=sys.stderr)
            return 1
    elif args.action == "clear":
        print(f"removed {await backend.clear()} messages", file=out)
    elif args.action == "requeue":
        dead_path = settings.resolve(settings.undeliverable.path)
        if Path(backend.url).absolute() == dead_path.absolute():
            moved = await backend.requeue()
        else:
            dead = MaildirQueue(dead_path)
            moved = await dead.requeue(source=resolve_queue(settings, args.queue))
        print(f"requeued {moved} messages", file=out)
    return 0


async def _run_amqp(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """The actions on an amqp queue: counts and requeue on the broker, pop and clear."""
    # Imported here: maildir-only users never import the broker client.
    from maildefer.queue.amqp.admin import AmqpAdmin

    if args.action in AMQP_REFUSED:
        raise ConfigError(
            f"queue {args.queue}: {args.action} is not supported on amqp queues (a broker "
            "queue cannot be browsed without taking messages off it); use count, pop, "
            "clear or requeue"
        )
    if args.action in ("pop", "clear"):
        backend = backend_for(settings, args.queue)
        try:
            if args.action == "pop":
                return await _pop(backend, out)
            print(f"removed {await backend.clear()} messages", file=out)
            return 0
        finally:
            await backend.close()
    admin = AmqpAdmin(
        resolve_queue(settings, args.queue),
        # As backend_for gives the worker: the dead-letter queue it buries to.
        undeliverable=settings.undeliverable_ref(),
        options=queue_options(settings.queue_settings(args.queue)),
    )
    async with admin:
        if args.action == "count":
            print((await admin.counts()).waiting, file=out)
        else:
            print(f"requeued {await admin.requeue()} messages", file=out)
    return 0


async def _pop(backend: QueueBackend, out: TextIO) -> int:
    popped = await backend.pop()
    if popped is None:
        print("queue is empty", file=sys.stderr)
        return 1
    key, message = popped
    print(f"key: {key}", file=out)
    out.flush()
    sys.stdout.buffer.write(message.raw)
    return 0


async def _show(backend: MaildirQueue, key: str, out: TextIO) -> int:
    where = await asyncio.to_thread(backend.locate, key)
    if where is None:
        print(f"no message {key} in {backend.url}", file=sys.stderr)
        return 1
    sub, filename = where
    name = MaildirName.parse(filename)
    state = {"new": "waiting", "later": "waiting for retry", "cur": "claimed"}[sub]
    print(f"key:        {name.key}", file=out)
    print(f"file:       {backend.dir(sub) / filename}", file=out)
    print(f"state:      {state}", file=out)
    print(f"attempts:   {name.attempts}", file=out)
    print(f"recoveries: {name.recoveries}", file=out)
    if name.due_ms:
        due = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(name.due_ms / 1000))
        print(f"due:        {due}", file=out)
    if name.field("W"):
        print(f"claimed by: {name.field('W')}", file=out)
    try:
        message = await backend.read(sub, filename)  # through aiofiles
    except CorruptMessageError as exc:
        print(f"corrupt:    {exc}", file=out)
        return 1
    print(f"from:       {message.mail_from}", file=out)
    print(f"to:         {', '.join(message.rcpt_tos)}", file=out)
    print(f"peer:       {message.peer}", file=out)
    received = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(message.received_at))
    print(f"received:   {received}", file=out)
    print(f"size:       {len(message.raw)} bytes", file=out)
    record = backend.error_record(key)
    if record is not None:
        print("last error:", file=out)
        print(json.dumps(record, indent=2), file=out)
    print("headers:", file=out)
    for header in message.keys():  # noqa: SIM118 - MailRequest is no dict
        print(f"  {header}: {message[header]}", file=out)
    return 0
