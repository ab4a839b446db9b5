# normbench: every target sets up what it needs (virtual environment, install) itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build: this pair installs from the local disk on the project's machines (a CUDA build
# that also runs on the CPU). Override on other machines, e.g. TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: help setup demo test test-slow test-all report bench clean

help:
	@echo "make demo       the demo sweep (synthetic data, CPU, < 10 min) and its report in results/demo"
	@echo "make test       the test suite (about 10 minutes on 2 cores)"
	@echo "make test-slow  the slow tests only; make test-all: everything"
	@echo "make report EXP=<experiment>  report for runs/<experiment> into results/<experiment>"
	@echo "make bench      the performance benchmark (results/bench)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) run.py -m experiment=demo
	$(PY) scripts/report.py runs/demo --out results/demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

EXP ?= demo
report: setup
	$(PY) scripts/report.py runs/$(EXP) --out results/$(EXP)

bench: setup
	$(PY) scripts/bench.py --out results/bench

clean:
	rm -rf runs outputs multirun .pytest_cache
