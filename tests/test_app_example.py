"""The example project (the blog of Lamson's "defer to queue"), its settings and `routes`."""

from __future__ import annotations

import asyncio
import email.header
import os
import smtplib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog
from helpers.smtp_server import make_settings, queued, running

import maildefer
from maildefer import MailRequest, Queue, Router
from maildefer.cli.log import log_server
from maildefer.settings import Settings, load_settings
from maildefer.state import MemoryStateStore
from maildefer.view import View

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "app" / "templates"
RunCli = Callable[..., subprocess.CompletedProcess[bytes]]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example's handlers importable, run/ paths landing in tmp_path."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def routers(state: MemoryStateStore) -> tuple[Router, Router]:
    settings = load_settings(ROOT / "config" / "settings.toml")
    defaults = settings.router.defaults
    serve = Router.from_modules(settings.server.handlers, defaults=defaults, state=state)
    worker = Router.from_modules(settings.queues["posts"].handlers, defaults=defaults, state=state)
    return serve, worker


def post(subject: str, sender: str = "ann@writers.org", rcpt: str = "hello@example.com") -> bytes:
    return (
        f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{abs(hash(subject))}@writers.org>\r\n\r\nA post.\r\n"
    ).encode()


def test_package_exports_the_contract() -> None:
    for name in ("route", "stateless", "route_like", "Router", "Queue", "MailRequest"):
        assert hasattr(maildefer, name), name
    assert set(maildefer.__all__) >= {"MailResponse", "SMTPError"}


async def test_posting_defers_to_the_queue_and_index_handles_it(project: Path) -> None:
    state = MemoryStateStore()
    serve, worker = routers(state)
    for subject in ("First post", "Second\tpost"):
        raw = post(subject)
        message = MailRequest(raw, mail_from="ann@writers.org", rcpt_tos=["hello@example.com"])
        assert await serve.deliver(message) == 1
    # START moved the sender to POSTING; the queue holds both posts, byte-exact.
    assert state.states == {"app.handlers.posting:ann@writers.org": "POSTING"}
    queue = Queue("run/posts")
    assert await queue.count() == 2
    subjects = []
    while (item := await queue.pop()) is not None:
        key, queued = item
        assert queued.mail_from == "ann@writers.org"
        assert queued.rcpt_to == "hello@example.com"  # the envelope travelled with it
        subjects.append(queued["Subject"])
        with structlog.contextvars.bound_contextvars(key=key):
            assert await worker.deliver(queued) == 1
    lines = (project / "run" / "posts.index").read_text().splitlines()
    assert sorted(subjects) == ["First post", "Second\tpost"]
    assert len(lines) == 2
    fields = [line.split("\t") for line in lines]
    assert all(len(f) == 3 for f in fields)  # a tab in the subject does not split a record
    assert {f[2] for f in fields} == {"First post", "Second post"}
    assert {f[1] for f in fields} == {"ann@writers.org"}


async def test_index_uses_message_id_without_a_queue_key(project: Path) -> None:
    _, worker = routers(MemoryStateStore())
    raw = post("Dropped in by hand")
    await worker.deliver(MailRequest(raw, mail_from="bob@x.org", rcpt_tos=["news@example.com"]))
    key, sender, subject = (project / "run" / "posts.index").read_text().rstrip("\n").split("\t")
    assert key.startswith("<") and key.endswith("@writers.org>")
    assert (sender, subject) == ("bob@x.org", "Dropped in by hand")


async def test_example_routes_only_the_configured_domain(project: Path) -> None:
    serve, _ = routers(MemoryStateStore())
    assert serve.match("Anything@EXAMPLE.com")
    assert serve.match("someone@example.org") == []
    assert serve.match("someone@mail.example.com") == []


def test_routes_command_lists_every_route(run_cli: RunCli) -> None:
    done = run_cli("routes", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert "[server]" in out and "[queues.posts] run/posts" in out
    assert "app.handlers.posting.START" in out and "app.handlers.posting.POSTING" in out
    index_line = next(line for line in out.splitlines() if "app.handlers.index.START" in line)
    assert "stateless" in index_line
    assert "requires" not in index_line  # a worker's handler: no sender check
    posting = next(line for line in out.splitlines() if "app.handlers.posting.START" in line)
    assert posting.endswith("requires dmarc")  # @authenticated("dmarc")
    assert r"(?P<host>example\.com)" in out  # defaults expanded


def test_routes_command_tests_an_address(run_cli: RunCli) -> None:
    hit = run_cli("routes", "--test", "hello@example.com", cwd=ROOT)
    assert hit.returncode == 0, hit.stderr
    assert "post_name='hello'" in hit.stdout.decode()
    assert "app.handlers.index.START" in hit.stdout.decode()
    miss = run_cli("routes", "--test", "hello@example.org", cwd=ROOT)
    assert miss.returncode == 1
    assert "550 5.1.1" in miss.stdout.decode()  # only the outbox (any address) matches


def test_routes_command_bad_handler_module_exits_2(run_cli: RunCli, tmp_path: Path) -> None:
    config = tmp_path / "config" / "settings.toml"
    config.parent.mkdir()
    config.write_text('[server]\nhandlers = ["app.handlers.nope"]\n')
    done = run_cli("routes", "--config", config, cwd=tmp_path)
    assert done.returncode == 2
    assert b"app.handlers.nope" in done.stderr
    assert len(done.stderr.decode().strip().splitlines()) == 1


# -- the reply, rendered from app/templates ----------------------------------------------------

TITLE = "Café <script>alert(1)</script> ✓"


def encoded_post(title: str = TITLE, sender: str = "ann@writers.org") -> bytes:
    subject = email.header.Header(title, "utf-8").encode()  # as a mail client sends it
    return (
        f"From: {sender}\r\nTo: hello@example.com\r\nSubject: {subject}\r\n"
        "Message-ID: <p7@writers.org>\r\n\r\nA post.\r\n"
    ).encode()


def check_reply(reply: MailRequest) -> None:
    """The example's reply: both parts rendered, escaped in HTML only, Subject encoded."""
    head = reply.raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii() and b"Subject: Re: =?utf-8?" in head  # RFC 2047, not raw UTF-8
    assert reply["Subject"] == f"Re: {TITLE}"
    assert reply["Auto-Submitted"] == "auto-replied"
    assert reply["In-Reply-To"] == "<p7@writers.org>"
    assert reply.email.get_content_type() == "multipart/alternative"
    text = str(reply.email.get_body(("plain",)).get_content()).replace("\r\n", "\n")
    html = str(reply.email.get_body(("html",)).get_content())
    assert f'Your post "{TITLE}" was received' in text  # text: as written
    assert "hello@example.com" in text
    assert "<strong>Café &lt;script&gt;alert(1)&lt;/script&gt; ✓</strong>" in html
    assert "<script>" not in html


async def test_the_reply_is_rendered_from_the_templates(project: Path) -> None:
    serve, _ = routers(MemoryStateStore())
    message = MailRequest(
        encoded_post(), mail_from="ann@writers.org", rcpt_tos=["hello@example.com"]
    )
    with View(TEMPLATES).active():
        assert await serve.deliver(message) == 1
    popped = await Queue("run/outbox").pop()
    assert popped is not None
    reply = popped[1]
    assert reply.mail_from == "noreply@example.com" and reply.rcpt_tos == ["ann@writers.org"]
    check_reply(reply)


async def test_a_bad_template_fails_the_post_instead_of_an_empty_reply(
    project: Path, tmp_path: Path
) -> None:
    serve, _ = routers(MemoryStateStore())
    empty = tmp_path / "no-templates"
    empty.mkdir()
    message = MailRequest(encoded_post(), mail_from="ann@writers.org", rcpt_tos=["h@example.com"])
    with View(empty).active(), pytest.raises(Exception, match=r"post_received\.msg"):
        await serve.deliver(message)  # in serve: 451, the sender retries
    assert await Queue("run/outbox").count() == 0


async def test_reply_end_to_end_through_the_outbox_worker_to_a_log_server(
    project: Path,
) -> None:
    """SMTP in -> posting (view.respond) -> run/outbox -> a worker process -> relay -> log."""
    logged = log_server(Settings(root=project, server={"port": 0}), "run/relayed")
    await logged.start()
    try:
        # serve, in process: its handlers find the example's templates (the app package's).
        async with running(make_settings(project, "app.handlers.posting")) as server:

            def send() -> None:
                with smtplib.SMTP("127.0.0.1", server.port or 0, timeout=30) as client:
                    client.sendmail("ann@writers.org", ["hello@example.com"], encoded_post())

            await asyncio.to_thread(send)
        config = project / "config" / "settings.toml"
        config.parent.mkdir()
        config.write_text(
            f'[relay]\nport = {logged.port}\n[view]\ntemplates = "{TEMPLATES}"\n'
            '[queues.outbox]\npath = "run/outbox"\nhandlers = ["maildefer.handlers.outbox"]\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILDEFER_")}
        env["PYTHONPATH"] = str(ROOT)
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "maildefer", "--config", str(config), "worker", "--queue", "outbox"),
            "--burst",
            cwd=project,
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(worker.communicate(), timeout=60)
        assert worker.returncode == 0, stderr.decode()
    finally:
        await logged.shutdown()
    [post_queued] = queued(project / "run" / "posts")
    assert post_queued["Subject"] == TITLE
    assert queued(project / "run" / "outbox") == []  # relayed, acked
    [relayed] = queued(project / "run" / "relayed")  # as the log server received it
    assert relayed.mail_from == "noreply@example.com"
    assert relayed.rcpt_tos == ["ann@writers.org"]
    check_reply(relayed)
