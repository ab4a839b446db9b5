"""Reliability: interrupted runs, broken files and bad input lose nothing and explain themselves.

One test per fault or bad input of docs/reliability.md; what other test files already cover is
referenced there, not repeated here (e.g. SIGKILL mid-epoch -> identical resume: tests/test_run.py).

Most tests copy the folder of one tiny finished run (two epochs, trained once for the module),
damage it the way a kill, a full disk or a second launch would, and relaunch in-process with
:func:`normbench.train.run`.
"""

from __future__ import annotations

import builtins
import logging
import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, compose_config, run_cli
from normbench import records
from normbench.config import ConfigError, run_name, validate_config
from normbench.records import RecordsError, RunFolder
from normbench.train import run

# TINY made smaller still: 8 steps of 4 x 4 images per epoch, 2 epochs, repeatable on CPU.
SMALL = TINY + ["dataset.train_size=128", "dataset.test_size=64", "batch=4", "workers=4",
                "deterministic=true"]
RESULT_KEYS = ("epoch", "step", "train_loss", "train_error", "test_loss", "test_error", "lr")


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def results(folder: Path) -> list[dict]:
    """What a run computed, without its timings."""
    return [{k: m[k] for k in RESULT_KEYS} for m in metrics(folder)]


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def truncate(path: Path) -> None:
    """Keep the first half of the file: what a kill or a crash in the middle of a write leaves."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def checkpoint_epoch(path: Path) -> int:
    return torch.load(path, weights_only=True)["epoch"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("finished") / "run"
    assert run(compose_config(SMALL), folder)["status"] == "completed"
    return folder


@pytest.fixture
def folder(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run's folder, for the test to damage."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def killed_during_epoch_2(folder: Path) -> None:
    """What a kill during epoch 2 leaves: epoch 1's checkpoint and metrics line, no summary."""
    (folder / "checkpoint.prev.pt").replace(folder / "checkpoint.pt")
    (folder / "summary.json").unlink()
    first_line = (folder / "metrics.jsonl").read_text().splitlines(keepends=True)[0]
    (folder / "metrics.jsonl").write_text(first_line)


# ---- killed while writing ---------------------------------------------------------------------
def test_kill_while_writing_a_checkpoint_keeps_the_last_one_and_resumes_exactly(folder, finished):
    killed_during_epoch_2(folder)
    (folder / ".checkpoint.pt.tmp").write_bytes((finished / "checkpoint.pt").read_bytes()[:999])
    summary = run(compose_config(SMALL), folder)
    assert summary["outcome"] == "resumed" and summary["status"] == "completed"
    assert results(folder) == results(finished)
    assert summary["final_error"] == json.loads((finished / "summary.json").read_text())[
        "final_error"]


def test_kill_while_appending_metrics_or_writing_the_summary_loses_nothing(folder, finished):
    # Epoch 2's checkpoint is saved (it comes first), its metrics line cut short, the summary's
    # temporary file half written and never renamed.
    (folder / "summary.json").unlink()
    truncate(folder / "metrics.jsonl")
    (folder / ".summary.json.tmp").write_text('{"status": "compl')
    summary = run(compose_config(SMALL), folder)
    assert summary["outcome"] == "resumed" and summary["steps"] == metrics(finished)[-1]["step"]
    # metrics.jsonl is rewritten from the checkpoint, the source of truth
    assert (folder / "metrics.jsonl").read_text() == (finished / "metrics.jsonl").read_text()
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed"


def test_truncated_checkpoint_is_named_and_the_previous_one_is_used(folder, finished, caplog):
    caplog.set_level(logging.INFO)
    (folder / "summary.json").unlink()
    truncate(folder / "checkpoint.pt")
    summary = run(compose_config(SMALL), folder)
    assert f"checkpoint {folder / 'checkpoint.pt'} is unreadable" in caplog.text
    assert "resuming after epoch 1" in caplog.text
    assert summary["status"] == "completed" and results(folder) == results(finished)
    # the unreadable file is set aside, never rotated over the good previous checkpoint
    assert checkpoint_epoch(folder / "checkpoint.pt") == 2
    assert checkpoint_epoch(folder / "checkpoint.prev.pt") == 1
    assert (folder / "checkpoint.pt.corrupt").exists()


def test_no_readable_checkpoint_refuses_naming_the_files_and_keeps_the_records(folder):
    (folder / "summary.json").unlink()
    truncate(folder / "checkpoint.pt")
    truncate(folder / "checkpoint.prev.pt")
    before = contents(folder)
    with pytest.raises(RecordsError, match="no readable checkpoint in the run folder") as error:
        run(compose_config(SMALL), folder)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        assert str(folder / name) in str(error.value)
        assert (folder / name).read_bytes() == before[name]
    assert "Delete the run folder to start this run over" in str(error.value)
    assert (folder / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
    assert json.loads((folder / "summary.json").read_text())["status"] == "failed"


def test_metrics_without_a_checkpoint_refuse_to_start_over(folder):
    before = (folder / "metrics.jsonl").read_bytes()
    for name in ("summary.json", "checkpoint.pt", "checkpoint.prev.pt"):
        (folder / name).unlink()
    with pytest.raises(RecordsError, match="holds finished epochs but the run folder has no "
                                           "checkpoint"):
        run(compose_config(SMALL), folder)
    assert (folder / "metrics.jsonl").read_bytes() == before


def test_unreadable_summary_is_named_and_nothing_is_retrained(folder):
    truncate(folder / "summary.json")
    before = contents(folder)
    with pytest.raises(RecordsError, match=re.escape(f"{folder / 'summary.json'} is not valid "
                                                     f"JSON")):
        run(compose_config(SMALL), folder)
    after = contents(folder)
    del after["launches.jsonl"], before["launches.jsonl"]
    assert after == before


def test_a_launch_record_cut_short_by_a_kill_does_not_swallow_the_next(tmp_path):
    from normbench.hydra_callbacks import last_launch

    (tmp_path / "launches.jsonl").write_text('{"started": 1.0, "outcome": "trai')
    RunFolder(tmp_path).record_launch("resumed", 2.0)
    assert last_launch(tmp_path) == {"started": 2.0, "outcome": "resumed"}


# ---- divergence -------------------------------------------------------------------------------
def test_sweep_goes_on_after_a_diverged_cell(tmp_path):
    # lr 1e6 makes the loss NaN within a few steps at batch 4; the next cell (batch=1, refused
    # for BN) still runs, and the sweep ends with exit status 0
    sweep = ["-m", *SMALL, "epochs=1", "batch=4,1", "optim.lr_per_256=1e6",
             "optim.milestones=[0.9]", f"out_root={tmp_path}"]
    result = run_cli(sweep, cwd=tmp_path)
    assert re.search(r"trained 0 +resumed 0 +skipped 0 +diverged 1 +failed 1", result.stdout)
    statuses = {p.parent.name.split("_")[1]: json.loads(p.read_text())["status"]
                for p in tmp_path.glob("default/*/summary.json")}
    assert statuses == {"b4x4": "diverged", "b1x4": "failed"}


# ---- the folder cannot be written -------------------------------------------------------------
class FullDiskFile:
    """A file on a full disk: it opens, every write fails with ENOSPC."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_disk_full_at_a_checkpoint_keeps_the_last_one_and_says_so(folder, monkeypatch):
    killed_during_epoch_2(folder)
    disk_full = False

    def records_open(path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        return FullDiskFile(file) if disk_full and set(mode) & set("wa+") else file

    def save_checkpoint_on_a_full_disk(self, state):
        nonlocal disk_full
        disk_full = True  # the disk fills up while epoch 2 trains
        return real_save_checkpoint(self, state)

    real_save_checkpoint = RunFolder.save_checkpoint
    monkeypatch.setattr(records, "open", records_open, raising=False)
    monkeypatch.setattr(RunFolder, "save_checkpoint", save_checkpoint_on_a_full_disk)
    with pytest.raises(RecordsError, match=r"cannot write .*No space left on device.*relaunch: "
                                           r"the run resumes from its checkpoint") as error:
        run(compose_config(SMALL), folder)
    assert str(folder) in str(error.value)
    assert checkpoint_epoch(folder / "checkpoint.pt") == 1  # the last good one, intact
    assert not (folder / ".checkpoint.pt.tmp").exists()
    assert [m["epoch"] for m in metrics(folder)] == [1]


def test_unwritable_run_folder_is_refused_before_training(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("a regular file, so nothing can be created under it")
    target = tmp_path / "afile" / "run"
    monkeypatch.setattr("normbench.train.Trainer", lambda *a: pytest.fail("training started"))
    with pytest.raises(RecordsError, match=re.escape(f"run folder {target} cannot be written: "
                                                     f"[Errno 20] Not a directory")):
        run(compose_config(SMALL), target)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_folder_is_refused_before_training(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir(mode=0o500)
    target = tmp_path / "locked" / "run"
    monkeypatch.setattr("normbench.train.Trainer", lambda *a: pytest.fail("training started"))
    with pytest.raises(RecordsError, match=re.escape(f"run folder {target} cannot be written: "
                                                     f"[Errno 13] Permission denied")):
        run(compose_config(SMALL), target)


def test_unwritable_out_root_on_the_command_line_names_the_path(tmp_path):
    (tmp_path / "afile").write_text("")
    out_root = tmp_path / "afile" / "runs"
    result = run_cli(SMALL + [f"out_root={out_root}"], cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert f"Not a directory: '{out_root}/default/bn_b4x4_before_s0_" in result.stderr
    assert "epoch 1/" not in result.stderr  # nothing trained


# ---- two launches, two configs, one folder ----------------------------------------------------
def test_second_launch_on_a_folder_in_use_refuses_and_changes_nothing(folder):
    killed_during_epoch_2(folder)  # without the lock, this launch would train epoch 2
    before = contents(folder)
    first = RunFolder(folder)
    first.open()  # the first launch holds the folder
    try:
        with pytest.raises(RecordsError, match=re.escape(
                f"run folder {folder} is in use by another process (its .lock is held)")):
            run(compose_config(SMALL), folder)
    finally:
        first.close()
    assert contents(folder) == before


def test_folder_holding_another_config_is_refused_naming_the_keys(folder):
    before = contents(folder)
    other = compose_config(SMALL + ["optim.momentum=0.5", "seed=1"])
    with pytest.raises(RecordsError, match=re.escape(
            f"run folder {folder} holds a run with a different config (keys: optim.momentum, "
            f"seed)")):
        run(other, folder)  # finished or not, never reported as the other config's result
    after = contents(folder)
    del after["launches.jsonl"], before["launches.jsonl"]
    assert after == before


# ---- data -------------------------------------------------------------------------------------
def test_skipped_corrupt_images_are_counted_in_the_summary(tmp_path):
    root = tmp_path / "pets"
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    (root / "train" / "dog" / "5.png").write_bytes(b"not a png")
    cfg = compose_config(["model=resnet8", "dataset=imagefolder", f"dataset.root={root}",
                          f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.num_classes=2",
                          "dataset.image_size=16", "dataset.skip_corrupt=true", "batch=2",
                          "workers=2", "epochs=1", "wandb.mode=disabled", "progress=false"])
    summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["skipped_files"] == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_files"] == 1


# ---- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,allowed", [
    ("model", "resnet9", "resnet8, resnet20"), ("dataset", "mnist", "synthetic, cifar10")])
def test_unknown_model_or_dataset_in_a_library_config_is_refused(key, value, allowed):
    cfg = compose_config()
    cfg[key]["name"] = value
    with pytest.raises(ConfigError, match=f"{key}.name='{value}' is not allowed; choose one of: "
                                          f".*{allowed}"):
        validate_config(cfg)


def test_unknown_experiment_lists_the_available_ones(tmp_path):
    result = run_cli(["-m", "experiment=nosuch", f"out_root={tmp_path}"], cwd=tmp_path,
                     check=False)
    assert result.returncode != 0
    assert "Could not find 'experiment/nosuch'" in result.stderr
    assert "Available options in 'experiment':" in result.stderr
    for experiment in (ROOT / "experiments").glob("*.yaml"):
        assert f"\t{experiment.stem}\n" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing ran


# ---- security ---------------------------------------------------------------------------------
class Payload:
    """Unpickling this creates a folder: the harmless stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_checkpoint_with_a_pickled_object_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    torch.save({"model": Payload(marker), "epoch": 1}, folder.checkpoint_path)
    with pytest.raises(RecordsError, match=re.escape(str(folder.checkpoint_path)) +
                       r": UnpicklingError: Weights only load failed"):
        folder.load_checkpoint()
    assert not marker.exists()
    torch.load(folder.checkpoint_path, weights_only=False)  # the payload is real: loaded
    assert marker.exists()                                  # unsafely, it runs


def python_sources() -> list[Path]:
    return [ROOT / "run.py", *sorted((ROOT / "normbench").rglob("*.py")),
            *sorted((ROOT / "scripts").rglob("*.py"))]


def test_no_config_value_can_reach_eval_a_shell_or_instantiate():
    forbidden = re.compile(r"(?<![\w.])(eval|exec)\(|os\.system|os\.popen|shell=True|"
                           r"instantiate\(|yaml\.load\(|yaml\.unsafe_load|pickle\.loads?\(")
    hits = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
            for path in python_sources()
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if forbidden.search(line)]
    assert hits == []
    loads = [line.strip() for path in python_sources() for line in path.read_text().splitlines()
             if "torch.load(" in line]
    assert loads and all("weights_only=True" in line for line in loads), loads
    # the only _target_ in the configs is the sweep-summary callback
    configs = {*(ROOT / "conf").rglob("*.yaml"), *(ROOT / "experiments").rglob("*.yaml")}
    targets = [line.strip() for path in sorted(configs)
               for line in path.read_text().splitlines() if "_target_" in line]
    assert targets == ["_target_: normbench.hydra_callbacks.SweepSummary"]


def test_wandb_api_key_is_never_written_to_disk(tmp_path):
    key = "normbench0fake0api0key0" + "7" * 17  # 40 characters, like a real key
    overrides = SMALL + ["epochs=1", "wandb.mode=offline", f"out_root={tmp_path / 'runs'}"]
    run_cli(overrides, cwd=tmp_path,
            env={"WANDB_API_KEY": key, "WANDB_DIR": str(tmp_path / "wandb"),
                 "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                 "WANDB_CONFIG_DIR": str(tmp_path / "config")})
    folder = tmp_path / "runs" / "default" / run_name(compose_config(SMALL + ["epochs=1"]))
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert (folder / "run.log").exists() and (folder / ".hydra" / "config.yaml").exists()
    assert list(folder.glob("wandb/offline-run-*/*.wandb")), "no offline W&B run was written"
    assert [p for p in written if key.encode() in p.read_bytes()] == []
