# maildefer: every target bootstraps the virtualenv it needs, from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv run serve worker test test-fast lint format bench chaos clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: venv
	$(PY) -m maildefer run

test: venv
	$(PY) -m pytest -q -m "not slow_long"

lint: venv
	$(VENV)/bin/ruff check maildefer tests bench app
	$(VENV)/bin/ruff format --check maildefer tests bench app
	$(VENV)/bin/mypy --strict maildefer

format: venv
	$(VENV)/bin/ruff format maildefer tests bench app
	$(VENV)/bin/ruff check --fix maildefer tests bench app

bench: venv
	$(PY) bench/run.py

chaos: venv
	$(PY) -m pytest -q -m chaos tests/chaos --chaos-profile=long

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
