"""Collection rules for ``pytest --doctest-modules maildefer tests`` (make test)."""

# maildefer/outbox.py makes its name an alias of maildefer.handlers.outbox, whose doctests
# run under that module; collecting the alias would import one file as two modules.
collect_ignore = ["maildefer/outbox.py"]
