"""Make the separate bench venv for salmon-mail (``bench/.venv-salmon/``), never a project dep.

salmon-mail is only a contender in the benchmarks: it lives in its own venv, created on
first use with ``python -m venv`` and ``pip install salmon-mail`` (then older releases if
the latest does not install on this Python), and its code runs only in that venv's
interpreter, as a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parent / ".venv-salmon"
# Newest first: the first that installs and imports wins.
CANDIDATES = ("salmon-mail", "salmon-mail<3.3", "salmon-mail<3.2")
CHECK = "import salmon, salmon.queue, salmon.server, salmon.routing; print(salmon.__version__)"


def _python() -> Path:
    return VENV / "bin" / "python"


def _works() -> str | None:
    """The installed salmon-mail version, or None when it does not import."""
    if not _python().exists():
        return None
    proc = subprocess.run(
        [str(_python()), "-c", CHECK], capture_output=True, text=True, check=False
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure() -> tuple[Path | None, str]:
    """The salmon venv's python (creating the venv if needed) and a note on what happened.

    Returns ``(None, reason)`` when nothing installs, so a bench can report it as skipped.

    Example:
        As ``bench_salmon.py`` uses it (it installs packages, so it is no doctest)::

            python, note = ensure()
            if python is None:
                print(json.dumps({"bench": "salmon", "skipped": note}))
    """
    version = _works()
    if version:
        return _python(), f"salmon-mail {version}"
    if not _python().exists():
        # The base interpreter, not the project venv's: the two must not share packages.
        base = getattr(sys, "_base_executable", sys.executable)
        made = subprocess.run(
            [base, "-m", "venv", str(VENV)], capture_output=True, text=True, check=False
        )
        if made.returncode != 0:
            return None, f"python -m venv failed: {made.stderr.strip()[-300:]}"
    errors = []
    for spec in CANDIDATES:
        print(f"installing {spec} into {VENV}", file=sys.stderr, flush=True)
        pip = subprocess.run(
            [str(_python()), "-m", "pip", "install", "--quiet", spec],
            capture_output=True,
            text=True,
            check=False,
        )
        version = _works()
        if pip.returncode == 0 and version:
            return _python(), f"salmon-mail {version}"
        errors.append(f"{spec}: {pip.stderr.strip()[-200:]}")
    return None, "salmon-mail did not install: " + " | ".join(errors)


if __name__ == "__main__":
    found, what = ensure()
    print(found or "", what)
