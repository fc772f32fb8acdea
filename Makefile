# The README's two commands: `make up` (the whole stack on embedded defaults) and
# `make test` (lint + the whole test suite). Both set up the virtualenv first.
VENV ?= .venv
PYTHON ?= python3
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install up demo test lint faults soak bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Flags for camfleet up, e.g. `make up ARGS="--prefect-port 4300 --mqtt-port 1884"`.
ARGS ?=

up: install
	camfleet up $(ARGS)

demo: install
	camfleet up --demo $(ARGS)

lint: install
	ruff check .
	ruff format --check .

# Two workers, whole files each (module fixtures stay in one process); every worker
# starts its own PostgreSQL, Mosquitto and Prefect server on free ports. Most tests wait
# on services, so two workers take ~2/3 of one's time even on 2 cores.
test: lint
	pytest -q -m "not slow" -n 2 --dist loadfile

# The long fault-injection suite, then the 10-minute soak (issue #9); not part of
# `make test`, which runs the short fault tests. Each prints its table.
faults: install
	pytest -q -s -m slow
	python bench/soak.py

soak: install
	python bench/soak.py

bench: install
	for b in bench/bench_*.py; do echo "== $$b"; python $$b || exit 1; done

clean:
	rm -rf $(VENV) .camfleet .pytest_cache .hypothesis
