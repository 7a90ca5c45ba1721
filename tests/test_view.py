"""maildefer.view (Jinja2 replies), maildefer.reply (RFC 3834), MailResponse on queues."""

from __future__ import annotations

import asyncio
import email.policy
import subprocess
from collections.abc import Callable
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import jinja2
import pytest
from helpers.broker import needs_broker

import maildefer
from maildefer import MailRequest, MailResponse, Queue, reply, view
from maildefer.settings import Settings, load_settings
from maildefer.view import View

RunCli = Callable[..., subprocess.CompletedProcess[bytes]]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    d = tmp_path / "templates"
    d.mkdir()
    (d / "ready.msg").write_text("Hi {{ name }}, {{ page }} is ready.\n")
    (d / "ready.html").write_text("<p>Hi {{ name }}, <a>{{ page }}</a> is ready.</p>\n")
    return d


def parse(data: bytes) -> Any:
    return BytesParser(policy=email.policy.default).parsebytes(data)


def content(part: Any) -> str:
    """A text part's content with the wire's CRLF line ends as LF."""
    return str(part.get_content()).replace("\r\n", "\n")


def test_from_maildefer_import_view_gives_respond_and_render() -> None:
    assert maildefer.view is view
    assert callable(view.respond) and callable(view.render)


def test_respond_text_and_html_alternative_escaped_in_html_only(templates: Path) -> None:
    name = "<script>alert(1)</script>"
    with View(templates).active():
        msg = view.respond(
            {"name": name, "page": "/a&b"},
            "ready.msg",
            Html="ready.html",
            From="noreply@example.com",
            To="ann@writers.org",
            Subject="Your page is ready",
        )
    parsed = parse(msg.as_bytes())
    assert parsed.get_content_type() == "multipart/alternative"
    text = content(parsed.get_body(("plain",)))
    html = content(parsed.get_body(("html",)))
    assert text == f"Hi {name}, /a&b is ready.\n"  # text: never escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert "/a&amp;b" in html
    assert parsed["Subject"] == "Your page is ready" and parsed["To"] == "ann@writers.org"


def test_text_only_reply_is_not_multipart(templates: Path) -> None:
    msg = View(templates).respond({"name": "A", "page": "/"}, "ready.msg", To="a@x.org")
    parsed = parse(msg.as_bytes())
    assert parsed.get_content_type() == "text/plain"
    assert content(parsed) == "Hi A, / is ready.\n"


def test_render_returns_text_and_autoescapes_html_names(templates: Path) -> None:
    with View(templates).active():
        assert view.render({"name": "<b>", "page": "p"}, "ready.msg") == "Hi <b>, p is ready.\n"
        assert "&lt;b&gt;" in view.render({"name": "<b>", "page": "p"}, "ready.html")


def test_missing_template_or_variable_raises_never_an_empty_reply(templates: Path) -> None:
    v = View(templates)
    with pytest.raises(jinja2.TemplateNotFound, match=str(templates)):
        v.respond({}, "nope.msg", To="a@x.org")
    with pytest.raises(jinja2.UndefinedError, match="page"):
        v.respond({"name": "A"}, "ready.msg", To="a@x.org")
    with pytest.raises(jinja2.TemplateNotFound, match=r"broken\.html"):
        v.respond({"name": "A", "page": "p"}, "ready.msg", Html="broken.html")
    with pytest.raises(TypeError):
        v.respond({}, To="a@x.org")


def test_templates_are_parsed_once_per_process(templates: Path) -> None:
    v = View(templates)
    loads: list[str] = []
    # The text and HTML environments share one loader: wrap it once.
    shared = {id(v.environment(html=h).loader): v.environment(html=h).loader for h in (False, True)}
    for loader in shared.values():
        assert isinstance(loader, jinja2.FileSystemLoader)
        original = loader.get_source

        def counting(env: jinja2.Environment, name: str, original: Any = original) -> Any:
            loads.append(name)
            return original(env, name)

        loader.get_source = counting  # type: ignore[method-assign]
    with v.active():
        for i in range(100):
            msg = view.respond(
                {"name": str(i), "page": "p"}, "ready.msg", Html="ready.html", To="a@x.org"
            )
            assert msg.body == f"Hi {i}, p is ready.\n"
            view.render({"name": str(i), "page": "p"}, "ready.msg")
    # 300 renders, one read and parse per template and environment (text, HTML).
    assert sorted(loads) == ["ready.html", "ready.msg"]


def test_without_an_active_view_cwd_templates_then_the_app_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "blog"
    (project / "app" / "templates").mkdir(parents=True)
    (project / "app" / "templates" / "hi.msg").write_text("hi {{ x }}\n")
    monkeypatch.chdir(project)
    first = view.current_view()
    assert first.templates == project / "app" / "templates"
    assert view.render({"x": 1}, "hi.msg") == "hi 1\n"
    assert view.current_view() is first  # the same View, its parsed templates kept
    # No app/templates here: those of the importable app package (the example's).
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    assert view.current_view().templates == ROOT / "app" / "templates"


def test_view_settings_resolve_against_the_root_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert View.from_settings(Settings(root=tmp_path)).templates == tmp_path / "app/templates"
    s = Settings(root=tmp_path, view={"templates": "mail"})
    assert View.from_settings(s).templates == tmp_path / "mail"
    monkeypatch.setenv("MAILDEFER_VIEW__TEMPLATES", "/srv/tpl")
    assert View.from_settings(Settings(root=tmp_path)).templates == Path("/srv/tpl")
    monkeypatch.delenv("MAILDEFER_VIEW__TEMPLATES")
    config = tmp_path / "config" / "settings.toml"
    config.parent.mkdir()
    config.write_text('[view]\ntemplates = "tpl"\ncolour = "red"\n')
    with pytest.raises(maildefer.errors.ConfigError, match="colour"):
        load_settings(config)


# -- MailResponse --------------------------------------------------------------------------


def test_non_ascii_headers_are_encoded_by_the_stdlib() -> None:
    msg = MailResponse(
        From="Zoë <noreply@bücher.example>", To="ann@x.org", Subject="Prête ✓", Body="é\n"
    )
    data = msg.as_bytes()
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()  # 7-bit headers: RFC 2047 words and an IDNA domain
    assert b"=?utf-8?" in head and b"noreply@xn--bcher-kva.example" in head
    parsed = parse(data)
    assert parsed["Subject"] == "Prête ✓" and parsed["From"].addresses[0].display_name == "Zoë"
    assert msg.mail_from == "noreply@xn--bcher-kva.example" and not msg.smtputf8


def test_non_ascii_local_part_needs_smtputf8() -> None:
    msg = MailResponse(From="blog@x.org", To="josé@exämple.org", Subject="Hi")
    assert msg.smtputf8
    assert msg.rcpt_tos == ["josé@xn--exmple-cua.org"]
    assert "To: josé@xn--exmple-cua.org\r\n".encode() in msg.as_bytes()


def test_attach_a_file_or_bytes(tmp_path: Path) -> None:
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.4 fake")
    msg = MailResponse(To="a@x.org", From="b@x.org", Body="attached")
    msg.attach(report)
    msg.attach(b"a,b\n", "data.csv")
    msg.attach(b"\x00\x01", content_type="image/png")
    msg.attach(b"??", "blob")
    parts = {p.get_filename(): p for p in parse(msg.as_bytes()).iter_attachments()}
    assert parts["report.pdf"].get_content_type() == "application/pdf"
    assert parts["report.pdf"].get_content() == b"%PDF-1.4 fake"
    assert parts["data.csv"].get_content_type() == "text/csv"
    assert parts[None].get_content_type() == "image/png"
    assert parts["blob"].get_content_type() == "application/octet-stream"
    with pytest.raises(FileNotFoundError):
        msg.attach(tmp_path / "missing.txt")


def test_message_id_is_stamped_once() -> None:
    msg = MailResponse(To="a@x.org", From="b@blog.example")
    first = parse(msg.as_bytes())["Message-ID"]
    assert first.endswith("@blog.example>")
    assert parse(msg.as_bytes())["Message-ID"] == first


def bcc_reply() -> MailResponse:
    return MailResponse(
        From="Blog <noreply@example.com>",
        To="ann@writers.org",
        Cc="Bob <bob@writers.org>",
        Bcc="archive@example.com",
        Subject="Posted",
        Body="ok\n",
    )


async def test_push_of_a_mail_response_keeps_bcc_in_the_envelope_only(tmp_path: Path) -> None:
    q = Queue(str(tmp_path / "outbox"))
    key = await q.push(bcc_reply())
    sync_key = await asyncio.to_thread(q.push_sync, bcc_reply())
    for k in (key, sync_key):
        queued = await q.get(k)
        assert queued.mail_from == "noreply@example.com"
        assert queued.rcpt_tos == ["ann@writers.org", "bob@writers.org", "archive@example.com"]
        assert b"archive@example.com" not in queued.raw and queued["Bcc"] is None
        assert queued["Cc"] == "Bob <bob@writers.org>"
    await q.close()


@needs_broker
def test_push_of_a_mail_response_to_rabbitmq(amqp_url: str) -> None:
    with Queue(amqp_url) as q:
        q.push_sync(bcc_reply())

    async def pop() -> tuple[str, MailRequest] | None:
        async with Queue(amqp_url) as q:
            return await q.pop()

    popped = asyncio.run(pop())
    assert popped is not None
    queued = popped[1]
    assert queued.rcpt_tos == ["ann@writers.org", "bob@writers.org", "archive@example.com"]
    assert b"archive@example.com" not in queued.raw


# -- reply -------------------------------------------------------------------------------


def received(headers: str = "", sender: str = "ann@writers.org") -> MailRequest:
    raw = f"From: {sender or 'x@y'}\r\nSubject: Re: RE: Hello\r\n{headers}\r\nbody\r\n"
    return MailRequest(raw.encode(), mail_from=sender, rcpt_tos=["blog@example.com"])


@pytest.mark.parametrize(
    ("headers", "sender"),
    [
        ("", ""),
        ("", "<>"),
        ("Auto-Submitted: auto-generated\r\n", "ann@writers.org"),
        ("Auto-Submitted: auto-replied (vacation)\r\n", "ann@writers.org"),
        ("List-Id: <blog.writers.org>\r\n", "ann@writers.org"),
        ("List-Unsubscribe: <mailto:u@writers.org>\r\n", "ann@writers.org"),
        ("Precedence: bulk\r\n", "ann@writers.org"),
        ("Precedence: List\r\n", "ann@writers.org"),
        ("Precedence: junk\r\n", "ann@writers.org"),
        ("", "MAILER-DAEMON@writers.org"),
        ("", "postmaster@writers.org"),
        ("", "blog-request@writers.org"),
        ("", "owner-blog@writers.org"),
    ],
)
def test_reply_refuses_what_rfc_3834_forbids(templates: Path, headers: str, sender: str) -> None:
    message = received(headers, sender)
    assert reply.refusal(message) is not None and not reply.should_answer(message)
    with View(templates).active():
        assert reply.respond(message, {}, "no-such-template.msg", From="b@x") is None


def test_reply_answers_a_person_threaded_and_marked(templates: Path) -> None:
    message = received(
        "Auto-Submitted: no\r\nMessage-ID: <3@writers.org>\r\n"
        "References: <1@writers.org> <2@writers.org>\r\nPrecedence: first-class\r\n"
    )
    with View(templates).active():
        answer = reply.respond(
            message, {"name": "Ann", "page": "/p"}, "ready.msg", From="noreply@example.com"
        )
    assert answer is not None
    parsed = parse(answer.as_bytes())
    assert parsed["To"] == "ann@writers.org"
    assert parsed["Subject"] == "Re: Hello"  # "Re:" once
    assert parsed["In-Reply-To"] == "<3@writers.org>"
    assert parsed["References"] == "<1@writers.org> <2@writers.org> <3@writers.org>"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert content(parsed) == "Hi Ann, /p is ready.\n"


def test_reply_subject() -> None:
    assert reply.subject("Hello") == "Re: Hello"
    assert reply.subject("Re: Re: Hello") == "Re: Hello"
    assert reply.subject("re[3]: RE : Hello") == "Re: Hello"
    assert reply.subject("Ready: Re: x") == "Re: Ready: Re: x"  # only leading prefixes
    assert reply.subject("", fallback="your post") == "Re: your post"


# -- the CLI activates [view] templates ----------------------------------------------------

HANDLER = """
from pathlib import Path
from maildefer import route, stateless, view

@route("(address)", address=".+")
@stateless
async def START(message, address):
    Path("run/rendered.txt").write_text(view.render({"who": message.mail_from}, "hello.msg"))
"""


def test_worker_renders_from_the_configured_templates(run_cli: RunCli, tmp_path: Path) -> None:
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "hello.msg").write_text("Hello {{ who }}\n")
    (tmp_path / "render_handlers.py").write_text(HANDLER)
    config = tmp_path / "config" / "settings.toml"
    config.parent.mkdir()
    config.write_text(
        '[view]\ntemplates = "mail"\n[queues.jobs]\npath = "run/jobs"\n'
        'handlers = ["render_handlers"]\n'
    )
    q = Queue(str(tmp_path / "run" / "jobs"))
    q.push_sync(MailRequest(b"Subject: x\r\n\r\n", mail_from="ann@x.org", rcpt_tos=["j@x"]))
    # Neither cwd/app/templates nor the example's app/templates has hello.msg: only the
    # setting, activated by cli.main around the command, can make this render.
    done = run_cli(
        "--config",
        config,
        "worker",
        "--queue",
        "jobs",
        "--burst",
        cwd=tmp_path,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}"},
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "rendered.txt").read_text() == "Hello ann@x.org\n"
