"""Shared test helpers: the real Hydra config composed in-process, and tiny run settings."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from normbench.data.presets import register_preset_resolver

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

register_preset_resolver()  # as the Hydra entry point does: conf/dataset/imagefolder.yaml uses it

# A run that takes seconds on a CPU: the smallest CIFAR ResNet on a small synthetic set.
# TINY_RUN holds the settings that fit any data set; TINY adds the synthetic data's size.
TINY_RUN = ["model=resnet8", "batch=8", "workers=4", "epochs=2", "wandb.mode=disabled",
            "progress=false"]
TINY = TINY_RUN + ["dataset=synthetic", "dataset.train_size=512", "dataset.test_size=256",
                   "dataset.image_size=16"]


def compose_config(overrides: list[str] | None = None) -> dict[str, Any]:
    """The resolved config `python run.py <overrides>` would run, as a plain dict."""
    from normbench.hydra_main import compose

    return OmegaConf.to_container(compose(overrides or []), resolve=True)


def run_cli(args: list[str], cwd: Path, *, check: bool = True, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in a subprocess, as a user would run it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **(env or {})}
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd,
                            capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result


def checkpoint_epoch(path: Path) -> int:
    """The epoch a checkpoint file was saved after."""
    import torch
    return torch.load(path, weights_only=True)["epoch"]


def kill_after_first_epoch(process: subprocess.Popen, folder: Path, kill) -> int:
    """Wait until the run in ``folder`` has recorded its first epoch, kill it with ``kill()``
    (no clean-up) and return the epoch its newest checkpoint holds, which is where a relaunch
    resumes. Read from the checkpoint, not from metrics.jsonl: the trainer saves the
    checkpoint before it appends the epoch's metrics, so a kill between the two leaves one
    more epoch in the checkpoint than in the metrics."""
    deadline = time.time() + 120
    metrics = folder / "metrics.jsonl"
    while not metrics.exists() or not metrics.read_text():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "the run recorded no epoch within 120 s"
        time.sleep(0.02)
    kill()
    process.wait()
    return checkpoint_epoch(folder / "checkpoint.pt")


def run_two_processes(fn, *args, timeout: float = 120.0) -> None:
    """Run ``fn(rank, 2, *args)`` in two spawned processes (e.g. a gloo process group) and fail
    the test, killing both, if they do not finish within ``timeout`` seconds."""
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=(2, *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"two-process run did not finish in {timeout} s")


@pytest.fixture
def wandb_in_tmp(tmp_path, monkeypatch):
    """W&B's own settings, cache and logs in the test's folder, never the user's."""
    for variable, folder in (("WANDB_DIR", "wandb_dir"), ("WANDB_CACHE_DIR", "wandb_cache"),
                             ("WANDB_CONFIG_DIR", "wandb_config"),
                             ("WANDB_DATA_DIR", "wandb_data")):
        monkeypatch.setenv(variable, str(tmp_path / folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


@pytest.fixture
def shared_cifar() -> Path:
    if not SHARED_CIFAR.exists():
        pytest.skip(f"real CIFAR-10 archive not found at {SHARED_CIFAR} (only on the project's "
                    f"machines, beside the checkout in ../shared)")
    return SHARED_CIFAR


# ---- CUDA tests: `@pytest.mark.cuda`, skipped where torch sees no CUDA device (make gpu-check) --
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one); run "
                                       "them with `make gpu-check`")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch sees none)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
