"""W&B runs as W&B users expect them, checked by reading the offline run files W&B writes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helpers beside the tests, in any import mode
from conftest import TINY, compose_config  # noqa: E402
from wandb_files import offline_run  # noqa: E402

from normbench import tracking  # noqa: E402
from normbench.config import parse_config, run_name  # noqa: E402


@pytest.fixture(autouse=True)
def _wandb_here(wandb_in_tmp):
    """Every test of this file keeps W&B's files in its own folder (conftest.wandb_in_tmp)."""


def offline_runs(folder: Path) -> list[dict]:
    """The offline W&B runs under a folder, oldest first (their folder names hold the time)."""
    files = sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))
    return [offline_run(path) for path in files]


def test_train_run_has_job_type_tags_group_and_nested_config(tmp_path):
    cfg = parse_config(compose_config(TINY + ["norm=gn", "norm.groups=4", "batch=2",
                                              "wandb.mode=offline"]))
    tracker = tracking.Tracker(cfg.wandb, tmp_path, cfg, name=run_name(cfg))
    tracker.log({"epoch": 1, "test_error": 50.0}, step=1)
    tracker.finish()
    (run,) = offline_runs(tmp_path)
    assert run["job_type"] == "train"
    assert run["group"] == cfg.wandb.group == "default"
    assert run["project"] == cfg.wandb.project
    assert run["tags"] == ["norm=gn", "batch=2", "workers=4", "placement=before",
                           "model=resnet8", "dataset=synthetic"]
    config = run["config"]
    # Nested as config.yaml, so W&B shows norm.groups, optim.lr_per_256: not "norm.groups" keys.
    assert config["norm"]["name"] == "gn" and config["norm"]["groups"] == 4
    assert config["optim"]["lr_per_256"] == cfg.optim.lr_per_256
    assert not any("." in key for key in config)
    assert config["global_batch"] == 8
    assert [row["test_error"] for row in run["history"]] == [50.0]


def test_disabled_tracker_writes_nothing(tmp_path):
    cfg = parse_config(compose_config(TINY))
    tracker = tracking.Tracker(cfg.wandb, tmp_path, cfg, history=[{"epoch": 1}])
    tracker.log({"epoch": 1}, step=1)
    tracker.finish()
    assert tracker.run_id is None and not (tmp_path / "wandb").exists()


def test_resumed_run_holds_every_epoch_once_in_its_newest_offline_run(tmp_path, monkeypatch):
    from normbench import train

    cfg = parse_config(compose_config(TINY + ["epochs=3", "wandb.mode=offline"]))
    run_dir = tmp_path / "run"
    real_train_epoch = train.Trainer.train_epoch

    def crash_in_epoch_3(self):
        if self.epoch == 2:
            raise RuntimeError("simulated crash in epoch 3")
        return real_train_epoch(self)

    monkeypatch.setattr(train.Trainer, "train_epoch", crash_in_epoch_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(cfg, run_dir)
    monkeypatch.setattr(train.Trainer, "train_epoch", real_train_epoch)
    summary = train.run(cfg, run_dir)
    assert summary["outcome"] == "resumed" and summary["status"] == "completed"

    first, second = offline_runs(run_dir)
    assert first["id"] == second["id"]  # one W&B run, launched twice
    assert [row["epoch"] for row in first["history"]] == [1, 2]
    # Offline W&B cannot resume, and syncing keeps the newest folder's history: it has them all.
    assert [row["_step"] for row in second["history"]] == [1, 2, 3]
    assert [row["epoch"] for row in second["history"]] == [1, 2, 3]
    # The re-logged epochs are the checkpoint's records, the same numbers the first launch logged.
    assert [row["test_error"] for row in second["history"][:2]] == pytest.approx(
        [row["test_error"] for row in first["history"]])
    assert second["summary"]["status"] == "completed"


class FakeResumedRun:
    """What wandb.init returns for a run resumed online after epoch 2: it expects step 3 next."""

    id = "resumed1"
    starting_step = 3

    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log(self, metrics: dict, step: int) -> None:
        self.logged.append((metrics, step))


def test_resumed_online_run_gets_only_the_epochs_it_lacks(tmp_path, monkeypatch):
    # Online W&B resumes the run itself: logging its epochs again would be dropped (steps must
    # increase), so only the epochs after its last step are logged from the checkpoint.
    run = FakeResumedRun()
    monkeypatch.setattr(tracking, "_start", lambda settings, run_dir, **init: run)
    cfg = parse_config(compose_config(TINY + ["wandb.mode=online"]))
    history = [{"epoch": epoch, "test_error": 50.0 - epoch} for epoch in (1, 2, 3, 4)]
    tracker = tracking.Tracker(cfg.wandb, tmp_path, cfg, run_id="resumed1", history=history)
    assert tracker.run_id == "resumed1"
    assert [step for _, step in run.logged] == [3, 4]
    assert run.logged[0][0] == {"epoch": 3, "test_error": 47.0}
