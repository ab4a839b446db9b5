"""scripts/gpu_check.sh (make gpu-check, and the same on a GPU machine without the .venv): GPU
time is scarce, so its set-up is rehearsed on the CPU (REHEARSE=1) before any GPU runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def gpu_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PY": sys.executable, "REHEARSAL_DIR": str(tmp_path / "rehearsal"),
                "NORMBENCH_DATA": str(tmp_path / "data"),
                "NORMBENCH_CACHE": str(tmp_path / "cache"), "WANDB_SILENT": "true", **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=600)


def test_rehearsal_runs_every_stage_on_the_cpu(tmp_path, shared_cifar):
    result = gpu_check(tmp_path, REHEARSE="1")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for stage in ("the CUDA tests", "bench item 2, --quick on the CPU (rehearsal)",
                  "a 2-epoch bn/gn8 x 32/2 sweep on 40 images per class, CPU (rehearsal)"):
        assert f"gpu_check: {stage}" in output
    for name in ("tests", "bench", "sweep"):
        assert f"gpu_check: {name} took " in output
    assert "trained 4  resumed 0  skipped 0  diverged 0  failed 0" in output
    runs = tmp_path / "rehearsal" / "runs" / "gpu_check"
    assert len(list(runs.glob("*/summary.json"))) == 4
    assert (tmp_path / "rehearsal" / "bench" / "bench.json").exists()


def test_an_unknown_stage_is_named_with_the_stages_there_are(tmp_path):
    result = gpu_check(tmp_path, REHEARSE="1", STAGES="tests becnh")
    assert result.returncode == 2
    assert ("unknown stage 'becnh' in STAGES; the stages are: tests bench sweep"
            in result.stderr)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_it_stops_before_any_stage_and_says_how_to_rehearse(tmp_path):
    result = gpu_check(tmp_path)
    assert result.returncode != 0
    assert "torch sees no CUDA device (REHEARSE=1 checks the set-up on the CPU)" in result.stderr
    assert "the CUDA tests" not in result.stdout
