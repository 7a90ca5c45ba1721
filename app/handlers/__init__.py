"""Handler modules: ``posting`` runs in ``serve``, ``index`` in the ``run/posts`` worker."""

from __future__ import annotations
