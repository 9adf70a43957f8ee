# lmforge: `make demo` runs the end-to-end demo, `make test` runs the test suite.
# Both create .venv on first use (see .ci/install.sh) and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.lmforge-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml .ci/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash .ci/install.sh
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmforge run configs/demo.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf work .pytest_cache
