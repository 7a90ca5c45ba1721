"""The package layout, checked statically (AST only, nothing of maildefer is imported).

These are the acceptance checks of the layout described in docs/architecture.md:

* no import cycle among maildefer's modules, counting every import (top-level,
  function-local and under ``TYPE_CHECKING``: a cycle that only works because one side
  imports late is still two modules that cannot be understood apart);
* the folder rules: a folder imports only from the folders below it;
* aiosmtpd's private members are used in one module only, ``maildefer/smtp/session.py``,
  which is pinned by the differential tests and by the upper bound on aiosmtpd;
* no module over 600 lines;
* ``pyproject.toml`` pins aiosmtpd with an upper bound.

Every failure names the offending module(s), so a message alone says what to fix.
"""

from __future__ import annotations

import ast
import asyncio
import re
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "maildefer"
MAX_LINES = 600

# -- the layers (docs/architecture.md, "The folders") -----------------------------------------

CORE = frozenset(
    f"maildefer.{name}"
    for name in (
        "errors",
        "logs",
        "loops",
        "settings",
        "mail",
        "state",
        "routing",
        "routes",
        "lifespan",
        "relay",
        "view",  # handlers render replies with it, so it is core
        "reply",
        "auth",  # what handlers read (message.auth, @authenticated); no DNS
    )
)
# What each layer may import, besides itself. "queue", "ops"... stand for every module of
# that folder; "worker-queue" is the part of the queue folder the worker may see: the
# Protocol and the settings adapter, never a concrete backend (each feeds its own claims).
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset({"core"}),
    # maildefer/__init__.py: the names an application imports (the public contract), which
    # include Queue.
    "facade": frozenset({"core", "queue"}),
    "queue": frozenset({"core", "queue"}),
    "ops": frozenset({"core", "queue", "ops"}),
    "smtp": frozenset({"core", "queue", "ops", "smtp"}),
    "worker": frozenset({"core", "ops", "worker-queue"}),
    "handlers": frozenset({"core", "queue", "handlers"}),
    # maildefer.testing (the pytest plugin) runs the real server, worker and queues for an
    # application's tests: anything but the CLI, and nothing but tests imports it.
    "testing": frozenset({"core", "facade", "queue", "ops", "smtp", "worker", "handlers"}),
    "cli": frozenset({"*"}),
}
WORKER_QUEUE = frozenset({"maildefer.queue", "maildefer.queue.backend", "maildefer.queue.config"})


def layer(module: str) -> str | None:
    """The layer a maildefer module belongs to, or None for a module no rule knows."""
    if module in CORE:
        return "core"
    if module == "maildefer":
        return "facade"
    if module == "maildefer.worker":
        return "worker"
    # maildefer.outbox is the 0.1 name of maildefer.handlers.outbox (an alias module).
    if module == "maildefer.outbox":
        return "handlers"
    if module == "maildefer.__main__":
        return "cli"
    if module == "maildefer.testing" or module.startswith("maildefer.testing."):
        return "testing"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in {"queue", "ops", "smtp", "handlers", "cli"}:
        return parts[1]
    return None


def allowed(importer: str, imported: str) -> bool:
    """Whether the folder rules let ``importer`` import ``imported``."""
    mine, theirs = layer(importer), layer(imported)
    assert mine is not None and theirs is not None
    rules = ALLOWED[mine]
    if "*" in rules or theirs == mine:
        return True
    if "worker-queue" in rules and imported in WORKER_QUEUE:
        return True
    return theirs in rules


# -- reading the package ------------------------------------------------------------------------


@cache
def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


@cache
def tree(module: str) -> ast.Module:
    path = modules()[module]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def rel(module: str) -> str:
    return modules()[module].relative_to(ROOT).as_posix()


def _resolve_relative(module: str, node: ast.ImportFrom) -> str:
    """The absolute name ``from .x import y`` refers to, inside ``module``."""
    is_package = modules()[module].name == "__init__.py"
    base = module.split(".")
    # In a package's __init__, "." is the package itself; in a module, its parent.
    drop = node.level - 1 if is_package else node.level
    base = base[: len(base) - drop] if drop else base
    return ".".join([*base, *(node.module.split(".") if node.module else [])])


def imports(module: str, module_tree: ast.Module | None = None) -> Iterator[tuple[str, int]]:
    """Every maildefer module that ``module`` imports, with the line, wherever it sits.

    ``ast.walk`` reaches function bodies and ``if TYPE_CHECKING:`` blocks alike.
    ``from maildefer.x import y`` is an import of ``maildefer.x.y`` when that is a module,
    else of ``maildefer.x``.
    """
    known = modules()
    for node in ast.walk(module_tree or tree(module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "maildefer" or alias.name.startswith("maildefer."):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_relative(module, node) if node.level else (node.module or "")
            if source != "maildefer" and not source.startswith("maildefer."):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                yield (submodule if submodule in known else source), node.lineno


@cache
def graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line importing it}; self-imports left out."""
    edges: dict[str, dict[str, int]] = {}
    for module in modules():
        targets = edges.setdefault(module, {})
        for target, line in imports(module):
            if target != module and target in modules():
                targets.setdefault(target, line)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


# -- the checks ---------------------------------------------------------------------------------


def test_the_graph_sees_every_kind_of_import() -> None:
    # The checks below are only as good as the import finder: pin it on a known shape.
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import maildefer.errors\n"
        "import json\n"
        "from maildefer import mail\n"
        "from maildefer.routing import Router\n"
        "if TYPE_CHECKING:\n"
        "    from maildefer.settings import Settings\n"
        "def f():\n"
        "    from maildefer.state import MemoryStateStore\n"
        "    from . import logs\n"
        "    from .queue import backend\n"
    )
    found = {target for target, _ in imports("maildefer.relay", ast.parse(source))}
    assert found == {
        "maildefer.errors",
        "maildefer.mail",
        "maildefer.routing",
        "maildefer.settings",
        "maildefer.state",
        "maildefer.logs",
        "maildefer.queue.backend",
    }


def test_no_import_cycles() -> None:
    edges = graph()
    found = cycles(edges)
    lines = []
    for component in found:
        members = set(component)
        lines.append(
            "cycle among "
            + ", ".join(rel(m) for m in component)
            + ": "
            + "; ".join(
                f"{rel(m)}:{line} imports {t}"
                for m in component
                for t, line in sorted(edges[m].items())
                if t in members
            )
        )
    assert not found, "import cycles (every import counts):\n  " + "\n  ".join(lines)


def test_every_module_belongs_to_a_layer() -> None:
    unknown = sorted(rel(m) for m in modules() if layer(m) is None)
    assert not unknown, (
        f"modules no layer rule covers: {unknown}; put them in a folder or add them to CORE "
        "in tests/test_layout.py and docs/architecture.md"
    )


def test_folders_import_only_from_below() -> None:
    broken = [
        f"{rel(module)}:{line} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in sorted(graph().items())
        if layer(module) is not None
        for target, line in sorted(targets.items())
        if layer(target) is not None and not allowed(module, target)
    ]
    assert not broken, "imports against the folder rules:\n  " + "\n  ".join(broken)


BACKEND_PACKAGES = ("maildefer.queue.maildir", "maildefer.queue.amqp")


def backend_of(module: str) -> str | None:
    """The backend package a module belongs to, if it is part of one."""
    for package in BACKEND_PACKAGES:
        if module == package or module.startswith(package + "."):
            return package
    return None


def test_no_backend_imports_another() -> None:
    # What backends share (keys, the envelope, the Protocol) lives beside them in queue/,
    # so a third backend can be added, or one removed, without touching the others.
    crossed = [
        f"{rel(module)}:{line} imports {target}"
        for module, targets in sorted(graph().items())
        if backend_of(module) is not None
        for target, line in sorted(targets.items())
        if backend_of(target) not in (None, backend_of(module))
    ]
    assert not crossed, "a queue backend imports another:\n  " + "\n  ".join(crossed)


@cache
def aiosmtpd_private_names() -> frozenset[str]:
    """The single-underscore members of aiosmtpd's SMTP and LMTP classes and instances."""
    from aiosmtpd.lmtp import LMTP
    from aiosmtpd.smtp import SMTP

    async def instance_names() -> set[str]:
        # Some attributes exist only on an instance (set in __init__, which may want a loop).
        return set(vars(SMTP(handler=object()))) | set(vars(LMTP(handler=object())))

    names = set(dir(SMTP)) | set(dir(LMTP)) | asyncio.run(instance_names())
    return frozenset(n for n in names if re.fullmatch(r"_[^_].*", n) and not n.endswith("__"))


def _imports_aiosmtpd(module_tree: ast.Module) -> set[str]:
    """The local names bound to aiosmtpd (its classes or modules); empty when not imported."""
    bound: set[str] = set()
    for node in ast.walk(module_tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "aiosmtpd":
            bound.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "aiosmtpd":
                    bound.add((alias.asname or alias.name).split(".")[0])
    return bound


def _base_names(cls: ast.ClassDef) -> set[str]:
    names = set()
    for base in cls.bases:
        while isinstance(base, ast.Attribute):
            base = base.value
        if isinstance(base, ast.Name):
            names.add(base.id)
    return names


def private_aiosmtpd_uses(module: str, module_tree: ast.Module | None = None) -> list[str]:
    """Where ``module`` touches an aiosmtpd private member: ``line: name``.

    A module counts only if it imports aiosmtpd. An access ``x._name`` counts when
    ``_name`` is one of aiosmtpd's private members, except ``self._name`` / ``cls._name``
    inside a class of this module that does not derive from an aiosmtpd class (the
    module's own attribute that happens to share a name, e.g. ``_loop``). Defining or
    overriding such a member in a class derived from aiosmtpd counts too.
    """
    module_tree = module_tree or tree(module)
    bound = _imports_aiosmtpd(module_tree)
    if not bound:
        return []
    private = aiosmtpd_private_names()
    classes = [n for n in ast.walk(module_tree) if isinstance(n, ast.ClassDef)]
    derived: set[str] = set()
    changed = True
    while changed:  # a subclass of a subclass of SMTP is still aiosmtpd's object
        changed = False
        for cls in classes:
            if cls.name not in derived and _base_names(cls) & (bound | derived):
                derived.add(cls.name)
                changed = True
    own_accesses: set[int] = set()
    uses: list[str] = []
    for cls in classes:
        if cls.name in derived:
            for item in cls.body:
                if (
                    isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and item.name in private
                ):
                    uses.append(f"{item.lineno}: defines {cls.name}.{item.name}")
            continue
        for node in ast.walk(cls):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in {"self", "cls"}
            ):
                own_accesses.add(id(node))
    for node in ast.walk(module_tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in private
            and id(node) not in own_accesses
        ):
            uses.append(f"{node.lineno}: .{node.attr}")
    return sorted(uses, key=lambda u: int(u.split(":")[0]))


def test_the_private_use_finder() -> None:
    source = (
        "from aiosmtpd.smtp import SMTP\n"
        "class Tracker:\n"
        "    def __init__(self):\n"
        "        self._loop = None\n"  # its own attribute: not aiosmtpd's
        "    def kick(self, server):\n"
        "        server._timeout_handle.cancel()\n"  # an aiosmtpd object's: counts
        "class Session(SMTP):\n"
        "    async def _handle_client(self):\n"  # an override: counts
        "        self._reset_timeout()\n"  # counts
        "class Inner(Session):\n"
        "    def f(self):\n"
        "        return self._loop\n"  # a subclass of a subclass: counts
    )
    uses = private_aiosmtpd_uses("maildefer.smtp.session", ast.parse(source))
    assert uses == [
        "6: ._timeout_handle",
        "8: defines Session._handle_client",
        "9: ._reset_timeout",
        "12: ._loop",
    ]
    assert private_aiosmtpd_uses("maildefer.smtp.session", ast.parse("x._loop\n")) == []


def test_aiosmtpd_internals_only_in_smtp_session() -> None:
    private = aiosmtpd_private_names()
    # The collection itself must work, or the check below would pass on nothing.
    assert {"_handle_client", "_smtp_methods", "_timeout_handle"} <= private
    users = {rel(m): uses for m in modules() if (uses := private_aiosmtpd_uses(m))}
    details = "\n  ".join(f"{path}: {', '.join(uses)}" for path, uses in sorted(users.items()))
    assert set(users) == {"maildefer/smtp/session.py"}, (
        "aiosmtpd's private members must be used in maildefer/smtp/session.py only "
        f"(the module pinned by the differential tests); found in:\n  {details}"
    )


def test_no_module_over_600_lines() -> None:
    sizes = {
        rel(m): len(path.read_text(encoding="utf-8").splitlines()) for m, path in modules().items()
    }
    too_big = {path: n for path, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not too_big, f"modules over {MAX_LINES} lines (split them by purpose): {too_big}"


def test_aiosmtpd_is_pinned_with_an_upper_bound() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = [d for d in project["dependencies"] if re.match(r"aiosmtpd\b", d)]
    assert len(pins) == 1, f"pyproject.toml: one aiosmtpd requirement expected, got {pins}"
    # smtp/session.py relies on internals checked against one minor series.
    assert re.search(r"<\s*\d", pins[0]), (
        f"pyproject.toml: aiosmtpd needs an upper bound: {pins[0]!r}"
    )
    assert re.search(r">=\s*1\.4\.6", pins[0]), (
        f"pyproject.toml: aiosmtpd must stay >= 1.4.6 (CVE-2024-27305, CVE-2024-34083): {pins[0]!r}"
    )


@pytest.mark.parametrize(
    ("importer", "imported", "ok"),
    [
        ("maildefer.routing", "maildefer.mail", True),
        ("maildefer.routing", "maildefer.queue", False),
        ("maildefer.queue.maildir.queue", "maildefer.queue.envelope", True),
        ("maildefer.queue.config", "maildefer.ops.metrics", False),
        ("maildefer.worker", "maildefer.queue.backend", True),
        ("maildefer.worker", "maildefer.queue.maildir", False),
        ("maildefer.worker", "maildefer.smtp.server", False),
        ("maildefer.smtp.server", "maildefer.ops.systemd", True),
        ("maildefer.ops.metrics", "maildefer.smtp.session", False),
        ("maildefer.handlers.outbox", "maildefer.relay", True),
        ("maildefer.cli.serve", "maildefer.smtp.server", True),
        ("maildefer.testing.kit", "maildefer.smtp.server", True),
        ("maildefer.testing.kit", "maildefer.worker", True),
        ("maildefer.testing.plugin", "maildefer.cli", False),
        ("maildefer.routing", "maildefer.testing", False),
        ("maildefer.worker", "maildefer.testing.kit", False),
    ],
)
def test_the_folder_rules_themselves(importer: str, imported: str, ok: bool) -> None:
    assert allowed(importer, imported) is ok
