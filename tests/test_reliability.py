"""Reliability: interrupted runs, broken files and bad input lose nothing and explain themselves.

One test per fault or bad input of docs/reliability.md; what other test files already cover is
referenced there, not repeated here (e.g. SIGKILL mid-epoch -> identical resume: tests/test_run.py).

Most tests copy the folder of one tiny finished run (two epochs, trained once for the module),
damage it the way a kill, a full disk or a second launch would, and relaunch in-process with
:func:`normbench.train.run`.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, TINY_RUN, checkpoint_epoch, compose_config, run_cli
from normbench import records
from normbench.config import ConfigError, run_key, run_name, validate_config
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
    """Every file under ``folder`` (also .hydra/), by path relative to it."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def truncate(path: Path) -> None:
    """Keep the first half of the file: what a kill or a crash in the middle of a write leaves."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


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
    assert (f"checkpoint {folder / 'checkpoint.pt'} is unreadable (RuntimeError: "
            f"PytorchStreamReader failed reading zip archive: ") in caplog.text
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
        assert f"checkpoint {folder / name} is unreadable (RuntimeError: " in str(error.value)
        assert (folder / name).read_bytes() == before[name]
    assert str(error.value).endswith("; delete the run folder to start this run over")
    assert "\n" not in str(error.value)  # one line
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
    (tmp_path / "launches.jsonl").write_text('{"started": 1.0, "outcome": "trai')
    RunFolder(tmp_path).record_launch("resumed", 2.0)
    assert records.read_launches(tmp_path) == [
        {"started": 2.0, "outcome": "resumed", "host": socket.gethostname(), "pid": os.getpid()}]


# ---- divergence -------------------------------------------------------------------------------
def test_sweep_goes_on_after_a_diverged_cell(tmp_path):
    # lr 1e6 makes the loss NaN within a few steps at batch 4; the next cell (batch=1, refused
    # for BN) still runs, and the sweep ends with exit status 1 for the failed cell alone: a
    # diverged run is a result (the relaunch skips it), and a sweep of it alone exits 0
    sweep = ["-m", *SMALL, "epochs=1", "batch=4,1", "optim.lr_per_256=1e6",
             "optim.milestones=[0.9]", f"out_root={tmp_path}"]
    result = run_cli(sweep, cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert re.search(r"trained 0 +resumed 0 +skipped 0 +diverged 1 +failed 1", result.stdout)
    assert "1 of 2 runs failed" in result.stdout
    statuses = {p.parent.name.split("_")[1]: json.loads(p.read_text())["status"]
                for p in tmp_path.glob("default/*/summary.json")}
    assert statuses == {"b4x4": "diverged", "b1x4": "failed"}
    diverged_only = run_cli([arg for arg in sweep if arg != "batch=4,1"] + ["batch=4"],
                            cwd=tmp_path)
    assert re.search(r"skipped 1 +diverged 0 +failed 0", diverged_only.stdout)


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
    with pytest.raises(RecordsError, match=r"cannot write .*: the disk is full \(\[Errno 28\] No "
                                           r"space left on device\).*relaunch: "
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


def test_permission_denied_is_refused_before_training_even_as_root(tmp_path, monkeypatch):
    # the test above cannot run as root (root writes anyway), which the project's machines
    # are: here the operating system's refusal is simulated where the folder is made
    target = tmp_path / "locked" / "run"
    real_mkdir = Path.mkdir

    def refusing_mkdir(self, *args, **kwargs):
        if self == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", refusing_mkdir)
    monkeypatch.setattr("normbench.train.Trainer", lambda *a: pytest.fail("training started"))
    with pytest.raises(RecordsError, match=re.escape(f"run folder {target} cannot be written: "
                                                     f"[Errno 13] Permission denied")):
        run(compose_config(SMALL), target)
    assert not target.exists()


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


# ---- damaged records --------------------------------------------------------------------------
DAMAGED_SUMMARIES = {
    "a list": (b"[1, 2]\n", "it holds a list, not a JSON object with a status"),
    "a string": (b'"completed"\n', "it holds a string, not a JSON object with a status"),
    "binary": (bytes(range(256)), "it is not text (binary data at byte 128)"),
    "no status": (b'{"final_error": 9.5}\n',
                  "it has no status (expected one of completed, diverged, failed)"),
}


@pytest.mark.parametrize("content,problem", DAMAGED_SUMMARIES.values(), ids=DAMAGED_SUMMARIES)
def test_damaged_summary_is_named_with_what_is_wrong_and_kept(folder, content, problem):
    (folder / "summary.json").write_bytes(content)
    before = contents(folder)
    with pytest.raises(RecordsError, match=re.escape(f"{folder / 'summary.json'} is damaged: "
                                                     f"{problem}; move it away")):
        run(compose_config(SMALL), folder)
    after = contents(folder)
    del after["launches.jsonl"], before["launches.jsonl"]
    assert after == before  # nothing trained, nothing overwritten


DAMAGED_CONFIGS = {
    "invalid YAML": (b"batch: [4, 8\nseed: 0\n",
                     "it is not valid YAML at line 2 (expected ',' or ']', but got ':')"),
    "not a mapping": (b"- batch\n- seed\n", "it holds a list, not a mapping of config keys"),
}


@pytest.mark.parametrize("content,problem", DAMAGED_CONFIGS.values(), ids=DAMAGED_CONFIGS)
def test_damaged_config_is_named_with_what_is_wrong_and_kept(folder, content, problem):
    (folder / "config.yaml").write_bytes(content)
    before = contents(folder)
    with pytest.raises(RecordsError, match=re.escape(f"{folder / 'config.yaml'} is damaged: "
                                                     f"{problem}")):
        run(compose_config(SMALL), folder)
    after = contents(folder)
    del after["launches.jsonl"], before["launches.jsonl"]
    assert after == before


@pytest.mark.parametrize("damaged,problem", [
    ("summary.json", "is damaged: it holds a list, not a JSON object with a status"),
    ("config.yaml", "is damaged: it holds a list, not a mapping of config keys")])
def test_damaged_records_on_the_command_line_give_one_line_and_exit_2(folder, damaged, problem):
    (folder / damaged).write_text("- 1\n- 2\n" if damaged == "config.yaml" else "[1, 2]\n")
    before = (folder / damaged).read_bytes()
    result = run_cli(SMALL + [f"hydra.run.dir={folder}"], cwd=folder.parent, check=False)
    assert result.returncode == 2
    assert f"{folder / damaged} {problem}" in result.stderr
    assert "Traceback" not in result.stderr
    assert (folder / damaged).read_bytes() == before  # never overwritten


def without_entries(path: Path, *entries: str) -> None:
    state = torch.load(path, weights_only=True)
    for entry in entries:
        del state[entry]
    torch.save(state, path)


def test_checkpoint_missing_entries_is_named_and_the_previous_one_is_used(folder, finished,
                                                                          caplog):
    (folder / "summary.json").unlink()
    without_entries(folder / "checkpoint.pt", "optimizer", "step")
    summary = run(compose_config(SMALL), folder)
    assert (f"checkpoint {folder / 'checkpoint.pt'} is damaged: it lacks optimizer, step; trying "
            f"the previous one") in caplog.text
    assert summary["outcome"] == "resumed" and results(folder) == results(finished)


def test_no_complete_checkpoint_refuses_in_one_line_naming_both(folder):
    (folder / "summary.json").unlink()
    without_entries(folder / "checkpoint.pt", "optimizer")
    without_entries(folder / "checkpoint.prev.pt", "history")
    before = contents(folder)
    with pytest.raises(RecordsError) as error:
        run(compose_config(SMALL), folder)
    assert str(error.value) == (
        f"no readable checkpoint in the run folder: checkpoint {folder / 'checkpoint.pt'} is "
        f"damaged: it lacks optimizer; checkpoint {folder / 'checkpoint.prev.pt'} is damaged: it "
        f"lacks history; delete the run folder to start this run over")
    after = contents(folder)
    for changed in ("launches.jsonl", "summary.json"):  # the launch and its failure recorded
        del after[changed]
        before.pop(changed, None)
    assert after == before
    assert json.loads((folder / "summary.json").read_text())["status"] == "failed"


# ---- a checkpoint names its run ---------------------------------------------------------------
@pytest.mark.parametrize("finished_before", [True, False], ids=["finished", "unfinished"])
def test_deleted_config_does_not_let_another_config_take_the_checkpoint(folder, finished_before):
    if not finished_before:
        killed_during_epoch_2(folder)
    (folder / "config.yaml").unlink()
    before = contents(folder)
    other = compose_config(SMALL + ["seed=1", "optim.lr_per_256=0.2"])
    with pytest.raises(RecordsError, match=re.escape(
            f"run folder {folder} holds a run with a different config (keys: optim.lr_per_256, "
            f"seed)")):
        run(other, folder)
    after = contents(folder)
    del after["launches.jsonl"], before["launches.jsonl"]
    assert after == before
    # the run's own config still resumes (or skips) there
    assert run(compose_config(SMALL), folder)["outcome"] == ("skipped" if finished_before
                                                            else "resumed")


def test_checkpoint_of_another_config_is_refused_beside_this_config(folder):
    killed_during_epoch_2(folder)
    other = compose_config(SMALL + ["seed=1"])
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    torch.save({**state, "run_key": run_key(other)}, folder / "checkpoint.pt")
    with pytest.raises(RecordsError, match=re.escape(
            f"checkpoint {folder / 'checkpoint.pt'} was saved by a run of another config (keys: "
            f"seed)")):
        run(compose_config(SMALL), folder)
    assert checkpoint_epoch(folder / "checkpoint.pt") == 1  # kept


@pytest.mark.parametrize("value", [None, 3])
def test_checkpoint_run_key_compares_like_config_yaml(folder, value):
    # A key that only one side has counts as None, for the checkpoint's run key as for
    # config.yaml: a config key that is None in one normbench version and absent in another
    # names the same run; any other value names another run.
    killed_during_epoch_2(folder)
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    stored = {**state["run_key"], "retired_option": value}
    torch.save({**state, "run_key": stored}, folder / "checkpoint.pt")
    if value is None:
        assert run(compose_config(SMALL), folder)["outcome"] == "resumed"
    else:
        with pytest.raises(RecordsError, match=re.escape(
                f"checkpoint {folder / 'checkpoint.pt'} was saved by a run of another config "
                f"(keys: retired_option)")):
            run(compose_config(SMALL), folder)


def test_checkpoint_without_its_config_that_does_not_name_its_run_is_refused(folder):
    killed_during_epoch_2(folder)
    without_entries(folder / "checkpoint.pt", "run_key")  # saved before checkpoints named their run
    (folder / "config.yaml").unlink()
    with pytest.raises(RecordsError, match=re.escape(
            f"run folder {folder} has a checkpoint but no config.yaml, and the checkpoint does "
            f"not say which config trained it")):
        run(compose_config(SMALL + ["seed=1"]), folder)


def test_checkpoint_without_its_run_key_resumes_beside_its_config(folder, finished):
    # checkpoints saved before they named their run still resume where config.yaml vouches
    killed_during_epoch_2(folder)
    without_entries(folder / "checkpoint.pt", "run_key")
    summary = run(compose_config(SMALL), folder)
    assert summary["outcome"] == "resumed" and results(folder) == results(finished)


# ---- a real full disk -------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 1.6 MB tmpfs: room for two checkpoints of SMALL's model (650 kB each), not three."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_real_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(small_disk,
                                                                                  tmp_path):
    folder = small_disk / "run"
    result = run_cli(SMALL + ["epochs=4", f"hydra.run.dir={folder}"], cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert (f"cannot write {folder / 'checkpoint.pt'}: the disk is full ([Errno 28] No space left "
            f"on device); the run stopped") in result.stderr
    assert "Traceback" not in result.stderr
    assert not (folder / ".checkpoint.pt.tmp").exists()
    assert checkpoint_epoch(folder / "checkpoint.pt") == 2  # the last one that fitted, intact
    assert [m["epoch"] for m in metrics(folder)] == [1, 2]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "failed" and "the disk is full" in summary["error"]
    # free space (here: move the folder to a bigger disk) and relaunch: it resumes
    moved = Path(shutil.copytree(folder, tmp_path / "moved"))
    resumed = run(compose_config(SMALL + ["epochs=4"]), moved)
    assert resumed["outcome"] == "resumed" and resumed["epochs"] == 4


def test_a_failure_summary_that_cannot_be_written_does_not_hide_the_error(folder, monkeypatch,
                                                                         caplog):
    killed_during_epoch_2(folder)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def no_space_for(path_attribute):
        def write(self, *args):
            raise records.write_error(getattr(self, path_attribute), full)
        return write

    monkeypatch.setattr(RunFolder, "save_checkpoint", no_space_for("checkpoint_path"))
    monkeypatch.setattr(RunFolder, "write_summary", no_space_for("summary_path"))
    with pytest.raises(RecordsError, match=re.escape(f"cannot write {folder / 'checkpoint.pt'}: "
                                                     f"the disk is full")):
        run(compose_config(SMALL), folder)
    assert f"could not record the failure in {folder / 'summary.json'}" in caplog.text


# ---- sweeps: every cell counted, only its own ------------------------------------------------
def sweep_outcomes(output: str) -> dict[str, int]:
    line = next(line for line in output.splitlines() if line.strip().startswith("trained "))
    return {name: int(count) for name, count in re.findall(r"(\w+) (\d+)", line)}


def test_sweep_counts_a_cell_refused_because_its_folder_is_in_use_and_writes_nothing_there(
        tmp_path):
    cells = [*SMALL, "epochs=1", f"out_root={tmp_path}"]
    locked = tmp_path / "default" / run_name(compose_config(cells + ["seed=1"]))
    holder = RunFolder(locked)
    holder.open()  # another launch trains seed 1
    try:
        result = run_cli(["-m", *cells, "seed=0,1,2"], cwd=tmp_path)
    finally:
        holder.close()
    assert "3 runs in this launch" in result.stdout
    outcomes = sweep_outcomes(result.stdout)
    assert (outcomes["trained"], outcomes["refused"]) == (2, 1)
    assert (f"refused: {locked.name}: its run folder is in use by another process; nothing in "
            f"it was changed") in result.stdout
    assert sorted(p.name for p in locked.iterdir()) == [".lock"]  # no .hydra/, no run.log


def test_refused_second_launch_rewrites_no_hydra_file_and_no_log(folder):
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text("- the first launch's overrides\n")
    (folder / "run.log").write_text("the first launch's log\n")
    killed_during_epoch_2(folder)
    before = contents(folder)
    holder = RunFolder(folder)
    holder.open()
    try:
        result = run_cli(SMALL + [f"hydra.run.dir={folder}"], cwd=folder.parent, check=False)
    finally:
        holder.close()
    assert result.returncode == 2
    assert f"run folder {folder} is in use by another process (its .lock is held)" in result.stderr
    assert contents(folder) == before


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def launch(args: list[str], cwd: Path) -> subprocess.Popen:
    """`python run.py ARGS` started in the background."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_sweeps_in_one_experiment_folder_count_only_their_own_runs(tmp_path):
    cells = [*SMALL, f"out_root={tmp_path}"]
    long_folder = tmp_path / "default" / run_name(compose_config(cells + ["epochs=15"]))
    long = launch(["-m", *cells, "epochs=15"], tmp_path)
    try:
        wait_for(lambda: records.is_in_use(long_folder), 120, "the long sweep to start")
        short = run_cli(["-m", *cells, "epochs=1", "seed=1"], cwd=tmp_path)
        long_output, _ = long.communicate(timeout=300)
    finally:
        long.kill()
    # the short sweep ran and finished while the long one trained: neither counts the other
    assert "1 runs in this launch" in short.stdout and sweep_outcomes(short.stdout)["trained"] == 1
    assert "1 runs in this launch" in long_output and sweep_outcomes(long_output)["trained"] == 1


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def test_killing_a_parallel_sweep_stops_its_workers_at_a_step(tmp_path):
    cells = [*SMALL, "epochs=300", f"out_root={tmp_path}"]
    folders = [tmp_path / "default" / run_name(compose_config(cells + [f"seed={seed}"]))
               for seed in (0, 1)]
    sweep = launch(["-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", "threads=1",
                    *cells, "seed=0,1"], tmp_path)
    workers = []
    try:
        wait_for(lambda: all((f / "metrics.jsonl").exists() for f in folders), 180,
                 "both runs to finish an epoch")
        workers = children_of(sweep.pid)
        sweep.kill()  # kill -9 of the sweep's launcher
        sweep.wait()
        # each worker notices within a second, stops at its next step, records that
        wait_for(lambda: not any(records.is_in_use(f) for f in folders), 60,
                 "the workers to let go of their run folders")
    finally:
        sweep.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for folder in folders:
        launches = records.read_launches(folder)
        assert launches and launches[-1]["outcome"] == "interrupted", (launches, folder)
        assert not (folder / "summary.json").exists()
        assert RunFolder(folder).load_checkpoint()["epoch"] >= 1  # a relaunch resumes from it


def test_sigterm_stops_a_run_like_ctrl_c_and_keeps_its_checkpoint(tmp_path):
    folder = tmp_path / "run"
    process = launch([*SMALL, "epochs=300", f"hydra.run.dir={folder}"], tmp_path)
    try:
        wait_for(lambda: (folder / "metrics.jsonl").exists(), 120, "the first epoch")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143
    assert "stopped by SIGTERM; relaunch to resume from the last checkpoint" in stderr
    assert "Traceback" not in stderr
    assert records.last_launch(folder)["outcome"] == "interrupted"
    assert not (folder / "summary.json").exists()
    assert RunFolder(folder).load_checkpoint()["epoch"] >= 1  # (stopped mid-save: the previous)


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


def refused_on_the_command_line(overrides: list[str], tmp_path: Path,
                                base: list[str] = SMALL) -> str:
    """Run `python run.py BASE OVERRIDES` with its folders under tmp_path/out; check that it
    exits 2 without a traceback or training, and return its last line on stderr. A -m among
    the overrides makes it a sweep."""
    flags = [arg for arg in overrides if arg == "-m"]
    overrides = [arg for arg in overrides if arg != "-m"]
    result = run_cli(flags + base + ["epochs=1", f"out_root={tmp_path / 'out'}"] + overrides,
                     cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "epoch 1/" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def failed_summaries(tmp_path: Path) -> list[str]:
    return [json.loads(p.read_text())["status"] for p in tmp_path.rglob("summary.json")]


@pytest.mark.parametrize("key", ["optim.nesterov", "model.zero_init_last", "deterministic",
                                 "dataset.augment", "optim.norm_weight_decay"])
def test_a_word_for_a_boolean_is_refused_not_taken_as_true(key, tmp_path):
    # Hydra passes `no` as the string "no", which Python would take as true
    line = refused_on_the_command_line([f"{key}=no"], tmp_path)
    assert line.endswith(f"{key}='no' is not allowed; choose one of: true, false")
    assert failed_summaries(tmp_path) == ["failed"]


@pytest.mark.parametrize("overrides, message", [
    (["norm=gn", "norm.groups=abc"],
     "norm.groups='abc' is not allowed; it must be an integer >= 1 (or null)"),
    (["norm.eps=abc"], "norm.eps='abc' is not allowed; it must be a finite number > 0"),
    (["dataset.image_size=0"], "dataset.image_size=0 is not allowed; it must be an integer >= 1"),
    (["dataset.image_size=abc"],
     "dataset.image_size='abc' is not allowed; it must be an integer >= 1"),
    (["dataset.noise=abc"], "dataset.noise='abc' is not allowed; it must be a finite number >= 0"),
])
def test_a_value_of_the_wrong_type_is_refused_in_one_line(overrides, message, tmp_path):
    assert refused_on_the_command_line(overrides, tmp_path).endswith(message)
    assert failed_summaries(tmp_path) == ["failed"]


@pytest.mark.parametrize("override, message", [
    ("optim.lr_per_256=nan", "optim.lr_per_256=nan is not allowed; it must be a finite number >= 0"),
    ("optim.lr_per_256=inf", "optim.lr_per_256=inf is not allowed; it must be a finite number >= 0"),
    ("norm.eps=-1", "norm.eps=-1 is not allowed; it must be a finite number > 0"),
])
def test_a_number_out_of_range_is_refused_not_recorded_as_diverged(override, message, tmp_path):
    assert refused_on_the_command_line([override], tmp_path).endswith(message)
    assert failed_summaries(tmp_path) == ["failed"]  # not "diverged": nothing was trained


@pytest.mark.parametrize("overrides, message", [
    (["experiment_name=../../x"], "experiment_name='../../x' is not allowed; it names a folder: "
                                  "choose a plain name, not empty, without '/' or '\\', and not "
                                  "'.' or '..'"),
    (["-m", "experiment_name=../../x"], "experiment_name='../../x' is not allowed"),
    (["norm.name=../../../x"], "norm.name='../../../x' is not allowed; it names a folder"),
    (["out_root="], "out_root='' is not allowed; it must be a folder path, e.g. runs"),
])
def test_a_name_that_would_leave_out_root_is_refused_before_any_folder_is_made(
        overrides, message, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    # out_root= last, so that it replaces the out_root set by refused_on_the_command_line
    line = refused_on_the_command_line(overrides, work)
    assert line == f"error: {message}" or line.startswith(f"error: {message}")
    # no folder anywhere (an empty out_root made them at /default/, at the filesystem's root)
    assert [p for p in tmp_path.rglob("*") if p != work] == []


def test_an_unwritable_cache_dir_is_refused_naming_it(tmp_path):
    root = tmp_path / "pets"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (16, 16), (i * 90, 40, 200)).save(root / split / name / f"{i}.png")
    (tmp_path / "afile").write_text("a regular file: nothing can be made under it")
    cache = tmp_path / "afile" / "cache"
    line = refused_on_the_command_line(
        ["dataset=imagefolder", f"dataset.root={root}", f"dataset.cache_dir={cache}",
         "dataset.num_classes=2", "dataset.image_size=16", "batch=2", "workers=2"], tmp_path,
        base=TINY_RUN)
    assert line.endswith(f"dataset.cache_dir='{cache}' cannot be written ([Errno 20] Not a "
                         f"directory: '{cache}'); choose a writable folder for the decoded images")
    assert failed_summaries(tmp_path) == ["failed"]


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
    with pytest.raises(RecordsError, match=re.escape(f"checkpoint {folder.checkpoint_path} is "
                                                     f"unreadable (UnpicklingError: Weights only "
                                                     f"load failed")):
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


# ---- the report on damaged records ------------------------------------------------------------
def test_report_on_damaged_records_exits_2_naming_the_file(folder, tmp_path):
    (folder / "summary.json").write_text("[1, 2]\n")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(tmp_path),
                             "--out", str(tmp_path / "report")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {folder / 'summary.json'} is damaged: it holds a list, not a JSON object with a "
        f"status; move it away to let the run resume from its checkpoint")
    assert not (tmp_path / "report").exists()


# ---- docs/reliability.md ----------------------------------------------------------------------
TABLE_HEADER = "| fault or input | message | exit code | what is kept | test |"
PLACEHOLDER = re.compile(r"<[^>]+>\S*|\[\.\.\.\]")  # <run>/summary.json: a path, not words
WINDOW = 4  # words: a quoted message matches the code where most of its 4-word runs do


def table_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = lines.index(TABLE_HEADER) + 2  # after the header and its --- line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append(cells)
    return rows


def string_constants(path: Path) -> list[str]:
    """Every string a Python file spells, f-strings cut at their {fields}, whitespace folded."""
    import ast

    pieces = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            pieces.append(node.value)
    return [" ".join(piece.split()) for piece in pieces]


def test_reliability_table_names_real_tests_and_real_messages():
    rows = table_rows((ROOT / "docs" / "reliability.md").read_text())
    assert rows and all(len(row) == 5 for row in rows), [r for r in rows if len(r) != 5]
    sources = [ROOT / "run.py", *(ROOT / "normbench").rglob("*.py"),
               *(ROOT / "scripts").glob("*.py")]
    code = "\n".join(c for path in sources for c in string_constants(path))
    listed, problems = set(), []
    for case, message, _, _, tests in rows:
        named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", tests)
        if not named:
            problems.append(f"{case}: no test named")
        spelled = code
        for file, function in named:
            path = ROOT / "tests" / file
            if not path.exists() or not re.search(rf"^def {function}\(", path.read_text(), re.M):
                problems.append(f"{case}: {file}::{function} does not exist")
                continue
            listed.add((file, function))
            spelled += "\n" + "\n".join(string_constants(path))
        for quoted in re.findall(r"`([^`]+)`", message):
            for piece in PLACEHOLDER.split(quoted):
                words = piece.split()
                windows = [" ".join(words[i:i + WINDOW]) for i in range(len(words) - WINDOW + 1)]
                found = sum(window in spelled for window in windows)
                if windows and found * 2 < len(windows):
                    problems.append(f"{case}: message {piece!r} is not in the code nor its tests")
    assert problems == [], "\n".join(problems)
    own = {("test_reliability.py", name) for name in re.findall(
        r"^def (test_\w+)\(", (ROOT / "tests" / "test_reliability.py").read_text(), re.M)}
    assert sorted(own - listed) == []  # every case tried here is in the table
