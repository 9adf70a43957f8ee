# lmforge: `make demo` runs the end-to-end demo, `make test` runs the test suite (every tier, the 25 slowest
# tests listed at the end), `make test-fast` its unit and integration tiers, `make test-unit` the unit tier.
# Both create .venv on first use (see .ci/install.sh) and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.lmforge-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-unit lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml .ci/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash .ci/install.sh
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmforge run configs/demo.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "unit or integration" --durations=10 $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(VENV)/bin/python -m pytest -m unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf work .pytest_cache
