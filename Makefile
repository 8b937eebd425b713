# The two commands of the README: `make run` (main job end to end) and `make test`.
PYTHON ?= python3
ARGS ?=

.PHONY: install run test lint bench

# torch first, pinned, so that the CPU wheel is taken on a CPU box; the requirements'
# torch range is then already satisfied and nothing larger is pulled.
install:
	$(PYTHON) -m pip install --quiet "torch==2.13.0"
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .

run: install
	$(PYTHON) -m pipeline run $(ARGS)

lint: install
	$(PYTHON) -m ruff check .

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -n auto --dist loadfile --durations=25

bench: install
	for b in bench/bench_*.py; do $(PYTHON) $$b || exit 1; done
