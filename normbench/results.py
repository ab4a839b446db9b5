"""Load the run folders of an experiment into pandas, and the published numbers to compare with.

A run folder holds `config.yaml` (the resolved config), `metrics.jsonl` (one line per finished
epoch) and, once the run has ended, `summary.json`; :mod:`normbench.records` owns that format and
this module reads the files through it (damaged records raise its RecordsError, naming the file).
It never talks to W&B (that needs a network) and never imports Hydra.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from normbench import records
from normbench.records import (COMPLETED, CONFIG_FILE, DIVERGED, FAILED, INCOMPLETE, STATUSES,
                               find_run_dirs, read_metrics, read_summary)

# Config groups whose `name` is also given as a short column (`norm` = `norm.name`).
ALIASED_GROUPS = ("norm", "model", "dataset")

# Columns load_runs adds from the records; everything else in its frame comes from config.yaml.
RESULT_COLUMNS = (
    "run_dir",
    "status",
    "final_error",
    "median5_error",
    "best_error",
    "final_train_error",
    "train_error_fall5",
    "bn_gap",
    "train_mode_test_error",
    "images_per_second",
    "wall_time",
    "epochs_done",
    "diverged_epoch",
    "diverged_step",
    "error_message",
    "trained_on",
)

# Per-epoch metrics that load_curves keeps (the optional ones only when some run has them).
CURVE_METRICS = (
    "step",
    "train_loss",
    "train_error",
    "test_loss",
    "test_error",
    "lr",
    "images_per_second",
    "epoch_time",
    "wall_time",
    "train_mode_test_error",
    "bn_gap",
)

# Config keys that differ between runs without being part of what was swept (paths, logging).
_NOT_SWEPT_PREFIXES = ("wandb.", "hydra.")
_NOT_SWEPT_SUFFIXES = ("dir", "path")


# --------------------------------------------------------------------------- reading one run


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Return a flat dict with dotted keys (`norm.groups`); lists become tuples so they hash."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}."))
        elif isinstance(value, list):
            flat[name] = tuple(value)
        else:
            flat[name] = value
    return flat


def read_config(run_dir: Path) -> dict[str, Any]:
    """Return the run's flattened config with the short `norm`, `model`, `dataset` columns."""
    config = records.read_config(run_dir)
    if config is None:
        raise records.RecordsError(f"{Path(run_dir) / CONFIG_FILE} does not exist")
    flat = flatten_config(config)
    for group in ALIASED_GROUPS:
        if f"{group}.name" in flat:
            flat[group] = flat[f"{group}.name"]
    return flat


def _number(value: Any) -> float:
    """Return value as float, NaN for None (JSON null)."""
    return math.nan if value is None else float(value)


def _last(records: list[dict[str, Any]], key: str) -> float:
    """Return the last epoch's value of key, NaN when absent."""
    return _number(records[-1].get(key)) if records else math.nan


def _last_bn_gap(records: list[dict[str, Any]]) -> float:
    """Return the last epoch's train-mode minus eval-mode test error, NaN when not recorded."""
    if not records:
        return math.nan
    last = records[-1]
    if last.get("bn_gap") is not None:
        return float(last["bn_gap"])
    if last.get("train_mode_test_error") is not None and last.get("test_error") is not None:
        return float(last["train_mode_test_error"]) - float(last["test_error"])
    return math.nan


def results_from_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the summary numbers derived from the per-epoch records alone."""
    test_errors = pd.Series([_number(r.get("test_error")) for r in records], dtype=float)
    train_errors = pd.Series([_number(r.get("train_error")) for r in records], dtype=float)
    speeds = pd.Series([_number(r.get("images_per_second")) for r in records], dtype=float)
    return {
        "final_error": _last(records, "test_error"),
        # The paper's metric: median test error of the last 5 epochs (fewer if fewer ran).
        "median5_error": float(test_errors.tail(5).median()) if records else math.nan,
        "best_error": float(test_errors.min()) if records else math.nan,
        # Whether training had converged: the last epoch's training error, and how many points
        # it fell over the last 5 epochs (about 0: flat; a run still learning falls).
        "final_train_error": _last(records, "train_error"),
        "train_error_fall5": (float(train_errors.tail(5).iloc[0] - train_errors.iloc[-1])
                              if records else math.nan),
        "images_per_second": float(speeds.median()) if records else math.nan,
        "wall_time": _last(records, "wall_time"),
        "epochs_done": len(records),
    }


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Return one row: the flattened config plus status and results of one run folder."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    summary = read_summary(run_dir)
    results = results_from_metrics(records)
    results["status"] = INCOMPLETE
    results["diverged_epoch"] = math.nan
    results["diverged_step"] = math.nan
    results["error_message"] = None
    results["trained_on"] = None
    if summary is not None:
        # The runner's summary is the record of truth; the metrics fill what it leaves out.
        results["status"] = summary["status"]
        for key in ("final_error", "median5_error", "best_error", "images_per_second", "wall_time"):
            if key in summary:
                results[key] = _number(summary[key])
        if summary.get("epochs") is not None:
            results["epochs_done"] = int(summary["epochs"])
        diverged_at = summary.get("diverged_at") or {}
        results["diverged_epoch"] = _number(diverged_at.get("epoch"))
        results["diverged_step"] = _number(diverged_at.get("step"))
        results["error_message"] = summary.get("error")
        results["trained_on"] = trained_on(summary)
    results["bn_gap"] = _last_bn_gap(records)
    results["train_mode_test_error"] = _last(records, "train_mode_test_error")
    row = read_config(run_dir)
    row.update(results)
    row["run_dir"] = str(run_dir)
    return row


def trained_on(summary: Mapping[str, Any]) -> str | None:
    """Where and how a run trained, from its summary: the torch device, the precision it
    actually used (``precision=auto`` decides per machine) and the processor, e.g.
    ``cpu, bf16, Intel(R) Xeon(R) Processor``. Older summaries hold only the device."""
    device = summary.get("device")
    if device is None:
        return None
    machine = summary.get("machine") or {}
    processor = machine.get("gpu") if str(device).startswith("cuda") else machine.get("cpu")
    return ", ".join(str(part) for part in (device, summary.get("precision"), processor) if part)


# --------------------------------------------------------------------------- whole experiments


def load_runs(experiment_dir: str | Path) -> pd.DataFrame:
    """Return a frame with one row per run: flattened config values and the run's results.

    Result columns: see RESULT_COLUMNS. `status` is one of STATUSES; a run without summary.json
    is `incomplete` and its numbers come from metrics.jsonl.
    """
    run_dirs = find_run_dirs(experiment_dir)
    if not run_dirs:
        raise records.NoRunsFound(
            f"no runs in {str(experiment_dir)!r}: no sub-folder holds a {CONFIG_FILE}"
        )
    rows = [load_run(run_dir) for run_dir in run_dirs]
    frame = pd.DataFrame(rows)
    config_columns = sorted(c for c in frame.columns if c not in RESULT_COLUMNS)
    return frame[config_columns + list(RESULT_COLUMNS)]


def config_columns(df: pd.DataFrame) -> list[str]:
    """Return the columns of a load_runs frame that come from config.yaml."""
    return [c for c in df.columns if c not in RESULT_COLUMNS]


def _is_bookkeeping(column: str) -> bool:
    """True for config keys that vary per run without being an experimental choice."""
    return column.startswith(_NOT_SWEPT_PREFIXES) or column.endswith(_NOT_SWEPT_SUFFIXES)


def _varies(values: pd.Series, norms: pd.Series | None) -> bool:
    """True when a config column takes different values across runs.

    An option present for some runs only counts as varying unless the norm explains it: in a
    bn-vs-gn sweep `norm.groups` exists for gn runs only, and that is not a sweep of groups.
    """
    if values.nunique(dropna=True) > 1:
        return True
    partly_missing = values.isna().any() and values.notna().any()
    if not partly_missing:
        return False
    if norms is None:
        return True
    presence_kinds_per_norm = values.notna().groupby(norms, dropna=False).nunique()
    return bool((presence_kinds_per_norm > 1).any())


def swept_columns(df: pd.DataFrame) -> list[str]:
    """Return the config columns whose values differ between runs: what the experiment swept.

    The short `norm`/`model`/`dataset` column is returned instead of its `<group>.name` twin, and
    paths and logging settings (wandb.*, hydra.*, *dir, *path) are never a sweep.
    """
    norms = df["norm"] if "norm" in df.columns else None
    swept = []
    for column in config_columns(df):
        if _is_bookkeeping(column):
            continue
        if column.endswith(".name") and column.removesuffix(".name") in df.columns:
            continue
        if _varies(df[column], norms):
            swept.append(column)
    return swept


def extra_factors(df: pd.DataFrame, core: Sequence[str] = ("norm", "placement", "batch")) -> list[str]:
    """Return the swept columns, besides `core` and `seed`, that split runs of one core cell.

    These are further factors of the experiment (e.g. `norm.groups` in the groups ablation) that
    a summary must group by. Columns that only follow a core column (a learning rate scaled with
    `batch`) are left out: they add no rows.
    """
    core = [c for c in core if c in df.columns]
    factors = []
    for column in swept_columns(df):
        if column in core or column == "seed":
            continue
        per_cell = df.groupby(core, dropna=False)[column].nunique(dropna=False) if core else None
        if per_cell is None or (per_cell > 1).any():
            factors.append(column)
    return factors


def load_curves(experiment_dir: str | Path) -> pd.DataFrame:
    """Return the learning curves in long format: one row per (run, epoch).

    Columns: `run_dir`, `status`, the swept config values (always including `norm`, `placement`,
    `batch` and `seed` when the configs have them), `epoch`, and the per-epoch metrics.
    """
    return curves_of(load_runs(experiment_dir))


def curves_of(runs: pd.DataFrame) -> pd.DataFrame:
    """Return load_curves' frame for the runs of a load_runs frame (reads their metrics.jsonl)."""
    keys = ["run_dir", "status"]
    for column in ["norm", "placement", "batch", "seed", *swept_columns(runs)]:
        if column in runs.columns and column not in keys:
            keys.append(column)
    frames = []
    for run in runs[keys].to_dict("records"):
        with warnings.catch_warnings():
            # load_runs has already warned about truncated lines in these files.
            warnings.simplefilter("ignore")
            records = read_metrics(Path(run["run_dir"]))
        if not records:
            continue
        curve = pd.DataFrame(records)
        for key in keys:
            curve[key] = run[key]
        frames.append(curve)
    metric_columns = ["epoch", *CURVE_METRICS]
    if not frames:
        return pd.DataFrame(columns=keys + metric_columns)
    curves = pd.concat(frames, ignore_index=True)
    present = [c for c in metric_columns if c in curves.columns]
    return curves[keys + present]


def summarize(
    df: pd.DataFrame,
    metric: str = "median5_error",
    by: Sequence[str] = ("norm", "placement", "batch"),
) -> pd.DataFrame:
    """Return mean, std and count of `metric` over seeds, one row per combination of `by`.

    Only completed runs enter `mean`, `std` (sample std, ddof=1; NaN for one seed) and `count`.
    Runs with other statuses are counted in the columns `diverged`, `failed` and `incomplete`, so
    a cell where every seed diverged still has a row (count 0, mean NaN). A `metric` column names
    what was summarized.
    """
    by = list(by)
    missing = [c for c in [*by, metric, "status"] if c not in df.columns]
    if missing:
        raise KeyError(f"summarize: columns {missing} not in the runs frame; have {list(df.columns)}")
    rows = []
    # dropna=False keeps groups whose key is missing, e.g. norm.groups for bn rows.
    for key, group in df.groupby(by, dropna=False, sort=True):
        done = group.loc[group["status"] == COMPLETED, metric].astype(float)
        row = dict(zip(by, key, strict=True))
        row.update(
            metric=metric,
            mean=done.mean(),
            std=done.std(ddof=1),
            count=int(done.count()),
            diverged=int((group["status"] == DIVERGED).sum()),
            failed=int((group["status"] == FAILED).sum()),
            incomplete=int((group["status"] == INCOMPLETE).sum()),
        )
        rows.append(row)
    return pd.DataFrame(rows, columns=[*by, "metric", "mean", "std", "count", "diverged", "failed", "incomplete"])


def summarize_shape(
    df: pd.DataFrame,
    metric: str = "median5_error",
    by: Sequence[str] = ("norm", "placement", "batch"),
) -> pd.DataFrame:
    """Return summarize()'s frame where `mean`, `std` and `count` describe each cell's `metric`
    minus its own series' at the largest batch of the frame, paired by seed.

    A seed enters a cell only where it completed both that cell and the series' base cell, so
    while a grid is partly run, the differences compare like with like: subtracting the base
    cell's mean over other seeds would add the seeds' difference to the shape (a seed that runs
    GN a point lower everywhere would show as a one-point bump at every batch it has not reached
    yet). With every seed in every cell it equals the difference of the cell means. Base cells
    hold 0.0 where any seed completed them.
    """
    by = list(by)
    series_keys = [c for c in by if c != "batch"]
    summary = summarize(df, metric=metric, by=by)
    done = df[df["status"] == COMPLETED]
    if done.empty:
        return summary
    # One value per seed and cell (a seed run twice in a cell counts once, as its mean).
    per_seed = done.groupby([*by, "seed"], dropna=False, as_index=False)[metric].mean()
    base = per_seed[per_seed["batch"] == df["batch"].max()]
    base = base.drop(columns="batch").rename(columns={metric: "base"})
    paired = per_seed.merge(base, on=[*series_keys, "seed"], how="inner")  # NaN keys match NaN
    paired["difference"] = paired[metric].astype(float) - paired["base"].astype(float)
    stats = paired.groupby(by, dropna=False, as_index=False)["difference"].agg(
        mean="mean", std=lambda d: d.std(ddof=1), count="count")
    shape = summary.drop(columns=["mean", "std", "count"]).merge(stats, on=by, how="left")
    shape["count"] = shape["count"].fillna(0).astype(int)
    return shape[summary.columns]


# --------------------------------------------------------------------------- series of cells
# Which cells of a summary (or rows of a curves frame) make one line of a figure or one row of a
# table, and how that series is named. Tables (normbench.report) and figures (normbench.plots)
# share them, so a series has the same label in both.

# Columns summarize() adds; every other column of a summary is a key of the cell.
STAT_COLUMNS = ("metric", "mean", "std", "count", "diverged", "failed", "incomplete")
# Columns of load_curves() that are not keys of a learning curve.
CURVE_VALUE_COLUMNS = (
    "run_dir", "status", "seed", "epoch", "step", "train_loss", "train_error", "test_loss",
    "test_error", "lr", "images_per_second", "epoch_time", "wall_time", "train_mode_test_error",
    "bn_gap",
)


def series_columns(frame: pd.DataFrame, exclude: Sequence[str]) -> list[str]:
    """Return the key columns that tell one line from another: `norm` first, then others."""
    keys = [c for c in frame.columns if c not in exclude]
    return sorted(keys, key=lambda c: (c != "norm", c))


def format_value(value: object) -> str:
    """Return a config value as text: 32.0 (a number pandas made float) reads as 32."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def series_label(key: dict, varying: Sequence[str]) -> str:
    """Return a legend label: the norm, plus `name=value` for other keys that vary."""
    name = str(key.get("norm", "runs"))
    shown = [c for c in varying if c != "norm" and not pd.isna(key[c])]
    if "norm.group_channels" in shown:
        # channels per group replaces the number of groups, which then only holds its default
        shown = [c for c in shown if c != "norm.groups"]
    details = [f"{column.split('.')[-1]}={format_value(key[column])}" for column in shown]
    return f"{name} ({', '.join(details)})" if details else name


def iter_series(frame: pd.DataFrame, keys: Sequence[str]) -> Iterator[tuple[dict, pd.DataFrame]]:
    """Yield (key as {column: value}, rows) per line, in sorted order; missing values kept."""
    if not keys:
        yield {}, frame
        return
    for values, rows in frame.groupby(list(keys), dropna=False, sort=True):
        yield dict(zip(keys, values, strict=True)), rows


def varying_columns(frame: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """Return the keys that take more than one value (a missing value counts as one)."""
    return [c for c in keys if frame[c].nunique(dropna=False) > 1]


def ordered_placements(frame: pd.DataFrame) -> list:
    """Return the placements in the frame, `before` (the usual conv -> norm -> act) first."""
    if "placement" not in frame.columns:
        return [None]
    present = list(frame["placement"].dropna().unique())
    return sorted(present, key=lambda p: (p != "before", p != "after", str(p)))


# --------------------------------------------------------------------------- published numbers

PAPER_SOURCE = "Wu & He, Group Normalization, ECCV 2018 (arXiv:1803.08494): ResNet-50, ImageNet, 8 GPUs"
KERAS_SOURCE = "public Keras reproduction: ResNet-32, CIFAR-10, 100 epochs, mean of 5 seeds"

_PAPER_BATCHES = (32, 16, 8, 4, 2)


def _reference_frame(errors: Mapping[tuple[str, int], float], source: str) -> pd.DataFrame:
    """Return a (norm, batch, error, source) frame from {(norm, batch): error}."""
    rows = [
        {"norm": norm, "batch": batch, "error": error, "source": source}
        for (norm, batch), error in errors.items()
    ]
    return pd.DataFrame(rows)


def _by_batch(norm: str, errors: Iterable[float]) -> dict[tuple[str, int], float]:
    return {(norm, batch): error for batch, error in zip(_PAPER_BATCHES, errors, strict=True)}


# Top-1 val error (%) of the paper, by images per GPU (Figure 1 / Table 2; LN, IN from Table 1;
# Batch Renorm with r_max 1.5, d_max 0.5 at 4 per GPU from section 4.1).
PAPER_RESNET50_IMAGENET = _reference_frame(
    {
        **_by_batch("bn", (23.6, 23.7, 24.8, 27.3, 34.7)),
        **_by_batch("gn", (24.1, 24.2, 24.0, 24.2, 24.1)),
        ("ln", 32): 25.3,
        ("in", 32): 28.4,
        ("brn", 4): 26.3,
    },
    PAPER_SOURCE,
)

# Groups ablation of the paper (Table 3), GN at 32 images per GPU. G=1 is LN, 1 channel per
# group is IN.
PAPER_GN_GROUPS = pd.DataFrame(
    {
        "groups": [64, 32, 16, 8, 4, 2, 1],
        "error": [24.6, 24.1, 24.6, 24.4, 24.6, 24.7, 25.3],
        "source": PAPER_SOURCE,
    }
)
PAPER_GN_GROUP_CHANNELS = pd.DataFrame(
    {
        "group_channels": [64, 32, 16, 8, 4, 2, 1],
        "error": [24.4, 24.5, 24.2, 24.3, 24.8, 25.6, 28.4],
        "source": PAPER_SOURCE,
    }
)

# Mean test error (%) of the public Keras ResNet-32 CIFAR-10 reproduction, by batch.
KERAS_RESNET32_CIFAR10 = _reference_frame(
    {
        **_by_batch("bn", (13.60, 13.60, 13.86, 15.23, 19.70)),
        **_by_batch("gn", (14.05, 14.29, 14.23, 14.03, 14.21)),
    },
    KERAS_SOURCE,
)
