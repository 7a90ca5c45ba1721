"""Mail from templates: Lamson's ``view``, on Jinja2.

:func:`respond` renders a text template (and optionally an HTML one) into a
:class:`~maildefer.mail.MailResponse`; :func:`render` renders one template to a string.
Templates live in ``[view] templates`` (``app/templates`` under the project root by
default). A missing template or an undefined variable raises (Jinja2's
``StrictUndefined``): a handler never sends a silently empty reply, and in ``serve`` the
sender gets a 451 and tries again once the template is fixed.

Templates are parsed once per process and kept: each :class:`View` builds its Jinja2
environments on first use (``auto_reload`` off, an unbounded cache), so the thousandth
reply costs a render, not a read, a parse and a compile. Edit a template, restart the
daemon.

``serve`` and ``worker`` (every command: ``cli.main``) run with the view of their
settings active (:meth:`View.active`, a context variable like the relay's); elsewhere
(a script, a test) the module functions use the ``app/templates`` of the working
directory, or else of the importable ``app`` package.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "hi.msg").write_text("Hello {{ name }}!\\n")
    >>> _ = (d / "hi.html").write_text("<p>Hello {{ name }}!</p>\\n")
    >>> with View(d).active():
    ...     msg = respond({"name": "<Ann>"}, "hi.msg", Html="hi.html",
    ...                   From="blog@example.com", To="ann@x.org", Subject="Hi")
    >>> msg.body, msg.html
    ('Hello <Ann>!\\n', '<p>Hello &lt;Ann&gt;!</p>\\n')
"""

from __future__ import annotations

import contextvars
import functools
import importlib.util
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maildefer.mail import MailResponse
from maildefer.settings import Settings

if TYPE_CHECKING:
    import jinja2

DEFAULT_TEMPLATES = Path("app/templates")
"""Where templates are when no view is active, relative to the working directory."""

# Jinja2's own select_autoescape() default: these names are HTML for render().
_HTML_SUFFIXES = (".html", ".htm", ".xhtml", ".xml")
# respond()'s keywords that are MailResponse's own fields, not extra headers.
_FIELDS = frozenset({"To", "From", "Subject", "Cc", "Bcc"})


class View:
    """A directory of Jinja2 templates, parsed once and kept for the process.

    Two environments share one loader: text templates are not escaped (a ``<`` in a
    plain-text mail is a ``<``), HTML ones are autoescaped.

    Args:
        templates: the directory of the templates.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "n.msg").write_text("{{ n }} new posts")
        >>> View(d).render({"n": 3}, "n.msg")
        '3 new posts'
    """

    def __init__(self, templates: str | os.PathLike[str] = DEFAULT_TEMPLATES) -> None:
        self.templates = Path(templates)
        self._lock = threading.Lock()
        self._environments: tuple[jinja2.Environment, jinja2.Environment] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> View:
        """The view of ``[view] templates``, resolved against the project root.

        Example:
            >>> View.from_settings(Settings(root="/srv/blog")).templates
            PosixPath('/srv/blog/app/templates')
        """
        return cls(settings.resolve(settings.view.templates))

    @contextmanager
    def active(self) -> Iterator[View]:
        """Make this the view that :func:`respond` and :func:`render` use in this context.

        Example:
            >>> with View("/srv/blog/templates").active():
            ...     current_view().templates
            PosixPath('/srv/blog/templates')
        """
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def environment(self, *, html: bool) -> jinja2.Environment:
        """The Jinja2 environment for text (``html=False``) or HTML templates.

        Built on first use and kept (Jinja2 is imported then, not by every command).

        Example:
            >>> View("/tmp").environment(html=True).autoescape
            True
        """
        environments = self._environments
        if environments is None:
            # push_sync and to_thread callers may render from several threads at once.
            with self._lock:
                if self._environments is None:
                    self._environments = _environments(self.templates)
                environments = self._environments
        return environments[1] if html else environments[0]

    def render(self, variables: Mapping[str, Any], template: str) -> str:
        """One template rendered with ``variables``; autoescaped if its name is HTML.

        Raises:
            jinja2.TemplateNotFound: no such template in :attr:`templates`.
            jinja2.UndefinedError: the template uses a variable not in ``variables``.

        Example:
            >>> import tempfile, pathlib
            >>> d = pathlib.Path(tempfile.mkdtemp())
            >>> _ = (d / "t.html").write_text("<b>{{ who }}</b>")
            >>> View(d).render({"who": "<script>"}, "t.html")
            '<b>&lt;script&gt;</b>'
            >>> View(d).render({}, "t.html")
            Traceback (most recent call last):
            ...
            jinja2.exceptions.UndefinedError: 'who' is undefined
        """
        return self._render(variables, template, html=template.lower().endswith(_HTML_SUFFIXES))

    def respond(
        self,
        variables: Mapping[str, Any],
        Body: str | None = None,
        Html: str | None = None,
        **headers: str | list[str],
    ) -> MailResponse:
        """A message whose text part is the template ``Body`` and HTML part ``Html``.

        Lamson's signature. ``To``, ``From``, ``Subject``, ``Cc`` and ``Bcc`` are the
        message's fields; any other keyword is a header, ``_`` standing for ``-``
        (``Reply_To="help@example.com"``). Header values are used as given: unlike
        Lamson they are not ``%``-formatted with ``variables``, so a subject quoted from
        a sender (``"50% off"``) cannot break the reply; use an f-string.

        ``Body`` is always rendered as text (never escaped) and ``Html`` as HTML
        (autoescaped), whatever their names.

        Raises:
            TypeError: neither ``Body`` nor ``Html`` given.
            jinja2.TemplateNotFound: a template is missing.
            jinja2.UndefinedError: a template uses a variable not in ``variables``.

        Example:
            >>> import tempfile, pathlib
            >>> d = pathlib.Path(tempfile.mkdtemp())
            >>> _ = (d / "ok.msg").write_text("Posted: {{ title }}")
            >>> m = View(d).respond({"title": "<b>"}, "ok.msg", To="a@x", Reply_To="h@x")
            >>> m.body, m["Reply-To"]
            ('Posted: <b>', 'h@x')
        """
        if Body is None and Html is None:
            raise TypeError("respond() needs a Body or an Html template")
        fields: dict[str, Any] = {k: v for k, v in headers.items() if k in _FIELDS}
        extra = {
            name.replace("_", "-"): value if isinstance(value, str) else ", ".join(value)
            for name, value in headers.items()
            if name not in _FIELDS
        }
        message = MailResponse(
            Body="" if Body is None else self._render(variables, Body, html=False),
            Html=None if Html is None else self._render(variables, Html, html=True),
            headers=extra,
            **fields,
        )
        return message

    def _render(self, variables: Mapping[str, Any], template: str, *, html: bool) -> str:
        from jinja2 import TemplateNotFound  # already imported by environment()

        environment = self.environment(html=html)
        try:
            compiled = environment.get_template(template)
        except TemplateNotFound:
            # Jinja2's message is the bare name; say where it was looked for.
            raise TemplateNotFound(
                template, f"template {template!r} not found in {self.templates}"
            ) from None
        return compiled.render(variables)


def _environments(directory: Path) -> tuple[jinja2.Environment, jinja2.Environment]:
    """The text and HTML environments of a template directory (one shared loader)."""
    import jinja2

    text = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        # Parsed once per process: no stat of the file per render, nothing ever evicted.
        auto_reload=False,
        cache_size=-1,
        # A mail body's last line ends with a newline; Jinja2 drops it by default.
        keep_trailing_newline=True,
    )
    return text, text.overlay(autoescape=True)


# A context variable, not a global: cli.main activates the view of its settings, and the
# tasks of serve and worker inherit it (as the relay's).
_ACTIVE: contextvars.ContextVar[View | None] = contextvars.ContextVar(
    "maildefer_view", default=None
)


def current_view() -> View:
    """The view active in this context, else the fallback for scripts and tests.

    The fallback is ``app/templates`` of the working directory if it exists, else the
    ``templates`` folder of the importable ``app`` package (a test that runs the
    project's handlers from a temporary directory), else ``app/templates`` again (so
    that a missing template names it). One :class:`View` per directory is kept, so
    templates are still parsed once.

    Example:
        >>> with View("/srv/blog/templates").active():
        ...     current_view().templates.name
        'templates'
    """
    view = _ACTIVE.get()
    return view if view is not None else _fallback(_fallback_directory())


def _fallback_directory() -> Path:
    here = Path.cwd() / DEFAULT_TEMPLATES
    if here.is_dir():
        return here
    try:
        spec = importlib.util.find_spec("app")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "templates"
        if candidate.is_dir():
            return candidate
    return here


@functools.lru_cache(maxsize=16)
def _fallback(directory: Path) -> View:
    # Memoized, not a global: without an active view, the same directory must still give
    # the same View (and its parsed templates) on every call.
    return View(directory)


def render(variables: Mapping[str, Any], template: str) -> str:
    """Render one template of the current view (Lamson's ``view.render``).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "count.msg").write_text("{{ n }} posts")
        >>> with View(d).active():
        ...     render({"n": 2}, "count.msg")
        '2 posts'
    """
    return current_view().render(variables, template)


def respond(
    variables: Mapping[str, Any],
    Body: str | None = None,
    Html: str | None = None,
    **headers: str | list[str],
) -> MailResponse:
    """A :class:`~maildefer.mail.MailResponse` from templates of the current view.

    See :meth:`View.respond`. In a handler::

        msg = view.respond(locals(), "page_ready.msg", Html="page_ready.html",
                           From="noreply@example.com", To=message.mail_from,
                           Subject="Your page is ready")
        await Queue("run/outbox").push(msg)

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "ready.msg").write_text("{{ page }} is ready\\n")
        >>> with View(d).active():
        ...     msg = respond({"page": "/a"}, "ready.msg", To="ann@x.org", Subject="Ready")
        >>> msg.body, msg.to
        ('/a is ready\\n', ['ann@x.org'])
    """
    return current_view().respond(variables, Body, Html, **headers)
