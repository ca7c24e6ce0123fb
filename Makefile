# gunicorn-ext developer tasks. `make test` works on a fresh Debian machine (as root).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# policy-rc.d (exit 101) keeps apt from starting the distro's nginx/redis/prometheus services;
# tests start their own instances on free ports.
# Debian puts nginx (and sometimes redis-server) in /usr/sbin, often off a user's PATH.
export PATH := $(PATH):/usr/sbin:/sbin

# The oldest Gunicorn pyproject.toml allows ("gunicorn>=25,<28" -> 25), in its own venv:
# `make test-oldest` runs the tests that drive a real Gunicorn on it (`make test` runs
# everything on the newest, which is what `make install` resolves).
OLDEST_VENV := .venv-gunicorn-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.installed
GUNICORN_OLDEST = $(shell sed -n 's/^ *"gunicorn>=\([0-9.]*\)[,"].*/\1/p' pyproject.toml)
OLDEST_TESTS := tests/test_versions.py tests/test_lifecycle.py tests/test_ipc.py \
  tests/test_dispatch.py tests/test_deadlines.py tests/test_worker_ports.py \
  tests/test_sticky.py tests/test_example.py tests/test_supervisor.py tests/test_hup.py \
  tests/test_graceful_stop.py

JS     := tests/js
JS_STAMP := $(JS)/node_modules/.installed

.PHONY: help install bytecode system-deps js-deps lint test test-oldest settings-table run run-asgi bench bench-deps dist docs clean

help:
	@echo "make install      create $(VENV) and install gunicorn-ext with its dev extras"
	@echo "make bytecode     compile gunicorn_ext's bytecode (run and bench do it; an editable install may not)"
	@echo "make system-deps  apt-get install redis-server, nginx and prometheus if missing (root)"
	@echo "make browser-deps apt-get install chromium if missing (root; the browser test)"
	@echo "make js-deps      apt-get install nodejs and npm if missing (root); npm ci in $(JS)"
	@echo "make lint         ruff check + mypy"
	@echo "make test         install, system-deps, lint, the whole pytest suite, then test-oldest"
	@echo "make test-oldest  the real-Gunicorn tests on the oldest Gunicorn pyproject.toml allows"
	@echo "make settings-table  rewrite the README's settings table from gunicorn_ext/settings.py"
	@echo "make run          the example cluster (examples/flask_app)"
	@echo "make run-asgi     the ASGI example cluster (examples/asgi_app; WORKER_CLASS=asgi by default)"
	@echo "make bench        every bench/*.py; results in bench/results/<name>.json"
	@echo "make bench-deps   apt-get install wrk if missing (root; optional)"
	@echo "make docs         build the docs site into docs/_build/html (warnings are errors)"
	@echo "make dist         build the sdist and wheel into dist/, check them, run the example from the wheel"
	@echo "make clean        remove caches and build artefacts (keeps $(VENV))"

install: $(STAMP)

$(BIN)/python:
	@if ! $(PYTHON) -m venv $(VENV); then \
	  if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then \
	    echo "python venv support missing; installing python3-venv"; \
	    rm -rf $(VENV); \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv; \
	    $(PYTHON) -m venv $(VENV); \
	  else \
	    echo "error: '$(PYTHON) -m venv' failed; install python3-venv" >&2; exit 1; \
	  fi; \
	fi

# Re-installs only when pyproject.toml changes (or the stamp is removed).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $@

system-deps:
	@have() { command -v "$$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$$1" ] || [ -x "/usr/bin/$$1" ]; }; \
	missing=(); \
	for b in redis-server nginx; do have "$$b" || missing+=("$$b"); done; \
	have prometheus && have promtool || missing+=(prometheus); \
	if [ "$${#missing[@]}" -eq 0 ]; then echo "system-deps: redis-server, nginx and prometheus present"; exit 0; fi; \
	echo "system-deps: missing: $${missing[*]}"; \
	if [ "$$(id -u)" -ne 0 ]; then \
	  echo "error: $${missing[*]} not installed and not root; run as root:" >&2; \
	  echo "  sudo apt-get update && sudo apt-get install -y $${missing[*]}" >&2; \
	  exit 1; \
	fi; \
	if ! command -v apt-get >/dev/null; then \
	  echo "error: no apt-get; install $${missing[*]} with your package manager" >&2; exit 1; \
	fi; \
	if [ ! -e /usr/sbin/policy-rc.d ]; then \
	  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; \
	  trap 'rm -f /usr/sbin/policy-rc.d' EXIT; \
	fi; \
	apt-get update; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$${missing[@]}" </dev/null; \
	for b in redis-server nginx prometheus promtool; do have "$$b" || { echo "error: $$b still missing after apt-get" >&2; exit 1; }; done; \
	echo "system-deps: installed $${missing[*]} (tests start their own instances on free ports)"

.PHONY: browser-deps
# Headless Chromium for tests/test_browser_chat.py (Debian's package, driven over the
# DevTools protocol; no browser download from anywhere else).
browser-deps:
	@if command -v chromium >/dev/null 2>&1; then echo "browser-deps: chromium present"; exit 0; fi; \
	if [ "$$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "error: chromium not installed and not root (or no apt-get); run as root:" >&2; \
	  echo "  sudo apt-get update && sudo apt-get install -y chromium" >&2; \
	  exit 1; \
	fi; \
	echo "browser-deps: installing chromium"; \
	apt-get update; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium </dev/null; \
	command -v chromium >/dev/null || { echo "error: chromium still missing after apt-get" >&2; exit 1; }; \
	echo "browser-deps: installed chromium"

# The JavaScript clients the chat tests drive (socket.io-client, ws): exact pins in
# $(JS)/package-lock.json, installed into $(JS)/node_modules only (nothing global).
js-deps: $(JS_STAMP)

$(JS_STAMP): $(JS)/package.json $(JS)/package-lock.json
	@if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then \
	  if [ "$$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then \
	    echo "error: node and npm are needed for the chat tests; run as root:" >&2; \
	    echo "  sudo apt-get update && sudo apt-get install -y nodejs npm" >&2; \
	    exit 1; \
	  fi; \
	  echo "js-deps: installing nodejs and npm"; \
	  apt-get update; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm </dev/null; \
	fi
	cd $(JS) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install system-deps js-deps browser-deps
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory docs
	$(BIN)/pytest -q --reruns 1 --rerun-show-tracebacks -rR
	$(MAKE) --no-print-directory test-oldest

# Re-installs only when pyproject.toml changes; gunicorn_ext itself is the same editable tree.
$(OLDEST_STAMP): pyproject.toml | $(BIN)/python
	@test -n "$(GUNICORN_OLDEST)" || { echo "error: no gunicorn>=X bound in pyproject.toml" >&2; exit 1; }
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --disable-pip-version-check -q -e '.[dev]' \
	  'gunicorn==$(GUNICORN_OLDEST)'
	@touch $@

test-oldest: $(OLDEST_STAMP) system-deps
	GX_GUNICORN_EXPECT=$(GUNICORN_OLDEST) $(OLDEST_VENV)/bin/pytest -q --reruns 1 --rerun-show-tracebacks -rR -p no:cacheprovider $(OLDEST_TESTS)

# The README's settings table is checked by tests/test_settings.py; this rewrites it.
settings-table: install
	GX_WRITE_README=1 $(BIN)/pytest -q -p no:cacheprovider tests/test_settings.py -k readme

# An editable install leaves the bytecode of gunicorn_ext (and of state/, installed as
# gunicorn_ext.state) to the first import, and with PYTHONDONTWRITEBYTECODE set (as in
# many containers) every start compiles it from source instead. The compiler's freed
# buffers leave about 1.5 MB of free holes in the primary's heap, which every worker
# inherits and glibc's malloc then searches: 4.7k instructions a request under
# uvicorn-worker, measured with callgrind. A wheel install ships bytecode; this gives the
# editable tree the same (it rewrites only what is stale).
bytecode: install
	$(BIN)/python -m compileall -q gunicorn_ext state

run: bytecode
	cd examples/flask_app && ../../$(BIN)/gunicorn -c cluster_conf.py app:app

run-asgi: bytecode
	cd examples/asgi_app && ../../$(BIN)/gunicorn -c cluster_conf.py app:app

# Benchmarks are the bench/*.py scripts; helpers beside them are skipped:
# *_app.py (WSGI apps), *_conf.py (Gunicorn configs), plot*.py (plot helpers) and _*.py.
bench: bytecode system-deps bench-deps
	@mkdir -p bench/results
	@shopt -s nullglob; scripts=(); \
	for s in bench/*.py; do \
	  case "$${s##*/}" in _*|*_app.py|*_conf.py|plot*.py) continue;; esac; \
	  scripts+=("$$s"); \
	done; \
	if [ "$${#scripts[@]}" -eq 0 ]; then echo "bench: no bench/*.py scripts"; exit 0; fi; \
	failed=(); \
	for s in "$${scripts[@]}"; do \
	  echo "=== $$s"; \
	  $(BIN)/python "$$s" || failed+=("$$s"); \
	done; \
	if [ "$${#failed[@]}" -ne 0 ]; then echo "bench: FAILED: $${failed[*]}" >&2; exit 1; fi; \
	echo "bench: results in bench/results/"

# wrk is the HTTP load generator of the benchmarks; without it (not root, no apt-get)
# they fall back to a slower, bounded Python load generator, so this never fails.
bench-deps:
	@if command -v wrk >/dev/null 2>&1; then echo "bench-deps: wrk present"; exit 0; fi; \
	if [ "$$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "bench-deps: wrk missing and not root (or no apt-get); benchmarks use a Python load generator"; \
	  echo "  to install it: sudo apt-get install -y wrk"; \
	  exit 0; \
	fi; \
	echo "bench-deps: installing wrk"; \
	if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk </dev/null; }; then \
	  echo "bench-deps: apt-get install wrk failed; benchmarks use a Python load generator"; \
	fi

# Sphinx, warnings as errors; the settings reference is generated from gunicorn_ext/settings.py.
docs: install
	$(BIN)/python -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

# The sdist and wheel in dist/, checked by tests/test_dist.py (twine check, the wheel's
# files, a fresh venv outside the tree running the example). `make test` runs the same
# checks on a copy it builds itself.
dist: install system-deps
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	GX_DIST_DIR=dist $(BIN)/pytest -q -p no:cacheprovider tests/test_dist.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis $(STAMP) \
	  $(JS)/node_modules
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
