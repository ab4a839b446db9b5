# normbench: every target sets up what it needs (virtual environment, install) itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NORMBENCH := $(VENV)/bin/normbench
# The torch build: this pair installs from the local disk on the project's machines (a CUDA build
# that also runs on the CPU). Override on other machines, e.g. TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: help setup demo cifar10 cifar10-plan cifar10-grid cifar10-report cifar10-cpu test test-slow test-all report bench gpu-check gpu-bundle clean

help:
	@echo "make demo       the demo sweep (synthetic data, CPU, < 10 min) and its report in results/demo"
	@echo "make cifar10    the 30-epoch real-CIFAR-10 reproduction (hours; resumable: each finished run is"
	@echo "                committed under results/cifar10/runs and skipped by a relaunch) -> results/cifar10"
	@echo "make cifar10-plan    which cells of make cifar10 are committed, running, to train (does none)"
	@echo "make cifar10-report  the report of results/cifar10 from its committed records alone"
	@echo "make cifar10-cpu  the short (10-epoch) real-CIFAR-10 study on 2 CPU cores -> results/cifar10_cpu"
	@echo "make test       the test suite (about 10 minutes on 2 cores)"
	@echo "make test-slow  the slow tests only; make test-all: everything"
	@echo "make report EXP=<experiment>  report for runs/<experiment> into results/<experiment>"
	@echo "make bench      the performance benchmark on this machine (results/bench)"
	@echo "make gpu-check  on a CUDA machine: CUDA tests, the GPU bench rows, a short GPU sweep (< 8 min)"
	@echo "make gpu-bundle wheels + data in .gpu/ for bash scripts/gpu_check.sh on an offline GPU machine"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'   # editable: the command reads this checkout's conf/
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(NORMBENCH) train -m experiment=demo hydra/launcher=local threads=1  # 2 runs at a time, 1 thread each
	$(NORMBENCH) report runs/demo --out results/demo

# The converged reproduction on real CIFAR-10 (experiments/cifar10.yaml), in order of what it
# tells: the paper's two claims (bn, gn at 32 and 2) first, then the other batches, the other
# norms and placements, then the second seed. Every finished run is archived and committed under
# results/cifar10/runs/ as it finishes (archive_commit=true), so a session that stops loses only
# the runs in flight, and `make cifar10` on a fresh clone goes on where it stopped.
CIFAR10_ARGS = experiment=cifar10 hydra/launcher=local threads=1 archive_commit=true
cifar10: setup
	$(NORMBENCH) prepare-data
	$(MAKE) --no-print-directory cifar10-grid CIFAR10_DO="$(NORMBENCH) train -m $(CIFAR10_ARGS)"
	$(MAKE) cifar10-report

# What `make cifar10` would do now with each cell (skip it as committed, resume it, train it),
# without doing any of it: `normbench plan` on each of its sweeps.
cifar10-plan: setup
	@$(MAKE) --no-print-directory cifar10-grid CIFAR10_DO="$(NORMBENCH) plan $(CIFAR10_ARGS)"

# The grid of the reproduction, one sweep a line, in the order it runs (CIFAR10_DO: the command
# that takes each line's overrides). A sweep with a failed cell exits 1 after its other cells;
# the grid goes on to the next line all the same (hours of unattended compute are not stopped by
# one cell) and exits 1 at the end.
cifar10-grid:
	status=0; \
	$(CIFAR10_DO) seed=0 batch=32 || status=1; \
	$(CIFAR10_DO) seed=0 batch=2 || status=1; \
	$(CIFAR10_DO) seed=0 batch=16,8,4 || status=1; \
	$(CIFAR10_DO) seed=0 norm=ln,in batch=32,2 || status=1; \
	$(CIFAR10_DO) seed=0 placement=after batch=32,2 || status=1; \
	$(CIFAR10_DO) seed=1 || status=1; \
	exit $$status

cifar10-report: setup
	$(NORMBENCH) report results/cifar10/runs --out results/cifar10 --notes results/cifar10/NOTES.md

# The paper's Figure 1 on real CIFAR-10 (../shared/data/cifar10-jpeg.tar.gz), sized for 2 CPU
# cores: experiments/cifar10_cpu.yaml, 2 runs at a time with one torch thread each. One seed at a
# time, so an interrupted session leaves whole seeds; relaunching skips what finished.
SEEDS ?= 0 1
cifar10-cpu: setup
	$(NORMBENCH) prepare-data
	for seed in $(SEEDS); do \
	  $(NORMBENCH) train -m experiment=cifar10_cpu hydra/launcher=local threads=1 seed=$$seed && \
	  $(NORMBENCH) train -m experiment=cifar10_cpu hydra/launcher=local threads=1 seed=$$seed \
	    norm=bn,gn8 batch=32,2 placement=after || exit 1; \
	done
	# control: bn and gn at batch 32 and 2 with 3x the epochs (3x the SGD steps), its own folder
	$(NORMBENCH) train -m experiment=cifar10_cpu hydra/launcher=local threads=1 seed=0 \
	  norm=bn,gn8 batch=32,2 epochs=30 experiment_name=cifar10_cpu_long
	# (the committed reports add --notes with the discussion of their own runs: see their
	# "Regenerate this report" line)
	$(NORMBENCH) report runs/cifar10_cpu --out results/cifar10_cpu
	$(NORMBENCH) report runs/cifar10_cpu_long --out results/cifar10_cpu_long

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

EXP ?= demo
report: setup
	$(NORMBENCH) report runs/$(EXP) --out results/$(EXP)

# One torch thread: the project's CPUs are shared, and a parallel region that waits for a thread
# another job holds stalls (results/bench/README.md).
bench: setup
	$(PY) scripts/bench.py --threads 1 --out results/bench

# The GPU checks of issue #13 in one command (meant to take under 8 minutes on one H100/H200):
# the CUDA tests (pytest -m cuda), the GPU bench rows (item 6: ResNet-50 224 px bf16 images/s,
# bn and gn, eager and compiled, GN/BN, CUDA graphs at 2 x 8, per-worker BN implementations;
# item 2 on the GPU) into results/bench/gpu, and a 2-epoch bn/gn x 32/2 sweep on real CIFAR-10
# (experiments/cifar10_cpu.yaml on the GPU) into runs/gpu_check. scripts/gpu_check.sh does the
# work; on a GPU machine that cannot fetch packages, see gpu-bundle.
gpu-check: setup
	PY=$(PY) bash scripts/gpu_check.sh

# What gpu_check.sh needs on a GPU machine whose python3 has torch but that cannot fetch packages
# (the lent machines): the pure-Python wheels such images lack (hydra-core, omegaconf, antlr4;
# the versions of .venv) and the CIFAR-10 archive, in .gpu/ (ignored by git; 20 MB). There:
#   bash scripts/gpu_check.sh                 (REHEARSE=1 tries it on a CPU first)
GPU_WHEELS ?= hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
gpu-bundle:
	rm -rf .gpu && mkdir -p .gpu/wheels
	$(PYTHON) -m pip wheel --quiet --no-deps --wheel-dir .gpu/wheels $(GPU_WHEELS)
	cp ../shared/data/cifar10-jpeg.tar.gz .gpu/
	@du -sh .gpu

clean:
	rm -rf runs outputs multirun .pytest_cache
