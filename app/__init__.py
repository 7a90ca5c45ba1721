"""The example maildefer project: the blog of Lamson's "defer to queue" tutorial."""

from __future__ import annotations
