"""``python -m maildefer``: the command line."""

from __future__ import annotations

import sys

from maildefer.cli import main

if __name__ == "__main__":
    sys.exit(main())
