# One command runs the whole local system, one runs every check. Both set themselves up.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python

.PHONY: run test lint bench clean

$(VENV)/.installed: pyproject.toml
	@echo "make: creating $(VENV) and installing the project (first run takes a minute) ..."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

run: $(VENV)/.installed      ## the whole local stack on http://127.0.0.1:8000
	$(VENV)/bin/voicectl run

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy

test: lint                   ## lint, types, then every test (warnings are errors)
	$(PY) -m pytest

bench: $(VENV)/.installed    ## both benchmarks, JSON last (takes about two minutes)
	$(PY) bench/audio.py --json
	$(PY) bench/connect.py --json

clean:
	rm -rf $(VENV) var *.egg-info
