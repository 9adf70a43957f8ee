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

# Every tier runs on two xdist workers. The unit tier's tests are independent; in the tiers that use Ray
# each worker starts a Ray of its own and the work units are tests, modules or the users of one shared
# fixture (tests/conftest.py), the longest handed out first; tests marked serial run alone afterwards.
# Each run reports; any failing fails the target (pytest's 5, "no test selected", is not a failure:
# PYTEST_ARGS may name one tier's files).
PYTEST := $(VENV)/bin/python -m pytest
RUN = $(PYTEST) $(1) $(PYTEST_ARGS) || [ $$? -eq 5 ] || rc=1
RAY_TIERS = -n 2 --dist loadgroup --no-loadscope-reorder

test: $(STAMP)
	@rc=0; $(call RUN,-m unit -n 2 --durations=10); \
	$(call RUN,-m "(integration or system) and not serial" $(RAY_TIERS) --durations=25); \
	$(call RUN,-m "(integration or system) and serial" --durations=5); exit $$rc

test-fast: $(STAMP)
	@rc=0; $(call RUN,-m unit -n 2 --durations=10); \
	$(call RUN,-m "integration and not serial" $(RAY_TIERS) --durations=10); \
	$(call RUN,-m "integration and serial" --durations=5); exit $$rc

test-unit: $(STAMP)
	@rc=0; $(call RUN,-m unit -n 2); exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf work .pytest_cache
