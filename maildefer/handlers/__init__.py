"""Ready-made handler modules, named in settings like an application's own.

:mod:`maildefer.handlers.outbox` relays each message of a queue through ``[relay]``
(``handlers = ["maildefer.handlers.outbox"]``; ``maildefer.outbox`` is the same module).

Example:
    >>> from maildefer import Router
    >>> router = Router.from_modules(["maildefer.outbox"])  # the 0.1 name still loads
    >>> [h.qualified for r in router.routes() for h in r.handlers]
    ['maildefer.handlers.outbox.START']
"""
