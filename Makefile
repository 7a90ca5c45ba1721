# maildefer: every target bootstraps what it needs, from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv system-deps bench-deps run test lint format bench chaos clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian's systemd package brings systemd-analyze and systemd-socket-activate for the unit
# and socket-activation tests (no running systemd is needed); Debian's postfix package the
# real Postfix that tests/test_foreign_maildir.py starts as a private instance. Installed
# only as root with apt; elsewhere, or when apt fails (no network), those tests skip with a
# reason and this target still succeeds. Postfix is installed as "No configuration" (no
# /etc/postfix/main.cf), so the system's own daemon is never started.
system-deps:
	@if ! command -v systemd-socket-activate >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's systemd package (for systemd-analyze, systemd-socket-activate)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null \
			|| echo "could not install systemd: the unit and socket-activation tests will skip"; \
	fi
	@if ! dpkg -s postfix 2>/dev/null | grep -q '^Status: install ok installed' && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's postfix package (for the foreign-maildir tests; the daemon is not started)"; \
		{ apt-get update -qq && echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null; } \
			|| echo "could not install postfix: the real-Postfix tests will skip"; \
	fi
	@if ! dpkg -s rabbitmq-server 2>/dev/null | grep -q '^Status: install ok installed' && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's rabbitmq-server package (the broker tests; the cluster tests start private nodes of it on loopback)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null; } \
			|| echo "could not install rabbitmq-server: the broker, cluster and broker-fault tests will skip"; \
	fi

# Postfix's smtp-source load generator and smtp-sink (the native ceiling) for make bench.
bench-deps:
	@if ! [ -x /usr/sbin/smtp-source ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's postfix package for smtp-source/smtp-sink (the daemon is not started)"; \
		apt-get update -qq && echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null; \
	fi

# The example project: serve on 127.0.0.1:8823, a worker per queue, and `log` on the relay
# port (8825) standing in for an outgoing mail server: replies land in run/relayed.
run: venv
	@mkdir -p run
	@echo "serve on 127.0.0.1:8823, workers on run/posts and run/outbox, dev relay on 8825 -> run/relayed; Ctrl-C stops all"
	@trap 'trap - INT TERM EXIT; kill $$(jobs -p) 2>/dev/null; wait' INT TERM EXIT; \
	$(PY) -m maildefer log --port 8825 --queue run/relayed & \
	$(PY) -m maildefer worker --queue posts & \
	$(PY) -m maildefer worker --queue outbox & \
	$(PY) -m maildefer serve

test: venv system-deps
	$(PY) -m pytest -q --doctest-modules maildefer tests

lint: venv
	$(VENV)/bin/ruff check maildefer tests bench app
	$(VENV)/bin/ruff format --check maildefer tests bench app
	$(VENV)/bin/mypy --strict maildefer

format: venv
	$(VENV)/bin/ruff format maildefer tests bench app
	$(VENV)/bin/ruff check --fix maildefer tests bench app

bench: venv bench-deps
	$(PY) bench/run.py

chaos: venv
	CHAOS_PROFILE=long $(PY) -m pytest -q -p no:cacheprovider -m chaos tests/chaos tests/test_amqp_cluster.py -s

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
