# Each public target sets up its own environment, so it works on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-only demo lint clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'

setup: $(PY)

test: setup
	$(MAKE) test-only

test-only:
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache out
