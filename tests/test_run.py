"""`python run.py` end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY, TINY_RUN, compose_config, kill_after_first_epoch, run_cli
from normbench.config import run_name

GN4 = ["norm=gn", "norm.groups=4"]
DETERMINISTIC_KEYS = ("epoch", "step", "train_loss", "train_error", "test_loss", "test_error",
                      "lr")


def run_folder(out_root: Path, overrides: list[str]) -> Path:
    """Where run.py puts the run of these overrides (the folder name is the config's)."""
    return out_root / "default" / run_name(compose_config(overrides))


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_one_run_leaves_a_complete_run_folder(tmp_path):
    overrides = TINY + GN4 + ["batch=2"]
    result = run_cli(overrides + [f"out_root={tmp_path}"], cwd=tmp_path)
    folder = run_folder(tmp_path, overrides)
    assert folder.name.startswith("gn_b2x4_before_s0_")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["norm"] == {"name": "gn", "groups": 4, "group_channels": None, "eps": 1e-5}
    assert config["batch"] == 2 and config["workers"] == 4 and config["model"]["name"] == "resnet8"

    metrics = read_metrics(folder)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert set(DETERMINISTIC_KEYS) | {"images_per_second", "epoch_time", "wall_time"} <= set(m)
        assert 0 <= m["test_error"] <= 100 and m["images_per_second"] > 0
    # linear scaling: 0.1 per 256 images x global batch 2 x 4; /10 at 30, 60, 90% of the run.
    # The last step of epoch 1 (of 2) is past 30%, the last of epoch 2 past all three.
    base = 0.1 * 8 / 256
    assert metrics[0]["lr"] == pytest.approx(base * 0.1)
    assert metrics[1]["lr"] == pytest.approx(base * 0.001)
    steps_per_epoch = 512 // 8
    assert [m["step"] for m in metrics] == [steps_per_epoch, 2 * steps_per_epoch]

    summary = json.loads((folder / "summary.json").read_text())
    errors = [m["test_error"] for m in metrics]
    assert summary["status"] == "completed" and summary["epochs"] == 2
    assert summary["final_error"] == errors[-1]
    assert summary["median5_error"] == statistics.median(errors)
    assert summary["best_error"] == min(errors)
    assert summary["images_per_second"] > 0 and summary["wall_time"] > 0
    assert (folder / "checkpoint.pt").exists()
    assert "completed (trained)" in result.stderr + result.stdout


def test_relaunch_of_a_finished_run_trains_nothing(tmp_path):
    overrides = TINY + ["epochs=1", f"out_root={tmp_path}"]
    run_cli(overrides, cwd=tmp_path)
    folder = run_folder(tmp_path, TINY + ["epochs=1"])
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}
    result = run_cli(overrides, cwd=tmp_path)
    assert "already completed, nothing to do" in result.stderr + result.stdout
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}
    for name in ("metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert before[name] == after[name], name


def test_killed_run_resumes_and_ends_exactly_like_an_uninterrupted_one(tmp_path):
    overrides = TINY + ["dataset.train_size=1024", "epochs=4", "deterministic=true"]
    reference_root, killed_root = tmp_path / "reference", tmp_path / "killed"
    run_cli(overrides + [f"out_root={reference_root}"], cwd=tmp_path)
    reference = read_metrics(run_folder(reference_root, overrides))

    folder = run_folder(killed_root, overrides)
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *overrides,
                                f"out_root={killed_root}"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # mid-epoch 2 (or 3): no chance to clean up
    done_before_kill = kill_after_first_epoch(
        process, folder, lambda: process.send_signal(signal.SIGKILL))
    assert not (folder / "summary.json").exists()
    assert 1 <= done_before_kill < 4

    result = run_cli(overrides + [f"out_root={killed_root}"], cwd=tmp_path)
    assert f"resuming after epoch {done_before_kill}" in result.stderr + result.stdout
    resumed = read_metrics(folder)
    assert [{k: m[k] for k in DETERMINISTIC_KEYS} for m in resumed] == \
           [{k: m[k] for k in DETERMINISTIC_KEYS} for m in reference]
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed"


def test_hydra_run_dir_override_chooses_the_folder(tmp_path):
    target = tmp_path / "my_run"
    run_cli(TINY + ["epochs=1", f"hydra.run.dir={target}"], cwd=tmp_path)
    assert (target / "summary.json").exists() and (target / "config.yaml").exists()
    assert (target / ".hydra" / "overrides.yaml").exists()


def test_config_error_exits_with_one_clear_line_and_records_it(tmp_path):
    result = run_cli(TINY + ["norm=gn", "norm.groups=32", f"out_root={tmp_path}"], cwd=tmp_path,
                     check=False)
    assert result.returncode == 2
    assert "at layer stem: gn: groups=32 does not divide 16 channels" in result.stderr
    assert "Traceback" not in result.stderr
    folder = run_folder(tmp_path, TINY + ["norm=gn", "norm.groups=32"])
    assert json.loads((folder / "summary.json").read_text())["status"] == "failed"


def test_unknown_choice_lists_the_available_ones(tmp_path):
    result = run_cli(["norm=xn"], cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "Could not find 'norm/xn'" in result.stderr
    for name in ("bn", "gn", "ln", "in"):
        assert f"\t{name}\n" in result.stderr


def test_missing_dataset_path_names_it(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = run_cli(TINY_RUN + ["dataset=imagefolder", f"dataset.root={missing}",
                             f"out_root={tmp_path}"], cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


def test_divergence_is_recorded_with_epoch_and_step(tmp_path):
    overrides = TINY + ["batch=2", "optim.lr_per_256=1e6", "optim.milestones=[0.9]"]
    run_cli(overrides + [f"out_root={tmp_path}"], cwd=tmp_path)
    summary = json.loads((run_folder(tmp_path, overrides) / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["diverged_at"]["epoch"] == 1 and summary["diverged_at"]["step"] >= 1
    assert summary["final_error"] is None


def test_wandb_offline_writes_local_run_files(tmp_path):
    overrides = TINY + ["epochs=1", "wandb.mode=offline"]
    run_cli(overrides + [f"out_root={tmp_path}"], cwd=tmp_path,
            env={"WANDB_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                 "WANDB_CONFIG_DIR": str(tmp_path / "config")})
    folder = run_folder(tmp_path, overrides)
    runs = list((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "no offline W&B run file"


def test_imagefolder_run_on_a_slice_of_real_cifar10(tmp_path, shared_cifar):
    from normbench.data import extract_image_folder

    root = extract_image_folder(shared_cifar, tmp_path / "cifar10", max_per_class=20,
                                max_test_per_class=10)
    overrides = TINY_RUN + ["dataset=imagefolder", f"dataset.root={root}",
                        f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.image_size=32",
                        "epochs=1"]
    run_cli(overrides + [f"out_root={tmp_path}"], cwd=tmp_path)
    folder = run_folder(tmp_path, overrides)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert read_metrics(folder)[0]["step"] == 200 // (8 * 4)


def test_threads_setting_limits_torchs_cpu_threads(tmp_path):
    import torch

    from normbench.train import run

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # so that the run has something to change on any machine
        run(compose_config(TINY + ["epochs=1", "threads=1"]), tmp_path / "run")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
