"""Write the report of an experiment: REPORT.md, runs.csv, summary.csv, curves.csv and figures.

The report reads local run folders only (normbench.results) and records how they were made: the
command, the machine and the software versions, so a file under results/ can be traced back.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from normbench import plots, tracking
from normbench.records import (COMMAND_FILE, COMPLETED, DIVERGED, FAILED, INCOMPLETE, STATUSES,
                               last_written, read_launches, read_sweep_commands)
from normbench.results import (
    KERAS_RESNET32_CIFAR10,
    KERAS_SOURCE,
    PAPER_GN_GROUP_CHANNELS,
    PAPER_GN_GROUPS,
    PAPER_RESNET50_IMAGENET,
    PAPER_SOURCE,
    STAT_COLUMNS,
    curves_of,
    extra_factors,
    format_value,
    iter_series,
    load_runs,
    ordered_placements,
    series_columns,
    series_label,
    summarize,
    summarize_shape,
    swept_columns,
    varying_columns,
)

log = logging.getLogger(__name__)

CORE_KEYS = ("norm", "placement", "batch")
# Settings worth stating in the report when every run shares them.
KEY_SETTINGS = (
    "model", "model.stem", "model.width", "dataset", "dataset.image_size", "dataset.brightness",
    "dataset.max_per_class", "dataset.max_test_per_class", "epochs", "workers", "batch",
    "placement", "act",
    "optim.lr_per_256", "optim.warmup_epochs", "optim.milestones", "optim.momentum",
    "optim.nesterov", "optim.weight_decay", "bn_eval",
)
MISSING = "–"
# Diagnostics a report can leave out (write_report(leave_out=...)), e.g. records known to be wrong.
OPTIONAL_METRICS = ("bn_gap", "train_mode_test_error")
# The per-run numbers summarized over seeds, each a table of the report and rows of summary.csv.
SUMMARY_METRICS = ("median5_error", "final_error", "final_train_error", "train_error_fall5")


# --------------------------------------------------------------------------- what the runs are


def experiment_name(runs: pd.DataFrame, experiment_dir: Path) -> str:
    """Return the runs' `experiment` config value, or the folder name when they have none."""
    if "experiment_name" in runs.columns and runs["experiment_name"].notna().any():
        return ", ".join(sorted(str(v) for v in runs["experiment_name"].dropna().unique()))
    return experiment_dir.name


def _single_value(runs: pd.DataFrame, column: str) -> str | None:
    """Return the column's value when all runs share it, else None."""
    if column not in runs.columns or runs[column].nunique(dropna=False) != 1:
        return None
    return str(runs[column].iloc[0])


def compares_with_paper(runs: pd.DataFrame) -> bool:
    """True for the paper's setting: the gn_paper experiment, or ResNet-50 on ImageNet-style data
    (a dataset named imagenet, or an image folder with the imagenet preset)."""
    if _single_value(runs, "experiment_name") == "gn_paper":
        return True
    imagenet = ((_single_value(runs, "dataset") or "").lower().startswith("imagenet")
                or _single_value(runs, "dataset.preset") == "imagenet")
    return imagenet and _single_value(runs, "model") == "resnet50"


def _plain(name: str) -> str:
    """CIFAR-10 -> cifar10: lower case, letters and digits only."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def is_cifar10(runs: pd.DataFrame) -> bool:
    """True when every run trained on CIFAR-10 (the Keras reference is CIFAR-10 only): the
    torchvision data set, or an image folder of CIFAR-10 images at 32x32 (such as the JPEG copy
    `scripts/prepare_data.py` unpacks into a folder named cifar10-jpeg) with all 10 classes."""
    dataset = _single_value(runs, "dataset") or ""
    if dataset != "imagefolder":
        return _plain(dataset) == "cifar10"
    root = _single_value(runs, "dataset.root")
    folder = _plain(Path(root).name) if root is not None else ""
    return (folder.startswith("cifar10") and not folder.startswith("cifar100")
            and _single_value(runs, "dataset.image_size") in (None, "32")
            and _single_value(runs, "dataset.class_list") in (None, "None", "nan"))


def runs_command(experiment_dir: Path, command: str | None) -> str | None:
    """Return the command that produced the runs: the argument, else the folder's command.txt."""
    if command:
        return command
    commands = read_sweep_commands(experiment_dir)
    return "\n".join(commands) if commands else None


# --------------------------------------------------------------------------- tables


def format_cell(cell: pd.Series | None) -> str:
    """Return one table cell: mean ± std (n seeds), and any seeds that did not complete.

    A cell with no completed seed is shown in bold with what happened to its seeds.
    """
    if cell is None:
        return MISSING
    others = [f"{int(cell[s])} {s}" for s in STATUSES[1:] if cell[s] > 0]
    count = int(cell["count"])
    if count == 0:
        return f"**{', '.join(others)}**" if others else MISSING
    value = f"{cell['mean']:.2f}" if count == 1 else f"{cell['mean']:.2f} ± {cell['std']:.2f}"
    return f"{value} ({', '.join([f'n={count}', *others])})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Return a GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _batches_descending(*frames: pd.DataFrame) -> list[int]:
    return sorted({int(b) for frame in frames for b in frame["batch"]}, reverse=True)


def _series(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Return (label, cells) per table row: norm plus any extra factor of the experiment."""
    keys = series_columns(summary, exclude=(*STAT_COLUMNS, "batch", "placement"))
    varying = varying_columns(summary, keys)
    return [(series_label(key, varying), cells)
            for key, cells in iter_series(summary, keys)]


def _cells_by_batch(cells: pd.DataFrame, batches: Sequence[int]) -> list[str]:
    by_batch = {int(row["batch"]): row for _, row in cells.iterrows()}
    return [format_cell(by_batch.get(batch)) for batch in batches]


def results_tables(summary: pd.DataFrame) -> str:
    """Return a norm x batch table per placement of a summarize() frame."""
    batches = _batches_descending(summary)
    header = ["norm", *[f"batch {b}" for b in batches]]
    sections = []
    for placement in ordered_placements(summary):
        cells = summary if placement is None else summary[summary["placement"] == placement]
        rows = [[label, *_cells_by_batch(series, batches)] for label, series in _series(cells)]
        title = plots.PLACEMENT_TITLES.get(placement, f"placement {placement}")
        sections.append((f"**{title}**\n\n" if placement else "") + markdown_table(header, rows))
    return "\n\n".join(sections)


def _ours_by_placement(summary: pd.DataFrame, norm: str, placements: Sequence) -> Iterator:
    """Yield (row label, cells) for each of our series of one norm, placement by placement; the
    label says `ours` and, when placements vary, which one."""
    for placement in placements:
        ours = summary[summary["norm"] == norm]
        if placement is not None:
            ours = ours[ours["placement"] == placement]
        where = "ours" if len(placements) == 1 else f"ours, {placement}"
        for label, series in _series(ours):
            yield f"{label} ({where})", series


def comparison_table(summary: pd.DataFrame, reference: pd.DataFrame, reference_name: str) -> str:
    """Return a table with our row and the reference row of each norm next to each other."""
    batches = _batches_descending(summary, reference)
    placements = ordered_placements(summary)
    rows = []
    for norm in sorted(set(summary["norm"]) | set(reference["norm"])):
        for label, series in _ours_by_placement(summary, norm, placements):
            rows.append([label, *_cells_by_batch(series, batches)])
        theirs = reference[reference["norm"] == norm].set_index("batch")["error"]
        if len(theirs):
            rows.append([f"{norm} ({reference_name})",
                         *[f"{theirs[b]:.2f}" if b in theirs.index else MISSING for b in batches]])
    return markdown_table(["norm", *[f"batch {b}" for b in batches]], rows)


def _signed(value: float) -> str:
    return MISSING if pd.isna(value) else f"{value:+.2f}"


def shape_references(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Return the published (name, frame) pairs whose shape ours is compared with: the paper's
    ResNet-50 ImageNet numbers always, the Keras ResNet-32 ones for CIFAR-10."""
    references = [("paper, ResNet-50 ImageNet", PAPER_RESNET50_IMAGENET)]
    if is_cifar10(runs):
        references.append(("Keras ResNet-32 CIFAR-10", KERAS_RESNET32_CIFAR10))
    return references


def shape_table(shape: pd.DataFrame, references: Sequence[tuple[str, pd.DataFrame]]) -> str | None:
    """Return each norm's error at every batch minus its own error at the largest batch, ours
    (a summarize_shape() frame: mean over seeds, paired by seed) beside the references' (name,
    frame) with the same base batch.

    The paper's claim is a shape (BN degrades as the batch shrinks, GN does not), and the shape
    can be compared across models and data sets whose error levels differ. A cell's seed count
    is shown where it differs from the base cell's. None with one batch.
    """
    batches = _batches_descending(shape)
    if len(batches) < 2:
        return None
    base = batches[0]
    placements = ordered_placements(shape)
    rows = []
    for norm in sorted(set(shape["norm"])):
        for label, series in _ours_by_placement(shape, norm, placements):
            cells = {int(row["batch"]): row for _, row in series.iterrows()}
            base_count = cells[base]["count"] if base in cells else 0
            row = [label]
            for batch in batches:
                cell = cells.get(batch)
                if cell is None or pd.isna(cell["mean"]) or base_count == 0:
                    row.append(MISSING)
                    continue
                paired = f" (n={cell['count']})" if cell["count"] != base_count else ""
                row.append(_signed(cell["mean"]) + paired)
            rows.append(row)
        for reference_name, reference in references:
            theirs = reference[reference["norm"] == norm].set_index("batch")["error"]
            if base in theirs.index and len(theirs) > 1:
                rows.append([f"{norm} ({reference_name})",
                             *[_signed(theirs[b] - theirs[base]) if b in theirs.index else MISSING
                               for b in batches]])
    return markdown_table(["norm", *[f"batch {b}" for b in batches]], rows)


def _gn_range(batches: Sequence[int]):
    def gn_range(bn: pd.Series, gn: pd.Series) -> float:
        errors = gn.reindex(batches)
        return float("nan") if errors.isna().any() else errors.max() - errors.min()
    return gn_range


def paper_claims(batches: Sequence[int]) -> list[tuple[str, object]]:
    """Return the paper's claims as (name, measure) pairs; measure(bn, gn) takes two error
    Series indexed by batch and returns the claim's number (NaN where a batch is missing)."""
    large, small = max(batches), min(batches)
    nan = float("nan")
    return [
        (f"GN − BN at batch {large} (about 0: GN as good as BN)",
         lambda bn, gn: gn.get(large, nan) - bn.get(large, nan)),
        (f"BN − GN at batch {small} (large: BN degrades, GN does not)",
         lambda bn, gn: bn.get(small, nan) - gn.get(small, nan)),
        (f"GN's largest minus smallest error over batches {large} to {small} (about 0: flat)",
         _gn_range(batches)),
    ]


def claims_table(runs: pd.DataFrame, references: Sequence[tuple[str, pd.DataFrame]]) -> str | None:
    """Return the paper's claims (paper_claims) measured on our bn and gn runs with the norm
    before the activation, seed by seed, beside the references' (name, frame) numbers.

    Each seed's number uses that seed's runs alone and the mean is over the seeds that have
    every cell the claim needs: while a grid is partly run, comparing cell means of different
    seed sets would add the seeds' difference to the claim. None without bn and gn at two
    batches, or when a further factor (e.g. GN's groups) splits them.
    """
    done = runs[runs["status"] == COMPLETED]
    if "placement" in done.columns:
        done = done[done["placement"] == "before"]
    ours = {norm: done[done["norm"] == norm] for norm in ("bn", "gn")}
    factors = extra_factors(runs)
    if any(rows.empty or varying_columns(rows, factors) for rows in ours.values()):
        return None
    batches = sorted({int(b) for rows in ours.values() for b in rows["batch"]}, reverse=True)
    if len(batches) < 2:
        return None
    by_seed = {norm: rows.pivot_table(index="batch", columns="seed", values="median5_error",
                                      aggfunc="mean") for norm, rows in ours.items()}
    seeds = sorted(set(by_seed["bn"].columns) | set(by_seed["gn"].columns))

    def column(frame: pd.DataFrame, seed) -> pd.Series:
        return frame[seed].dropna() if seed in frame.columns else pd.Series(dtype=float)

    header = ["claim", "ours: mean over seeds", "ours, per seed",
              *[name for name, _ in references]]
    rows = []
    for claim, measure in paper_claims(batches):
        per_seed = {seed: measure(column(by_seed["bn"], seed), column(by_seed["gn"], seed))
                    for seed in seeds}
        per_seed = {seed: value for seed, value in per_seed.items() if not pd.isna(value)}
        mean = (f"{_signed(sum(per_seed.values()) / len(per_seed))} (n={len(per_seed)})"
                if per_seed else MISSING)
        each = ", ".join(f"seed {format_value(seed)}: {_signed(value)}"
                         for seed, value in per_seed.items()) or MISSING
        theirs = []
        for _, reference in references:
            errors = {norm: reference[reference["norm"] == norm].set_index("batch")["error"]
                      for norm in ("bn", "gn")}
            theirs.append(_signed(measure(errors["bn"], errors["gn"])))
        rows.append([claim, mean, each, *theirs])
    return markdown_table(header, rows)


def groups_comparison_table(summary: pd.DataFrame) -> str | None:
    """Return GN error by groups and by channels per group, ours beside the paper's Table 3."""
    sections = []
    for column, paper, paper_column, name in (
        ("norm.groups", PAPER_GN_GROUPS, "groups", "groups G"),
        ("norm.group_channels", PAPER_GN_GROUP_CHANNELS, "group_channels", "channels per group"),
    ):
        if column not in summary.columns:
            continue
        ours = summary[(summary["norm"] == "gn") & summary[column].notna()]
        if column == "norm.groups" and "norm.group_channels" in summary.columns:
            ours = ours[ours["norm.group_channels"].isna()]  # those runs sweep channels instead
        # One cell per value: the paper's setting, 32 per worker, placement before.
        ours = ours[ours["batch"] == 32]
        if "placement" in ours.columns and ours["placement"].nunique() > 1:
            ours = ours[ours["placement"] == "before"]
        if ours[column].nunique() < 2:
            continue
        values = sorted({int(v) for v in paper[paper_column]} | {int(v) for v in ours[column]},
                        reverse=True)
        by_value = {int(row[column]): row for _, row in ours.iterrows()}
        paper_by_value = paper.set_index(paper_column)["error"]
        rows = [
            ["ours", *[format_cell(by_value.get(v)) for v in values]],
            ["paper", *[f"{paper_by_value[v]:.2f}" if v in paper_by_value.index else MISSING
                        for v in values]],
        ]
        sections.append(markdown_table([name, *[str(v) for v in values]], rows))
    return "\n\n".join(sections) if sections else None


def status_table(runs: pd.DataFrame) -> str:
    counts = runs["status"].value_counts()
    statuses = [*STATUSES, *sorted(set(counts.index) - set(STATUSES))]
    return markdown_table(["status", "runs"], [[s, int(counts.get(s, 0))] for s in statuses])


def _problem_detail(run: pd.Series) -> str:
    if run["status"] == DIVERGED:
        return f"diverged at epoch {run['diverged_epoch']:g}, step {run['diverged_step']:g}"
    if run["status"] == FAILED:
        return str(run["error_message"] or "no error message").splitlines()[0]
    planned = f" of {run['epochs']:g}" if "epochs" in run and pd.notna(run["epochs"]) else ""
    return f"{run['epochs_done']:g}{planned} epochs done"


def problem_runs_table(runs: pd.DataFrame, experiment_dir: Path) -> str | None:
    """Return a table of the runs that did not complete, with why; None when all completed."""
    problems = runs[runs["status"] != COMPLETED]
    if problems.empty:
        return None
    keys = [c for c in (*CORE_KEYS, "seed") if c in runs.columns]
    rows = [
        [Path(run["run_dir"]).relative_to(experiment_dir).as_posix(), run["status"],
         *[run[k] for k in keys], _problem_detail(run)]
        for _, run in problems.iterrows()
    ]
    return markdown_table(["run", "status", *keys, "detail"], rows)


def settings_lines(runs: pd.DataFrame) -> list[str]:
    """Return markdown bullets: what was swept (with its values) and the key fixed settings."""
    lines = []
    for column in swept_columns(runs):
        values = sorted({format_value(v) for v in runs[column].dropna()}, key=_natural)
        lines.append(f"- swept `{column}`: {', '.join(values)}")
    for column in KEY_SETTINGS:
        value = _single_value(runs, column)
        if value is not None:
            lines.append(f"- `{column}` = {value}")
    return lines


def _natural(text: str) -> tuple:
    """Sort key putting numbers in numeric order before words."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def format_duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{seconds / 60:.1f} min"


def launch_span(run_dirs: Sequence[str]) -> tuple[float, float] | None:
    """Return (first launch start, last record written) in seconds since the epoch over the run
    folders, from launches.jsonl and the mtimes of metrics.jsonl and summary.json; None when the
    folders hold no launch record."""
    starts, ends = [], []
    for run_dir in map(Path, run_dirs):
        # a line cut short by a kill is skipped: the others still say when it ran
        starts += [float(launch["started"]) for launch in read_launches(run_dir)]
        end = last_written(run_dir)
        if end is not None:
            ends.append(end)
    if not starts or not ends:
        return None
    return min(starts), max(ends)


def cost_lines(runs: pd.DataFrame) -> list[str]:
    """Return markdown bullets with what the runs cost: summed and per-run training wall time,
    the median training throughput, and the span from the first launch to the last record."""
    if "wall_time" not in runs.columns or runs["wall_time"].dropna().empty:
        return []
    wall = runs["wall_time"].dropna().astype(float)
    lines = [f"- training wall time (epochs and evaluation, per run's own clock): "
             f"{format_duration(wall.sum())} summed over {len(wall)} runs, median "
             f"{format_duration(wall.median())} per run"]
    if "images_per_second" in runs.columns and runs["images_per_second"].notna().any():
        lines.append(f"- median training throughput: "
                     f"{runs['images_per_second'].dropna().median():.0f} images/s per run")
    span = launch_span(runs["run_dir"]) if "run_dir" in runs.columns else None
    if span is not None:
        start, end = span
        stamp = "%Y-%m-%d %H:%M UTC"
        lines.append(f"- from the first launch to the last record: {format_duration(end - start)} "
                     f"({datetime.fromtimestamp(start, timezone.utc):{stamp}} to "
                     f"{datetime.fromtimestamp(end, timezone.utc):{stamp}}; runs in parallel "
                     f"overlap, relaunches add their gaps)")
    return lines


# --------------------------------------------------------------------------- environment


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def gpu_names() -> str:
    try:
        import torch
    except ImportError:
        return "unknown (torch not installed)"
    if not torch.cuda.is_available():
        return "none (torch.cuda not available)"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return ", ".join(names)


def git_commit(repo: Path | None = None) -> str:
    """Return normbench's git commit, with `-dirty` when tracked files outside `results/` have
    changes. `results/` is left out because it holds data, not code: a report regenerated
    beside edited notes, or before its own files are committed, was still made by the
    committed code."""
    repo = repo or Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--",
                    ":(top)", ":(top,exclude)results")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout or no commit yet)"
    return commit + ("-dirty" if dirty else "")


def trained_on(runs: pd.DataFrame) -> str:
    """Return where the runs trained, as their summaries say, with run counts, e.g.
    `cpu, bf16, AMD EPYC (2 runs); cuda (12 runs)` (each entry is itself comma-separated)."""
    counts = runs["trained_on"].fillna("not recorded").value_counts()
    return "; ".join(f"{device} ({count} run{'s' if count > 1 else ''})"
                     for device, count in counts.items())


def environment_info() -> dict[str, str]:
    """Return the hardware and software this report was generated with."""
    return {
        "CPU": cpu_model(),
        "CPU cores": str(os.cpu_count()),
        "GPU": gpu_names(),
        "OS": platform.platform(),
        "python": platform.python_version(),
        **{package: _version(package) for package in ("torch", "torchvision", "pandas", "matplotlib")},
        "normbench commit": git_commit(),
    }


# --------------------------------------------------------------------------- figures


def make_figures(runs: pd.DataFrame, summary: pd.DataFrame, by: Sequence[str],
                 curves: pd.DataFrame | None = None) -> dict[str, Figure]:
    """Return every figure that applies to these runs, by file stem (`curves`: their
    curves_of() frame, when the caller has it already)."""
    figures: dict[str, Figure | None] = {}
    if summary["batch"].nunique() > 1:
        reference, reference_label = None, "reference"
        if compares_with_paper(runs):
            reference, reference_label = PAPER_RESNET50_IMAGENET, "paper"
        elif is_cifar10(runs):
            reference, reference_label = KERAS_RESNET32_CIFAR10, "Keras ResNet-32"
        figures["error_vs_batch"] = plots.error_vs_batch(summary, runs=runs, reference=reference,
                                                         reference_label=reference_label)
        figures["shape_vs_batch"] = plots.shape_vs_batch(summarize_shape(runs, by=by),
                                                         shape_references(runs))
    curves = curves_of(runs) if curves is None else curves
    if not curves.empty:
        for batch in sorted({int(summary["batch"].max()), int(summary["batch"].min())}, reverse=True):
            figures[f"training_curves_batch{batch}"] = plots.training_curves(curves, batch=batch)
    # A groups sweep is always a reproduction of the paper's Table 3, so its numbers are drawn too.
    figures["groups_ablation"] = plots.groups_ablation(summary, reference=True)
    if "bn_gap" in runs.columns:
        figures["bn_gap_vs_batch"] = plots.bn_gap_vs_batch(summarize(runs, metric="bn_gap", by=by),
                                                           runs=runs)
    return {name: figure for name, figure in figures.items() if figure is not None}


def save_figures(figures: dict[str, Figure], figure_dir: Path) -> dict[str, Path]:
    """Save each figure as PNG and SVG; return the PNG paths. Closes the figures."""
    figure_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    # A fixed salt and no date keep the SVGs identical across regenerations (clean git diffs).
    with plt.rc_context({"svg.hashsalt": "normbench"}):
        for name, figure in figures.items():
            paths[name] = figure_dir / f"{name}.png"
            figure.savefig(paths[name], dpi=150)
            figure.savefig(figure_dir / f"{name}.svg", metadata={"Date": None})
            plt.close(figure)
    return paths


FIGURE_CAPTIONS = {
    "error_vs_batch": "Error against batch per worker (as the paper's Figure 1). x marks a cell "
                      "where seeds diverged.",
    "shape_vs_batch": "Each norm's error minus its own error at the largest batch, ours (solid, "
                      "paired by seed) "
                      "beside the published numbers (dashed): the shape the paper claims.",
    "groups_ablation": "GN error against number of groups and channels per group (as the paper's "
                       "Table 3).",
    "bn_gap_vs_batch": "Test error with batch statistics minus test error with running statistics.",
}


def _caption(name: str) -> str:
    if name.startswith("training_curves_batch"):
        batch = name.removeprefix("training_curves_batch")
        return f"Train and test error per epoch at batch {batch} (as the paper's Figure 4)."
    return FIGURE_CAPTIONS.get(name, name)


# --------------------------------------------------------------------------- the report


def render_report(
    name: str,
    runs: pd.DataFrame,
    summaries: dict[str, pd.DataFrame],
    figure_paths: dict[str, Path],
    out_dir: Path,
    experiment_dir: Path,
    command: str | None,
    environment: dict[str, str],
    notes: str | None = None,
    left_out: Sequence[str] = (),
    report_options: Sequence[str] = (),
) -> str:
    """Return REPORT.md as a string; `notes` (markdown) becomes its Discussion section;
    `report_options` are the options of scripts/report.py that regenerate it beyond --out."""
    median5, final = summaries["median5_error"], summaries["final_error"]
    parts = [f"# {name}", ""]
    parts += [f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from "
              f"`{experiment_dir.as_posix()}` ({len(runs)} runs).", ""]
    parts += ["## How the runs were made", ""]
    if command:
        parts += ["```bash", command, "```"]
    else:
        parts += [f"Command unknown: no `{COMMAND_FILE}` in the experiment folder."]
    regenerate = f"normbench report {experiment_dir.as_posix()} --out {out_dir.as_posix()}"
    regenerate += "".join(f" {option}" for option in report_options)
    parts += ["", f"Regenerate this report: `{regenerate}`", ""]
    parts += settings_lines(runs) + [""]
    if left_out:
        parts += [f"Left out of this report: {', '.join(f'`{m}`' for m in left_out)}, recorded by "
                  "the runs but not shown here" + (" (see the Discussion)." if notes else "."), ""]

    parts += ["## Results", "",
              "Top-1 test error (%), median of the last 5 epochs (the paper's metric): mean ± std "
              "over completed seeds (sample std), n = completed seeds. Seeds that diverged, failed "
              "or have not finished are counted beside the numbers and left out of them.", ""]
    parts += [results_tables(median5), ""]
    parts += ["Last epoch's test error (%):", "", results_tables(final), ""]
    parts += ["## Convergence", "",
              "Whether the protocol trained long enough: the last epoch's training error (%, on the "
              "augmented training images in train mode, as the epoch went) and how many points it "
              "fell over the last 5 epochs (about 0: the run had stopped learning; a step-starved "
              "run ends with a high training error that is still falling).", "",
              results_tables(summaries["final_train_error"]), "",
              "Fall of the training error over the last 5 epochs (points):", "",
              results_tables(summaries["train_error_fall5"]), ""]

    if compares_with_paper(runs):
        parts += ["## Ours beside the paper", "", f"Paper: {PAPER_SOURCE}; top-1 val error (%).",
                  "", comparison_table(median5, PAPER_RESNET50_IMAGENET, "paper"), ""]
    groups = groups_comparison_table(median5)
    if groups:
        parts += ["## GN groups ablation beside the paper", "",
                  f"Paper: {PAPER_SOURCE}, Table 3, 32 images per GPU; top-1 val error (%). "
                  "G=1 is LN, 1 channel per group is IN.", "", groups, ""]
    if is_cifar10(runs):
        parts += ["## Reference: Keras ResNet-32 on CIFAR-10", "",
                  f"Reference: {KERAS_SOURCE}; mean test error (%). Its model and schedule differ "
                  "from ours: compare the shape across batches, not the level.", "",
                  comparison_table(median5, KERAS_RESNET32_CIFAR10, "Keras ResNet-32"), ""]

    by = [column for column in median5.columns if column not in STAT_COLUMNS]
    shape = shape_table(summarize_shape(runs, by=by), shape_references(runs))
    if shape:
        base = _batches_descending(median5)[0]
        parts += [f"## Shape: error relative to batch {base}", "",
                  f"Each row is a norm's error at each batch minus its own error at batch {base} "
                  "(median of the last 5 epochs; the published rows likewise). Ours are paired by "
                  f"seed: the mean over the seeds that completed both the cell and batch {base}, "
                  "their number shown where it is fewer than batch "
                  f"{base}'s, so a seed still missing from a cell does not move it. The paper's "
                  "claim is this shape, which can be compared where error levels differ: BN's "
                  "error grows as the batch shrinks, GN's stays flat. Read each difference "
                  "against the seeds' std in the tables above.", "", shape, ""]

    claims = claims_table(runs, shape_references(runs))
    if claims:
        parts += ["## The paper's claims, seed by seed", "",
                  "The paper's two claims as numbers, for bn and gn with the norm before the "
                  "activation (median of the last 5 epochs, points). Each seed's number comes "
                  "from that seed's runs alone; the mean is over the seeds that completed every "
                  "cell the claim needs, so a seed still running elsewhere in the grid does not "
                  "move it.", "", claims, ""]

    if notes:
        parts += ["## Discussion", "", notes.strip(), ""]

    if figure_paths:
        parts += ["## Figures", ""]
        for figure_name, png in figure_paths.items():
            relative = png.relative_to(out_dir).as_posix()
            parts += [f"![{figure_name}]({relative})", "",
                      f"{_caption(figure_name)} ([SVG]({relative.removesuffix('.png')}.svg))", ""]

    parts += ["## Runs", "", status_table(runs), ""]
    problems = problem_runs_table(runs, experiment_dir)
    if problems:
        parts += ["Runs that did not complete:", "", problems, ""]
    parts += cost_lines(runs) + [""]
    parts += ["Per-run numbers: [runs.csv](runs.csv); per-cell statistics: [summary.csv](summary.csv); "
              "every epoch of every run: [curves.csv](curves.csv).", ""]

    parts += ["## Environment", "", f"Runs trained on: {trained_on(runs)}.", "",
              "Machine and software that generated this report (where each run trained, from "
              "its own record, is the line above):", ""]
    parts += [markdown_table(["item", "value"], [[key, value] for key, value in environment.items()]), ""]
    return "\n".join(parts)


def wandb_destination(runs: pd.DataFrame) -> dict[str, str | None]:
    """Return the W&B project, entity and group the runs were logged to (their configs'
    ``wandb.*``), where the report's own run goes too, so it sits beside them."""
    destination: dict[str, str | None] = {}
    for key in ("project", "entity", "group"):
        column = f"wandb.{key}"
        values = sorted({str(v) for v in runs[column].dropna()}) if column in runs.columns else []
        if len(values) > 1:
            raise ValueError(f"the runs were logged to several W&B {key}s ({', '.join(values)}; "
                             f"config key {column}): report them one {key} at a time")
        destination[key] = values[0] if values else None
    if destination["project"] is None:
        raise ValueError("the runs' configs record no wandb.project, so the report has no W&B "
                         "project to log to")
    return destination


def error_vs_batch_table(summaries: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Return one row per cell for W&B to chart: `line` (the series' legend label, with the
    placement when several), its keys (norm, placement, batch, ...), `median5_error` (mean over
    completed seeds) and its `median5_error_std`, `final_error`, `seeds` (completed) and the
    seeds that diverged, failed or are incomplete."""
    median5, final = summaries["median5_error"], summaries["final_error"]
    keys = series_columns(median5, exclude=(*STAT_COLUMNS, "batch", "placement"))
    cell_keys = [c for c in median5.columns if c not in STAT_COLUMNS]
    # summarize() orders cells by their keys: both summaries hold the same cells in one order.
    if not median5[cell_keys].equals(final[cell_keys]):
        raise ValueError("the median5_error and final_error summaries hold different cells")
    varying = varying_columns(median5, keys)
    several_placements = len(ordered_placements(median5)) > 1
    lines = []
    for _, cell in median5.iterrows():
        label = series_label({key: cell[key] for key in keys}, varying)
        lines.append(f"{label}, {cell['placement']}" if several_placements else label)
    table = median5[cell_keys].copy()
    table.insert(0, "line", lines)
    table["median5_error"] = median5["mean"]
    table["median5_error_std"] = median5["std"]
    table["final_error"] = final["mean"].to_numpy()
    table["seeds"] = median5["count"]
    for status in (DIVERGED, FAILED, INCOMPLETE):
        table[status] = median5[status]
    return table


def log_report_to_wandb(name: str, runs: pd.DataFrame, out_dir: Path,
                        figure_paths: dict[str, Path], summaries: dict[str, pd.DataFrame]) -> str:
    """Log the figures, the error-vs-batch table (with a W&B line chart of it) and the whole
    summary as one W&B run of job_type `report`, in the runs' project and group; return the
    W&B mode used (WANDB_MODE, offline by default). The run's files go to out_dir/wandb."""
    mode = os.environ.get("WANDB_MODE", "offline")
    tracking.log_report(
        {**wandb_destination(runs), "mode": mode}, out_dir, name=f"report-{name}",
        config={"experiment": name, "runs": len(runs)}, figures=figure_paths,
        tables={"error_vs_batch": error_vs_batch_table(summaries),
                "summary": pd.concat(summaries.values(), ignore_index=True)},
        line_charts=[("error_vs_batch_chart", "error_vs_batch", "batch", "median5_error", "line")])
    return mode


def write_report(
    experiment_dir: str | Path,
    out_dir: str | Path,
    *,
    command: str | None = None,
    notes: str | Path | None = None,
    leave_out: Sequence[str] = (),
    log_to_wandb: bool = False,
) -> Path:
    """Write REPORT.md, runs.csv, summary.csv, curves.csv and figures/ for an experiment; return
    REPORT.md.

    command: the command that produced the runs; by default the experiment folder's command.txt.
    notes: a markdown file written by the experimenter (what the numbers mean), included as the
        report's Discussion section, so regenerating the report keeps it.
    leave_out: metrics of OPTIONAL_METRICS to leave out of the tables, CSVs and figures (the
        report says so), e.g. where the records of a diagnostic are known to be wrong.
    log_to_wandb: also log figures and tables to one W&B run (files in out_dir/wandb), in the
        runs' W&B project and group.
    """
    experiment_dir, out_dir = Path(experiment_dir), Path(out_dir)
    unknown = [m for m in leave_out if m not in OPTIONAL_METRICS]
    if unknown:
        raise ValueError(f"cannot leave out {', '.join(map(repr, unknown))}: the metrics a report "
                         f"can leave out are {', '.join(OPTIONAL_METRICS)}")
    notes_text = None
    if notes is not None:
        if not Path(notes).is_file():
            raise FileNotFoundError(f"notes file {str(notes)!r} does not exist")
        notes_text = Path(notes).read_text()  # read first: out_dir may be where it lives
    log.info("loading runs from %s", experiment_dir)
    runs = load_runs(experiment_dir).drop(columns=list(leave_out), errors="ignore")
    name = experiment_name(runs, experiment_dir)
    core = [c for c in CORE_KEYS if c in runs.columns]
    by = [*core, *extra_factors(runs, core)]
    summaries = {metric: summarize(runs, metric=metric, by=by)
                 for metric in SUMMARY_METRICS}
    log.info("%d runs, summarized by %s", len(runs), ", ".join(by))

    out_dir.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out_dir / "runs.csv", index=False)
    summary = pd.concat(summaries.values(), ignore_index=True)
    summary.to_csv(out_dir / "summary.csv", index=False)
    # Every epoch of every run: the records behind the tables, so the committed numbers can be
    # re-derived and re-plotted without the run folders.
    curves = curves_of(runs).drop(columns=list(leave_out), errors="ignore")
    curves.to_csv(out_dir / "curves.csv", index=False)
    figure_paths = save_figures(make_figures(runs, summaries["median5_error"], by, curves),
                                out_dir / "figures")
    for path in figure_paths.values():
        log.info("wrote %s (and .svg)", path)

    report_path = out_dir / "REPORT.md"
    report_path.write_text(render_report(
        name, runs, summaries, figure_paths, out_dir, experiment_dir,
        runs_command(experiment_dir, command), environment_info(), notes_text, list(leave_out),
        [*([f"--notes {Path(notes).as_posix()}"] if notes is not None else []),
         *[f"--leave-out {metric}" for metric in leave_out]],
    ))
    log.info("wrote %s", report_path)
    if log_to_wandb:
        mode = log_report_to_wandb(name, runs, out_dir, figure_paths, summaries)
        log.info("logged figures and tables to W&B (mode %s)", mode)
    return report_path
