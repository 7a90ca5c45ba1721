"""``maildefer gen DIR``: a new project, laid out like the example (Lamson's ``gen``).

Copies the example blog project, the handlers (``app/handlers/posting.py``,
``app/handlers/index.py``), the templates of the posting handler's reply
(``app/templates/``), ``config/settings.toml`` and the systemd units, into a new
directory, ready for ``python -m maildefer serve`` from there, with its tests
(``tests/test_posting.py``, ``tests/test_index.py`` and ``pytest.ini``, kept in the
example as ``app/project_tests/``) written with the fixtures of ``maildefer[testing]``:
``python -m pytest`` passes there as generated. The example comes from the
installed package (a wheel carries it as ``maildefer/_project``) or, in a source checkout,
from the repository root, so there is one copy of it to keep right.

Example:
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "blog"
    >>> sorted(p.name for p in generate(target))[:3]
    ['.gitignore', '__init__.py', '__init__.py']
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from maildefer.errors import ConfigError
from maildefer.settings import Settings

# What a project is made of, relative to the example's root.
FILES = (
    "app/__init__.py",
    "app/handlers/__init__.py",
    "app/handlers/posting.py",
    "app/handlers/index.py",
    "app/templates/post_received.msg",
    "app/templates/post_received.html",
    "config/settings.toml",
    "config/systemd/maildefer.service",
    "config/systemd/maildefer.socket",
    "config/systemd/maildefer-worker@.service",
    "config/systemd/maildefer.target",
    "app/project_tests/pytest.ini",
    "app/project_tests/test_posting.py",
    "app/project_tests/test_index.py",
)
# Where a file of the example goes in the new project, when not at the same place: the
# example keeps its tests apart (the repository's tests/ are maildefer's own).
MOVED = {
    "app/project_tests/pytest.ini": "pytest.ini",
    "app/project_tests/test_posting.py": "tests/test_posting.py",
    "app/project_tests/test_index.py": "tests/test_index.py",
}

GITIGNORE = "run/\n.venv/\n__pycache__/\n"


def example_root() -> Path:
    """Where the example project's files are: in the package, or the source checkout.

    Raises:
        ConfigError: neither has them (a broken installation).

    Example:
        >>> (example_root() / "config" / "settings.toml").exists()
        True
    """
    package = Path(__file__).resolve().parent.parent  # maildefer/, from maildefer/cli/
    for root in (package / "_project", package.parent):
        if all((root / name).is_file() for name in FILES):
            return root
    raise ConfigError("the example project is missing from this installation")


def generate(target: Path) -> list[Path]:
    """Create a new project in ``target`` (which must not exist or be empty).

    Returns:
        The files written.

    Raises:
        ConfigError: ``target`` exists and is not an empty directory.

    Example:
        >>> import tempfile, pathlib
        >>> files = generate(pathlib.Path(tempfile.mkdtemp()) / "p")
        >>> any(f.name == "settings.toml" for f in files)
        True
    """
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"gen: {target} exists and is not empty")
    source = example_root()
    written: list[Path] = []
    for name in FILES:
        dest = target / MOVED.get(name, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, dest)
        written.append(dest)
    ignore = target / ".gitignore"
    ignore.write_text(GITIGNORE)
    written.append(ignore)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``maildefer gen``.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["blog"]).dir
        PosixPath('blog')
    """
    parser.add_argument("dir", type=Path, help="the new project's directory")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Create the project and say what to do next.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()) / "p"
        >>> run(argparse.Namespace(dir=d), Settings())  # doctest: +ELLIPSIS
        created .../p (15 files); next:
        ...
        0
    """
    files = generate(args.dir)
    print(f"created {args.dir} ({len(files)} files); next:")
    print(f"  cd {args.dir}")
    print("  python -m maildefer routes            # what the handlers answer")
    print("  python -m maildefer serve             # SMTP on 127.0.0.1:8823")
    print("  python -m maildefer worker --queue posts")
    print("  python -m pytest                      # its tests (pip install 'maildefer[testing]')")
    return 0
