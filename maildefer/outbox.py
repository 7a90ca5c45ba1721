"""``maildefer.outbox``: the name settings use for :mod:`maildefer.handlers.outbox`.

Settings written for 0.1 name ``handlers = ["maildefer.outbox"]``; this module makes that
name the very same module object as :mod:`maildefer.handlers.outbox` (routes belong to
the module that defines them, so a re-export would define no route).

Example:
    >>> import maildefer.outbox, maildefer.handlers.outbox
    >>> maildefer.outbox is maildefer.handlers.outbox
    True
"""

from __future__ import annotations

import sys

from maildefer.handlers import outbox

# An alias, not a copy: the router finds the handlers of this name under their own module.
sys.modules[__name__] = outbox
