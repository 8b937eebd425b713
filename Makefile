# The commands of the README: `make run` (the main job end to end, the paper's three phases at smoke size),
# `make recipe` (the main job on the measured CPU recipe) and `make test`.
PYTHON ?= python3
ARGS ?=

.PHONY: install run recipe test lint bench

# torch first, pinned, so that the CPU wheel is taken on a CPU box; the requirements'
# torch range is then already satisfied and nothing larger is pulled.
install:
	$(PYTHON) -m pip install --quiet "torch==2.13.0"
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .

run: install
	$(PYTHON) -m pipeline run $(ARGS)

recipe: install
	$(PYTHON) -m pipeline run --config configs/recipe.yaml $(ARGS)

lint: install
	$(PYTHON) -m ruff check .

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -n auto --dist loadfile --durations=25

bench: install
	for b in bench/bench_*.py; do $(PYTHON) $$b || exit 1; done
