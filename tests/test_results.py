"""Tests for normbench.results, and the fabricated run folders shared with test_plots/test_report.

`make_experiment` writes run folders with known numbers the way the training runner does
(config.yaml, metrics.jsonl, summary.json). Every completed run has the test-error curve
`curve(e) = [50, e+1, e-1, e, e+0.5, e-0.5]`, so its median of the last 5 epochs is `e`, its last
epoch `e - 0.5` and its best `e - 1`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from normbench import results
from normbench.records import RecordsError

# Median-of-last-5 test error per (norm, batch) and seed; "diverged" / "failed" mark those runs.
GRID = {
    ("bn", 32): [10.0, 11.0],
    ("bn", 8): [12.0, 14.0],
    ("bn", 2): ["diverged", 30.0],
    ("gn", 32): [11.0, 12.0],
    ("gn", 8): [11.5, 12.5],
    ("gn", 2): [12.0, "failed"],
}
# bn runs also record the train-mode / eval-mode gap; its last-epoch value by batch.
BN_GAP = {32: 0.5, 8: 2.0, 2: 10.0}
# Added to every error of placement "after" runs.
AFTER_OFFSET = 1.0
COMMAND = "python run.py -m +experiment=toy seed=0,1"


def curve(e: float) -> list[float]:
    """Test errors per epoch whose median of the last 5 is e."""
    return [50.0, e + 1.0, e - 1.0, e, e + 0.5, e - 0.5]


def config_for(experiment: str, dataset: str, norm: str, batch: int, seed: int, placement: str,
               **norm_options) -> dict:
    # As conf/norm/gn.yaml: groups 32, and group_channels (which replaces groups when set) null.
    gn_defaults = {"groups": 32, "group_channels": None} if norm == "gn" else {}
    norm_config = {"name": norm, **gn_defaults, **norm_options}
    return {
        "experiment_name": experiment,
        "norm": norm_config,
        "batch": batch,
        "workers": 8,
        "placement": placement,
        "act": "relu",
        "model": {"name": "resnet20", "stem": "cifar", "width": 16},
        "dataset": {"name": dataset, "root": "data"},
        "epochs": 6,
        "seed": seed,
        "optim": {"lr_per_256": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "milestones": [3, 5]},
        "out_dir": f"runs/{experiment}/{norm}-b{batch}-s{seed}-{placement}",
        # As conf/config.yaml, with a project of its own: the report's W&B run goes there too.
        "wandb": {"mode": "offline", "project": "normbench-toy", "entity": None,
                  "group": experiment},
    }


def metric_lines(test_errors: list[float], batch: int, gap: float | None) -> list[dict]:
    lines = []
    for epoch, test_error in enumerate(test_errors, start=1):
        line = {
            "epoch": epoch,
            "step": epoch * 100,
            "train_loss": 1.0 / epoch,
            "train_error": test_error - 5.0,
            "test_loss": 1.5 / epoch,
            "test_error": test_error,
            "lr": 0.1,
            "images_per_second": 100.0 * batch,
            "epoch_time": 10.0,
            "wall_time": 10.0 * epoch,
        }
        if gap is not None:
            line["train_mode_test_error"] = test_error + gap
            line["bn_gap"] = gap
        lines.append(line)
    return lines


def write_run(run_dir: Path, config: dict, lines: list[dict], summary: dict | None,
              truncated_tail: str | None = None) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if truncated_tail is not None:
        text += truncated_tail
    (run_dir / "metrics.jsonl").write_text(text)
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    # Hydra keeps its own config.yaml in .hydra/ of each run; the loader must not take it for a run.
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("not: a run\n")
    # Nor is the copy W&B keeps in <run folder>/wandb/.../files/.
    wandb_files = run_dir / "wandb" / "offline-run-1" / "files"
    wandb_files.mkdir(parents=True)
    (wandb_files / "config.yaml").write_text("not: a run either\n")


def completed_summary(test_errors: list[float], batch: int) -> dict:
    return {
        "status": "completed",
        "final_error": test_errors[-1],
        "median5_error": float(pd.Series(test_errors[-5:]).median()),
        "best_error": min(test_errors),
        "epochs": len(test_errors),
        "images_per_second": 100.0 * batch,
        "wall_time": 10.0 * len(test_errors),
        "device": "cuda",
    }


def make_experiment(root: Path, experiment: str = "toy", dataset: str = "cifar10",
                    placements: tuple[str, ...] = ("before",)) -> Path:
    """Write GRID (plus one incomplete run) as run folders under root/<experiment>; return it.

    bn runs sit one folder deeper (root/<experiment>/bn/<run>) to check the recursive search.
    """
    experiment_dir = root / experiment
    for placement in placements:
        offset = AFTER_OFFSET if placement == "after" else 0.0
        for (norm, batch), outcomes in GRID.items():
            for seed, outcome in enumerate(outcomes):
                config = config_for(experiment, dataset, norm, batch, seed, placement)
                name = f"{norm}-b{batch}-s{seed}-{placement}"
                run_dir = experiment_dir / (f"bn/{name}" if norm == "bn" else name)
                gap = BN_GAP[batch] if norm == "bn" else None
                if outcome == "diverged":
                    lines = metric_lines([50.0, 60.0], batch, gap)
                    summary = {"status": "diverged", "final_error": None, "median5_error": None,
                               "best_error": None, "epochs": 2, "images_per_second": 100.0 * batch,
                               "wall_time": 20.0, "diverged_at": {"epoch": 3, "step": 250}}
                elif outcome == "failed":
                    lines = metric_lines([50.0], batch, gap)
                    summary = {"status": "failed", "epochs": 1,
                               "error": "RuntimeError: out of memory"}
                else:
                    errors = curve(outcome + offset)
                    lines = metric_lines(errors, batch, gap)
                    summary = completed_summary(errors, batch)
                write_run(run_dir, config, lines, summary)
        # An unfinished run: no summary.json, and the process died while writing epoch 4.
        config = config_for(experiment, dataset, "bn", 8, 2, placement)
        write_run(experiment_dir / f"bn/bn-b8-s2-{placement}", config,
                  metric_lines([50.0, 20.0, 18.0], 8, BN_GAP[8]), None,
                  truncated_tail='{"epoch": 4, "step": 400, "train_lo')
    (experiment_dir / "command.txt").write_text(COMMAND + "\n")
    return experiment_dir


def make_groups_experiment(root: Path) -> Path:
    """GN at batch 32 with G = 32, 16, 1 and 16, 4 channels per group, 2 seeds; plus ln.

    Runs setting channels per group keep the default groups=32, as the real configs do.
    """
    experiment_dir = root / "gn_groups"
    cells = [({"groups": 32}, 24.0), ({"groups": 16}, 24.5), ({"groups": 1}, 25.0),
             ({"group_channels": 16}, 24.2), ({"group_channels": 4}, 24.8)]
    for index, (options, error) in enumerate(cells):
        for seed in (0, 1):
            config = config_for("gn_groups", "imagenet", "gn", 32, seed, "before", **options)
            errors = curve(error + 0.2 * seed)
            write_run(experiment_dir / f"gn{index}-s{seed}", config, metric_lines(errors, 32, None),
                      completed_summary(errors, 32))
    for seed in (0, 1):
        config = config_for("gn_groups", "imagenet", "ln", 32, seed, "before")
        errors = curve(25.3)
        write_run(experiment_dir / f"ln-s{seed}", config, metric_lines(errors, 32, None),
                  completed_summary(errors, 32))
    return experiment_dir


# --------------------------------------------------------------------------- tests


@pytest.fixture
def experiment_dir(tmp_path: Path) -> Path:
    return make_experiment(tmp_path)


@pytest.fixture
def runs(experiment_dir: Path) -> pd.DataFrame:
    with pytest.warns(UserWarning, match="truncated"):
        return results.load_runs(experiment_dir)


def row(runs: pd.DataFrame, norm: str, batch: int, seed: int) -> pd.Series:
    match = runs[(runs["norm"] == norm) & (runs["batch"] == batch) & (runs["seed"] == seed)]
    assert len(match) == 1
    return match.iloc[0]


def test_load_runs_finds_every_run_and_skips_hydra_and_wandb_folders(runs):
    # 12 grid runs + 1 incomplete; .hydra/ and wandb/ config.yaml files are not runs.
    assert len(runs) == 13
    assert not runs["run_dir"].str.contains(".hydra|wandb").any()
    assert sorted(runs["status"].value_counts().items()) == [
        ("completed", 10), ("diverged", 1), ("failed", 1), ("incomplete", 1)]


def test_load_runs_flattens_config_and_adds_short_names(runs):
    first = row(runs, "gn", 32, 0)
    assert first["norm.name"] == "gn" and first["norm"] == "gn"
    assert first["norm.groups"] == 32
    assert first["model"] == "resnet20" and first["model.width"] == 16
    assert first["dataset"] == "cifar10"
    assert first["optim.lr_per_256"] == pytest.approx(0.1)
    assert first["optim.milestones"] == (3, 5)
    assert math.isnan(row(runs, "bn", 32, 0)["norm.groups"])


def test_load_runs_values_of_completed_run(runs):
    run = row(runs, "bn", 8, 1)
    assert run["status"] == "completed"
    assert run["median5_error"] == pytest.approx(14.0)
    assert run["final_error"] == pytest.approx(13.5)
    assert run["best_error"] == pytest.approx(13.0)
    # training errors 45, 10, 8, 9, 9.5, 8.5: the last, and the fall from 5 epochs before the end
    assert run["final_train_error"] == pytest.approx(8.5)
    assert run["train_error_fall5"] == pytest.approx(10.0 - 8.5)
    assert run["epochs_done"] == 6
    assert run["images_per_second"] == pytest.approx(800.0)
    assert run["wall_time"] == pytest.approx(60.0)
    assert run["bn_gap"] == pytest.approx(2.0)
    assert run["train_mode_test_error"] == pytest.approx(15.5)
    assert run["trained_on"] == "cuda"
    assert math.isnan(row(runs, "gn", 8, 1)["bn_gap"])


def test_load_runs_diverged_failed_and_incomplete(runs):
    diverged = row(runs, "bn", 2, 0)
    assert diverged["status"] == "diverged"
    assert math.isnan(diverged["median5_error"])
    assert (diverged["diverged_epoch"], diverged["diverged_step"]) == (3, 250)
    assert diverged["epochs_done"] == 2

    failed = row(runs, "gn", 2, 1)
    assert failed["status"] == "failed"
    assert failed["error_message"] == "RuntimeError: out of memory"
    # The summary has no errors, so they come from the one finished epoch.
    assert failed["final_error"] == pytest.approx(50.0)

    incomplete = row(runs, "bn", 8, 2)
    assert incomplete["status"] == "incomplete"
    assert incomplete["epochs_done"] == 3  # the truncated 4th line is ignored
    assert incomplete["final_error"] == pytest.approx(18.0)
    assert incomplete["median5_error"] == pytest.approx(20.0)
    assert incomplete["best_error"] == pytest.approx(18.0)
    assert incomplete["wall_time"] == pytest.approx(30.0)


def test_load_runs_without_runs_names_the_folder(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        results.load_runs(empty)


def test_run_folder_without_config_is_named_in_a_warning(experiment_dir):
    broken = experiment_dir / "gn-b8-s9-before"
    broken.mkdir()
    (broken / "run.log").write_text("ImportError: ...\n")
    with pytest.warns(UserWarning) as caught:
        runs = results.load_runs(experiment_dir)
    assert len(runs) == 13
    assert any("gn-b8-s9-before looks like a run folder" in str(w.message) for w in caught)


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    run_dir = tmp_path / "exp" / "run"
    write_run(run_dir, config_for("exp", "cifar10", "bn", 8, 0, "before"),
              metric_lines([50.0, 40.0], 8, None), None)
    text = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text("{broken\n" + text)
    with pytest.raises(RecordsError, match="metrics.jsonl is damaged: line 1 is not valid JSON"):
        results.load_runs(tmp_path / "exp")


def test_resumed_run_keeps_the_last_record_of_an_epoch(tmp_path):
    run_dir = tmp_path / "exp" / "run"
    lines = metric_lines([50.0, 40.0], 8, None) + metric_lines([50.0, 30.0], 8, None)[1:]
    write_run(run_dir, config_for("exp", "cifar10", "bn", 8, 0, "before"), lines, None)
    run = results.load_runs(tmp_path / "exp").iloc[0]
    assert run["epochs_done"] == 2
    assert run["final_error"] == pytest.approx(30.0)


def test_swept_columns(runs):
    # norm.groups exists for gn only: explained by the norm, so not a sweep.
    assert results.swept_columns(runs) == ["batch", "norm", "seed"]


def test_swept_columns_of_groups_ablation(tmp_path):
    runs = results.load_runs(make_groups_experiment(tmp_path))
    assert results.swept_columns(runs) == ["norm", "norm.group_channels", "norm.groups", "seed"]
    assert results.extra_factors(runs) == ["norm.group_channels", "norm.groups"]


def test_summarize_means_stds_and_status_counts(runs):
    summary = results.summarize(runs).set_index(["norm", "placement", "batch"])
    assert list(summary.columns) == ["metric", "mean", "std", "count", "diverged", "failed",
                                     "incomplete"]
    assert len(summary) == 6
    bn32 = summary.loc[("bn", "before", 32)]
    assert bn32["mean"] == pytest.approx(10.5)
    assert bn32["std"] == pytest.approx(math.sqrt(0.5))
    assert bn32["count"] == 2
    bn8 = summary.loc[("bn", "before", 8)]
    assert (bn8["mean"], bn8["std"]) == (pytest.approx(13.0), pytest.approx(math.sqrt(2.0)))
    assert (bn8["count"], bn8["incomplete"]) == (2, 1)
    bn2 = summary.loc[("bn", "before", 2)]
    assert (bn2["mean"], bn2["count"], bn2["diverged"]) == (pytest.approx(30.0), 1, 1)
    assert math.isnan(bn2["std"])
    gn2 = summary.loc[("gn", "before", 2)]
    assert (gn2["mean"], gn2["count"], gn2["failed"], gn2["diverged"]) == (
        pytest.approx(12.0), 1, 1, 0)
    assert summary["metric"].eq("median5_error").all()


def test_summarize_keeps_cells_where_every_seed_diverged(runs):
    runs = runs[~((runs["norm"] == "bn") & (runs["batch"] == 2) & (runs["seed"] == 1))]
    bn2 = results.summarize(runs).set_index(["norm", "batch"]).loc[("bn", 2)]
    assert bn2["count"] == 0 and bn2["diverged"] == 1
    assert math.isnan(bn2["mean"])


def test_summarize_other_metric_and_missing_keys(runs):
    summary = results.summarize(runs, metric="final_error", by=("norm", "batch"))
    gn8 = summary.set_index(["norm", "batch"]).loc[("gn", 8)]
    assert gn8["mean"] == pytest.approx(11.5)  # (11.0 + 12.0) / 2
    with pytest.raises(KeyError, match="nonexistent"):
        results.summarize(runs, by=("norm", "nonexistent"))


def test_summarize_shape_pairs_seeds_with_the_base_batch(runs):
    shape = results.summarize_shape(runs).set_index(["norm", "placement", "batch"])
    assert list(shape.columns) == ["metric", "mean", "std", "count", "diverged", "failed",
                                   "incomplete"]
    bn32 = shape.loc[("bn", "before", 32)]
    assert (bn32["mean"], bn32["count"]) == (0.0, 2)
    # bn at 8: 12 - 10 and 14 - 11 (the incomplete third seed has no pair, and did not finish)
    bn8 = shape.loc[("bn", "before", 8)]
    assert (bn8["mean"], bn8["std"], bn8["count"]) == (
        pytest.approx(2.5), pytest.approx(math.sqrt(0.5)), 2)
    assert bn8["incomplete"] == 1
    # bn at 2: seed 0 diverged, so seed 1 alone: 30 - 11, not 30 - mean(10, 11)
    bn2 = shape.loc[("bn", "before", 2)]
    assert (bn2["mean"], bn2["count"], bn2["diverged"]) == (pytest.approx(19.0), 1, 1)
    gn2 = shape.loc[("gn", "before", 2)]
    assert (gn2["mean"], gn2["count"], gn2["failed"]) == (pytest.approx(1.0), 1, 1)


def test_summarize_shape_without_a_base_seed_has_no_value(runs):
    # gn's seed 0 misses batch 32: its batch-8 and batch-2 runs have nothing to pair with
    runs = runs[~((runs["norm"] == "gn") & (runs["batch"] == 32) & (runs["seed"] == 0))]
    gn = results.summarize_shape(runs).set_index(["norm", "batch"]).loc["gn"]
    assert gn.loc[8, "count"] == 1 and gn.loc[8, "mean"] == pytest.approx(0.5)  # 12.5 - 12
    assert gn.loc[2, "count"] == 0 and math.isnan(gn.loc[2, "mean"])


def test_summarize_groups_with_missing_keys(tmp_path):
    runs = results.load_runs(make_groups_experiment(tmp_path))
    summary = results.summarize(runs, by=("norm", "norm.groups", "norm.group_channels"))
    assert len(summary) == 6  # 5 gn settings + ln (whose groups are missing, not dropped)
    g16 = summary[summary["norm.groups"] == 16].iloc[0]
    assert g16["mean"] == pytest.approx(24.6)
    assert g16["std"] == pytest.approx(math.sqrt(0.02))


def test_load_curves_long_format(experiment_dir):
    with pytest.warns(UserWarning, match="truncated"):
        curves = results.load_curves(experiment_dir)
    # 10 completed runs x 6 epochs + diverged 2 + failed 1 + incomplete 3
    assert len(curves) == 10 * 6 + 2 + 1 + 3
    for column in ["run_dir", "status", "norm", "placement", "batch", "seed", "epoch",
                   "train_error", "test_error", "bn_gap"]:
        assert column in curves.columns
    run = curves[(curves["norm"] == "gn") & (curves["batch"] == 32) & (curves["seed"] == 1)]
    assert run["epoch"].tolist() == [1, 2, 3, 4, 5, 6]
    assert run["test_error"].tolist() == pytest.approx(curve(12.0))
    assert run["train_error"].tolist() == pytest.approx([e - 5.0 for e in curve(12.0)])


def test_paper_numbers_are_labelled():
    paper = results.PAPER_RESNET50_IMAGENET.set_index(["norm", "batch"])["error"]
    assert paper[("bn", 2)] == 34.7 and paper[("gn", 2)] == 24.1
    assert paper[("ln", 32)] == 25.3 and paper[("in", 32)] == 28.4 and paper[("brn", 4)] == 26.3
    assert results.PAPER_RESNET50_IMAGENET["source"].str.contains("1803.08494").all()
    assert results.PAPER_GN_GROUPS.set_index("groups")["error"][32] == 24.1
    assert results.PAPER_GN_GROUP_CHANNELS.set_index("group_channels")["error"][1] == 28.4
    keras = results.KERAS_RESNET32_CIFAR10.set_index(["norm", "batch"])["error"]
    assert keras[("bn", 2)] == 19.70 and keras[("gn", 32)] == 14.05
    assert results.KERAS_RESNET32_CIFAR10["source"].str.contains("Keras").all()


def test_trained_on_names_device_precision_and_processor():
    from normbench.results import trained_on
    assert trained_on({"device": "cpu", "precision": "bf16",
                       "machine": {"cpu": "Xeon", "gpu": None}}) == "cpu, bf16, Xeon"
    assert trained_on({"device": "cuda:0", "precision": "bf16",
                       "machine": {"cpu": "Xeon", "gpu": "H200"}}) == "cuda:0, bf16, H200"
    assert trained_on({"device": "cpu"}) == "cpu"  # summaries written before precision=auto
