#!/usr/bin/env bash
# The GPU checks of issue #13 (`make gpu-check` runs this with the project's .venv):
#   1. the CUDA tests (pytest -m cuda),
#   2. the GPU rows of the bench (item 6: ResNet-50 224 px bf16 images/s, bn and gn, eager and
#      compiled, GN/BN, CUDA graphs at 2 x 8; item 2 on the GPU) into results/bench/gpu,
#   3. a 2-epoch bn/gn8 x 32/2 sweep on real CIFAR-10 on the GPU into runs/gpu_check.
#
# It also runs where the Makefile's .venv cannot be made: a machine that has torch with CUDA in
# its python3 and cannot fetch packages (a lent GPU machine). Make the bundle on a machine that
# can (`make gpu-bundle`: the pure-Python wheels that such an image lacks, hydra-core, omegaconf
# and antlr4, and the CIFAR-10 archive, into .gpu/), take .gpu/ along with the checkout, and run
#   bash scripts/gpu_check.sh
# there. W&B is off in the sweep when wandb is not installed. Environment:
#   PY          the python to use (default: python3)
#   GPU_MODES   the bench's --gpu-modes (default eager,compiled; `eager` skips the compiles)
#   STAGES      which stages to run (default "tests bench sweep")
#   REHEARSE=1  run every stage on the CPU at toy sizes, to check the set-up without a GPU (the
#               CUDA tests skip themselves; the bench runs item 2 in --quick mode; the sweep trains
#               2 epochs on 40 images per class), writing under REHEARSAL_DIR (default
#               /tmp/gpu_check_rehearsal). Nothing it prints is a GPU figure.
# Each stage prints its start time and duration; the script stops at the first stage that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
STAGES=${STAGES:-tests bench sweep}
GPU_MODES=${GPU_MODES:-eager,compiled}
REHEARSE=${REHEARSE:-0}
REHEARSAL_DIR=${REHEARSAL_DIR:-/tmp/gpu_check_rehearsal}
BUNDLE=$ROOT/.gpu
for name in $STAGES; do
    case $name in
    tests|bench|sweep) ;;
    *) echo "gpu_check: unknown stage '$name' in STAGES; the stages are: tests bench sweep" >&2
       exit 2 ;;
    esac
done

stage() { echo; echo "== $(date -u +%H:%M:%S) gpu_check: $*"; }

if [ -d "$BUNDLE/wheels" ] && ls "$BUNDLE"/wheels/*.whl >/dev/null 2>&1; then
    stage "installing the bundled wheels into $BUNDLE/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$BUNDLE/site" "$BUNDLE"/wheels/*.whl
    export PYTHONPATH="$BUNDLE/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's normbench, installed or not
export PYTHONUNBUFFERED=1

if [ "$REHEARSE" = 1 ]; then
    DEVICE=cpu
    # the sweep at toy sizes, outside the checkout
    SWEEP_SIZE=(dataset.max_per_class=40 dataset.max_test_per_class=20 threads=1
                "out_root=$REHEARSAL_DIR/runs")
    SWEEP_WHAT="a 2-epoch bn/gn8 x 32/2 sweep on 40 images per class, CPU (rehearsal)"
else
    DEVICE=cuda
    SWEEP_SIZE=()
    SWEEP_WHAT="a 2-epoch bn/gn8 x 32/2 sweep of experiments/cifar10_cpu.yaml on the GPU"
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
'gpu_check: torch sees no CUDA device (REHEARSE=1 checks the set-up on the CPU)')"
fi
"$PY" - <<'EOF'
import importlib.util, sys
missing = [m for m in ("torch", "torchvision", "hydra", "omegaconf", "pandas", "matplotlib",
                       "yaml", "PIL", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: {sys.executable} lacks {', '.join(missing)}: run `make gpu-bundle` "
             f"where packages can be fetched and bring .gpu/ along")
import torch, torchvision
cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision "
      f"{torchvision.__version__}, {cuda}")
EOF
WANDB=offline
"$PY" -c "import wandb" 2>/dev/null || WANDB=disabled

for name in $STAGES; do
    start=$SECONDS
    case $name in
    tests)
        stage "the CUDA tests"
        "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
        ;;
    bench)
        if [ "$REHEARSE" = 1 ]; then
            stage "bench item 2, --quick on the CPU (rehearsal) into $REHEARSAL_DIR/bench"
            "$PY" scripts/bench.py --device cpu --quick --items 2 --threads 1 \
                --out "$REHEARSAL_DIR/bench"
        else
            stage "bench items 2 and 6 ($GPU_MODES) into results/bench/gpu"
            "$PY" scripts/bench.py --device cuda --items 2,6 --gpu-sizes 224 \
                --gpu-modes "$GPU_MODES" --out results/bench/gpu
        fi
        ;;
    sweep)
        archive=$BUNDLE/cifar10-jpeg.tar.gz
        [ -f "$archive" ] || archive=$ROOT/../shared/data/cifar10-jpeg.tar.gz
        stage "unpacking $archive"
        "$PY" scripts/prepare_data.py "$archive"
        stage "$SWEEP_WHAT"
        "$PY" run.py -m experiment=cifar10_cpu device=$DEVICE norm=bn,gn8 batch=32,2 epochs=2 \
            wandb.mode=$WANDB experiment_name=gpu_check ${SWEEP_SIZE[@]+"${SWEEP_SIZE[@]}"}
        ;;
    esac
    echo "== gpu_check: $name took $((SECONDS - start)) s"
done
stage "done"
