# Two commands set everything up on a fresh machine: `make serve` and `make test`.
#
#   make serve                          serve on 127.0.0.1:8000, data in ./data
#   make serve PORT=8001 DATA=./other   another port and data directory (HOST too)
#   make test                           lint + types + tests with branch coverage (what CI runs)
#   make bench                          the core-server benchmark + naive vs Trellis (bench/run.py)
#   make bench-scale                    one node at scale: 1k/5k/10k runs in flight (bench/scale.py)
#   make bench-quick                    the same at small sizes, under a minute
#   make bench-postgres                 the server on PostgreSQL against SQLite (a local server)
#   make bench-nodes                    runs/s with 1, 2 and 3 nodes on one PostgreSQL database
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two install steps: serving needs only the package and its declared dependencies; the
# test tools come on top, for `make test` (so `make serve` cannot hide a missing dependency).
INSTALLED := $(VENV)/.installed
TEST_INSTALLED := $(VENV)/.installed-test

HOST ?= 127.0.0.1
PORT ?= 8000
DATA ?= ./data

.PHONY: serve test lint types pytest bench bench-scale bench-quick bench-postgres bench-nodes clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(INSTALLED)

$(TEST_INSTALLED): $(INSTALLED)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(TEST_INSTALLED)

serve: $(INSTALLED)
	$(BIN)/python -m app serve --host $(HOST) --port $(PORT) --data-dir $(DATA)

test: lint types pytest

lint: $(TEST_INSTALLED)
	$(BIN)/ruff check app tests bench examples
	$(BIN)/ruff format --check app tests bench examples

types: $(TEST_INSTALLED)
	$(BIN)/mypy

# Branch coverage of app/ (subprocesses included); the floor is fail_under in pyproject.toml.
pytest: $(TEST_INSTALLED)
	$(BIN)/pytest --cov --cov-report=term --durations=20

bench: $(INSTALLED)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run.py

bench-scale: $(INSTALLED)
	$(BIN)/python bench/scale.py

bench-postgres: $(INSTALLED)
	$(BIN)/python bench/postgres_vs_sqlite.py

bench-nodes: $(INSTALLED)
	$(BIN)/python bench/cluster_nodes.py

bench-quick: $(INSTALLED)
	$(BIN)/python bench/scale.py --quick
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*
