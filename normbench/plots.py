"""Matplotlib figures of an experiment, in the style of the Group Normalization paper.

Every function takes frames from normbench.results and returns a Figure (or None when the data
has nothing for that figure); saving is the caller's business (normbench.report).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training machines and CI; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import matplotlib.transforms as mtransforms  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# The grouping helpers live in normbench.results (tables use them too); plots only draw. They
# stay importable from here for older callers.
from normbench.records import COMPLETED  # noqa: E402
from normbench.results import (  # noqa: E402
    CURVE_VALUE_COLUMNS,
    PAPER_GN_GROUP_CHANNELS,
    PAPER_GN_GROUPS,
    STAT_COLUMNS,
    format_value,  # noqa: F401  (re-exported)
    iter_series,
    ordered_placements,
    series_columns,
    series_label,
    varying_columns,
)

# Fixed colours so a norm looks the same in every figure and every report.
NORM_COLORS = {
    "bn": "tab:blue", "gn": "tab:orange", "ln": "tab:green", "in": "tab:red", "brn": "tab:purple",
    "syncbn": "tab:brown", "frn": "tab:pink", "evonorm_s0": "tab:olive", "evonorm_b0": "tab:cyan",
    "none": "tab:gray",
}
METRIC_LABELS = {
    "median5_error": "test error, median of last 5 epochs (%)",
    "final_error": "test error, last epoch (%)",
    "best_error": "best test error (%)",
    "bn_gap": "train-mode minus eval-mode test error (points)",
}
PLACEMENT_TITLES = {
    "before": "placement before: conv → norm → act",
    "after": "placement after: conv → act → norm",
}
DIVERGED_MARKER = {"marker": "x", "markersize": 9, "markeredgewidth": 2, "linestyle": "none"}


# --------------------------------------------------------------------------- helpers


def norm_color(norm: object, index: int = 0) -> str:
    """Return the colour of a norm; unknown norms take a colour from the cycle."""
    return NORM_COLORS.get(str(norm), f"C{index % 10}")


LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v")


def line_style(key: dict, style_keys: Sequence[tuple]) -> dict:
    """Return linestyle and marker for a line: colour tells the norm, style tells the rest."""
    # Compared as strings: a missing value (NaN) never equals itself.
    rest = tuple(str(v) for k, v in key.items() if k != "norm")
    index = style_keys.index(rest) if rest in style_keys else 0
    return {"linestyle": LINESTYLES[index % len(LINESTYLES)],
            "marker": MARKERS[index % len(MARKERS)]}


def style_keys_of(frame: pd.DataFrame, keys: Sequence[str]) -> list[tuple]:
    """Return the distinct values of the non-norm keys, in a stable order, for line_style."""
    rest = [k for k in keys if k != "norm"]
    if not rest:
        return [()]
    values = frame[rest].drop_duplicates().sort_values(rest)
    return [tuple(str(v) for v in row) for row in values.itertuples(index=False)]


def set_batch_axis(ax: Axes, batches: Sequence[float]) -> None:
    """Log2 x axis with one tick per batch, largest batch on the left (the paper's Figure 1)."""
    batches = sorted({float(b) for b in batches})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_locator(mticker.NullLocator())
    ax.set_xlim(max(batches) * 1.4, min(batches) / 1.4)
    ax.set_xlabel("batch per worker (images)")


def _panels(n: int, width: float = 5.5, height: float = 4.2,
            sharey: bool = True) -> tuple[Figure, list[Axes]]:
    """Return a figure with n panels side by side."""
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), sharey=sharey, squeeze=False,
                             layout="constrained")
    return fig, list(axes[0])


def _suptitle(fig: Figure, text: str) -> None:
    """Set the figure's title, wrapped to the figure's width (about 10 characters per inch)."""
    width = max(40, int(fig.get_figwidth() * 10))
    fig.suptitle(textwrap.fill(text, width=width))


def _metric_of(summary_df: pd.DataFrame, default: str = "median5_error") -> str:
    if "metric" in summary_df.columns and summary_df["metric"].notna().any():
        return str(summary_df["metric"].dropna().iloc[0])
    return default


def _mark_diverged(ax: Axes, batch: float, row_index: int, color: str, diverged: int,
                   finished: int) -> None:
    """Draw an x at the top of the panel above `batch`, with how many seeds diverged.

    The y position is in axes coordinates so the marker stays visible whatever the data range;
    each line gets its own row so markers of several norms do not cover each other.
    """
    y = 0.95 - 0.08 * row_index
    to_axes = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    ax.plot([batch], [y], color=color, transform=to_axes, clip_on=False, gid="diverged",
            **DIVERGED_MARKER)
    text = "diverged" if diverged == finished else f"{diverged}/{finished} diverged"
    ax.annotate(text, (batch, y), xycoords=to_axes, xytext=(0, -12), textcoords="offset points",
                ha="center", color=color, fontsize=8)


def _leave_room_at_top(ax: Axes, rows_needed: int) -> None:
    """Raise the y limit so the data stays below the diverged markers."""
    if rows_needed == 0:
        return
    low, high = ax.get_ylim()
    free_fraction = min(0.1 + 0.08 * rows_needed, 0.6)
    ax.set_ylim(low, low + (high - low) / (1.0 - free_fraction))


def seeds_phrase(cells: pd.DataFrame, spread: str = "mean ± std") -> str:
    """Return what each point of a summary's cells is, honestly: `one seed per cell`, `mean ±
    std over 3 seeds`, or `mean ± std over 1 to 3 seeds per cell` (completed seeds only)."""
    counts = cells.loc[cells["count"] > 0, "count"].astype(int)
    if counts.empty:
        return "no completed seeds"
    low, high = int(counts.min()), int(counts.max())
    if high == 1:
        return "one seed per cell"
    if low == high:
        return f"{spread} over {high} seeds"
    return f"{spread} over {low} to {high} seeds per cell"


def _rows_of(frame: pd.DataFrame, key: dict) -> pd.DataFrame:
    """Return the rows of frame whose columns hold key's values (a missing value matches a
    missing value: norm.groups of a bn run)."""
    mask = pd.Series(True, index=frame.index)
    for column, value in key.items():
        mask &= frame[column].isna() if pd.isna(value) else frame[column] == value
    return frame[mask]


def _on_grid(rows: pd.DataFrame, column: str, grid: Sequence[float]) -> pd.DataFrame:
    """Return rows re-indexed on every value of grid (largest first), NaN where the series has
    no completed seed: matplotlib breaks a line at NaN, so no line joins values not run."""
    done = rows[rows["count"] > 0].set_index(column)[["mean", "std"]]
    done.index = done.index.astype(float)
    return done.reindex(sorted({float(v) for v in grid}, reverse=True))


# Single seeds are drawn a little to the side of their mean (a factor on the log2 batch axis),
# so that the mean's marker and error bar do not hide them.
SEED_OFFSET = 2 ** 0.12


def _plot_seeds(ax: Axes, seeds: pd.DataFrame, x: str, y: str, color: str, marker: str) -> None:
    """Draw each completed seed's value as a small hollow point beside its mean, so n and the
    spread can be seen."""
    if len(seeds):
        ax.plot(seeds[x] * SEED_OFFSET, seeds[y], linestyle="none", marker=marker, markersize=4,
                markerfacecolor="none", alpha=0.7, color=color, gid="seeds", label="_seeds")


def _plot_cells_vs_batch(ax: Axes, cells: pd.DataFrame, keys: Sequence[str],
                         varying: Sequence[str], mark_diverged: bool,
                         runs: pd.DataFrame | None = None,
                         batches: Sequence[float] | None = None) -> int:
    """Draw mean +- std per line against batch, broken at every batch of `batches` (default:
    the cells') where the line has no completed seed, and each seed of `runs` (completed runs
    with the summary's metric) as a point; return how many lines got diverged markers."""
    marked_rows = 0
    styles = style_keys_of(cells, keys)
    metric = _metric_of(cells)
    for index, (key, rows) in enumerate(iter_series(cells, keys)):
        color = norm_color(key.get("norm"), index)
        label = series_label(key, varying)
        style = line_style(key, styles)
        line = _on_grid(rows, "batch", cells["batch"] if batches is None else batches)
        if line["mean"].notna().any():
            ax.errorbar(line.index, line["mean"], yerr=line["std"].fillna(0.0), color=color,
                        capsize=3, label=label, **style)
        if runs is not None:
            _plot_seeds(ax, _rows_of(runs, key), "batch", metric, color, style["marker"])
        diverged_rows = rows[rows["diverged"] > 0] if mark_diverged else rows.iloc[:0]
        for _, cell in diverged_rows.iterrows():
            _mark_diverged(ax, cell["batch"], marked_rows, color, int(cell["diverged"]),
                           int(cell["diverged"] + cell["count"]))
        if len(diverged_rows):
            if line["mean"].isna().all():  # a line that only diverged still needs a legend entry
                ax.plot([], [], color=color, marker="x", linestyle="none", label=label)
            marked_rows += 1
    return marked_rows


def _completed(runs: pd.DataFrame | None, metric: str) -> pd.DataFrame | None:
    """Return the completed runs that recorded metric (the seeds behind a summary's means)."""
    if runs is None or metric not in runs.columns:
        return None
    return runs[(runs["status"] == COMPLETED) & runs[metric].notna()]


def _plot_reference(ax: Axes, reference: pd.DataFrame, norms: set, label: str) -> None:
    """Draw published numbers (norm, batch, error) as thin dashed lines for the norms we ran."""
    for index, (norm, rows) in enumerate(reference.groupby("norm", sort=True)):
        if norm not in norms:
            continue
        rows = rows.sort_values("batch", ascending=False)
        ax.plot(rows["batch"], rows["error"], color=norm_color(norm, index), linestyle="--",
                linewidth=1, marker=".", label=f"{norm} ({label})", gid="reference")


# --------------------------------------------------------------------------- figures


def error_vs_batch(
    summary_df: pd.DataFrame,
    *,
    runs: pd.DataFrame | None = None,
    title: str | None = None,
    reference: pd.DataFrame | None = None,
    reference_label: str = "reference",
) -> Figure:
    """Error against batch per worker, a line per norm, a panel per placement (paper Figure 1).

    summary_df: summarize() output with at least `norm`, `batch` and the stat columns. The x axis
    is log2 from the largest batch on the left to the smallest on the right; points are the mean
    over completed seeds with std error bars, and a line is broken at a batch where it has no
    completed seed. Cells where seeds diverged get an x at the top of the panel.
    runs: the load_runs() frame the summary came from: each completed seed is drawn as a dot.
    reference: optional (norm, batch, error) frame, e.g. results.PAPER_RESNET50_IMAGENET, drawn
    dashed for the norms present in summary_df, in a panel of its own on the right: published
    errors can be far from ours (another model, data set, schedule), and on a shared y axis they
    would squash our lines.
    """
    keys = series_columns(summary_df, exclude=(*STAT_COLUMNS, "batch", "placement"))
    varying = varying_columns(summary_df, keys)
    placements = ordered_placements(summary_df)
    if reference is not None:
        reference = reference[reference["norm"].isin(summary_df["norm"])]
    with_reference = reference is not None and not reference.empty
    fig, axes = _panels(len(placements) + with_reference, sharey=False)
    ours = axes[:len(placements)]
    for ax in ours[1:]:
        ax.sharey(ours[0])
    seeds = _completed(runs, _metric_of(summary_df))
    most_marked = 0
    for ax, placement in zip(ours, placements, strict=True):
        cells, panel_seeds = summary_df, seeds
        if placement is not None:
            cells = summary_df[summary_df["placement"] == placement]
            if seeds is not None:
                panel_seeds = seeds[seeds["placement"] == placement]
        marked = _plot_cells_vs_batch(ax, cells, keys, varying, mark_diverged=True,
                                      runs=panel_seeds, batches=summary_df["batch"])
        set_batch_axis(ax, list(summary_df["batch"].unique()))
        ax.set_title(PLACEMENT_TITLES.get(placement, f"placement {placement}") if placement else "")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        most_marked = max(most_marked, marked)
    # Our panels share y, so the room for diverged markers is made once, for the fullest panel.
    _leave_room_at_top(ours[0], most_marked)
    ours[0].set_ylabel(METRIC_LABELS.get(_metric_of(summary_df), "error (%)"))
    if with_reference:
        ax = axes[-1]
        _plot_reference(ax, reference, set(summary_df["norm"]), reference_label)
        set_batch_axis(ax, list(reference["batch"].unique()))
        ax.set_title(f"published: {reference_label} (own y axis)")
        ax.set_ylabel("error (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    shown = seeds_phrase(summary_df) + ("; dots: single seeds" if seeds is not None else "")
    _suptitle(fig, title or f"Error vs batch per worker ({shown})")
    return fig


def shape_vs_batch(
    summary_df: pd.DataFrame,
    references: Sequence[tuple[str, pd.DataFrame]] = (),
    *,
    title: str | None = None,
) -> Figure | None:
    """Each norm's error minus its own error at the largest batch we ran, against batch, a panel
    per placement, with published (norm, batch, error) frames drawn the same way, dashed.

    summary_df: a results.summarize_shape() frame (differences paired by seed). The paper's
    claim is this shape (BN's error grows as the batch shrinks, GN's stays flat), and
    differences can share an axis with published ones whose error level is elsewhere.
    references: (label, frame) pairs; a reference norm is drawn when we ran that norm and the
    reference has our base batch. Returns None with fewer than two batches.
    """
    batches = sorted({float(b) for b in summary_df["batch"]}, reverse=True)
    if len(batches) < 2:
        return None
    base = batches[0]
    keys = series_columns(summary_df, exclude=(*STAT_COLUMNS, "batch", "placement"))
    varying = varying_columns(summary_df, keys)
    placements = ordered_placements(summary_df)
    fig, axes = _panels(len(placements))
    for ax, placement in zip(axes, placements, strict=True):
        cells = summary_df
        if placement is not None:
            cells = summary_df[summary_df["placement"] == placement]
        styles = style_keys_of(cells, keys)
        for index, (key, rows) in enumerate(iter_series(cells, keys)):
            line = _on_grid(rows, "batch", batches)["mean"]
            if pd.isna(line.loc[base]):  # nothing to be relative to
                continue
            ax.plot(line.index, line, color=norm_color(key.get("norm"), index),
                    label=series_label(key, varying), **line_style(key, styles))
        for reference_index, (label, reference) in enumerate(references):
            for index, (norm, rows) in enumerate(reference.groupby("norm", sort=True)):
                errors = rows.set_index(rows["batch"].astype(float))["error"]
                errors = errors.sort_index(ascending=False)
                if norm not in set(cells["norm"]) or base not in errors.index or len(errors) < 2:
                    continue
                ax.plot(errors.index, errors - errors.loc[base], color=norm_color(norm, index),
                        linestyle=LINESTYLES[1 + reference_index % 3], linewidth=1, marker=".",
                        label=f"{norm} ({label})", gid="reference")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(PLACEMENT_TITLES.get(placement, f"placement {placement}") if placement else "")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes:
        # Ticks where we ran: published batches we did not run are drawn without a tick, and
        # our lines only join batches we ran.
        set_batch_axis(ax, batches)
    metric = METRIC_LABELS.get(_metric_of(summary_df), "error (%)").replace(" (%)", "")
    axes[0].set_ylabel(f"{metric}\nminus its value at batch {base:g} (points)")
    _suptitle(fig, title or f"Shape: error relative to batch {base:g} "
                          f"(ours: {seeds_phrase(summary_df, 'mean')}, paired by seed; "
                          "dashed: published)")
    return fig


def training_curves(
    curves_df: pd.DataFrame,
    *,
    batch: int | None = None,
    statuses: Sequence[str] = (COMPLETED,),
    title: str | None = None,
) -> Figure | None:
    """Train and test error against epoch, a line per norm at one batch (paper Figure 4).

    batch defaults to the largest batch in the data; seeds are averaged per epoch and counted in
    the legend (`bn, n=2`), and with several seeds each one is drawn as a thin faint line too.
    Only runs whose status is in `statuses` are drawn (by default completed runs: a diverged run
    would stretch the axis). Returns None when nothing is left.
    """
    curves = curves_df[curves_df["status"].isin(statuses)]
    if curves.empty:
        return None
    batch = int(curves["batch"].max()) if batch is None else batch
    curves = curves[curves["batch"] == batch]
    if curves.empty:
        return None
    keys = series_columns(curves, exclude=(*CURVE_VALUE_COLUMNS, "batch"))
    keys = [c for c in keys if c == "norm" or curves[c].nunique(dropna=False) > 1]
    styles = style_keys_of(curves, keys)
    fig, axes = _panels(2, sharey=False)
    seed_counts = set()
    for ax, metric, name in zip(axes, ("train_error", "test_error"), ("train error", "test error"),
                                strict=True):
        for index, (key, rows) in enumerate(iter_series(curves, keys)):
            mean = rows.groupby("epoch")[metric].mean()
            seeds = rows["run_dir"].nunique()
            seed_counts.add(seeds)
            color = norm_color(key.get("norm"), index)
            linestyle = line_style(key, styles)["linestyle"]
            ax.plot(mean.index, mean.values, color=color, linestyle=linestyle,
                    label=f"{series_label(key, keys)}, n={seeds}")
            if seeds > 1:
                for _, seed in rows.groupby("run_dir", sort=True):
                    ax.plot(seed["epoch"], seed[metric], color=color, linestyle=linestyle,
                            linewidth=0.7, alpha=0.3, gid="seeds", label="_seeds")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{name} (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    shown = ("one seed per line" if seed_counts == {1}
             else "mean over the seeds of each line, n in the legend; faint: single seeds")
    _suptitle(fig, title or f"Error curves at batch {batch} per worker ({shown})")
    return fig


def _with_ln_and_in_as_groups(summary_df: pd.DataFrame) -> pd.DataFrame:
    """Return the gn cells, with ln as G=1 and in as 1 channel per group (the paper's Table 3)."""
    frame = summary_df.copy()
    for column in ("norm.groups", "norm.group_channels"):
        if column not in frame.columns:
            frame[column] = float("nan")
    frame.loc[frame["norm"] == "ln", "norm.groups"] = 1
    frame.loc[frame["norm"] == "in", "norm.group_channels"] = 1
    return frame[frame["norm"].isin(["gn", "ln", "in"])]


def _set_groups_axis(ax: Axes, values: Sequence[float], one_is: str) -> None:
    """Log2 x axis with a tick per value, largest on the left as the paper's table reads
    (towards LN at G=1 or IN at 1 channel per group)."""
    values = sorted({float(v) for v in values})
    ax.set_xscale("log", base=2)
    ax.set_xticks(values)
    ax.set_xticklabels([f"{v:g}" + (f"\n({one_is})" if v == 1 else "") for v in values])
    ax.xaxis.set_minor_locator(mticker.NullLocator())
    ax.set_xlim(max(values) * 1.4, min(values) / 1.4)


def groups_ablation(
    summary_df: pd.DataFrame,
    *,
    reference: bool = False,
    title: str | None = None,
) -> Figure | None:
    """Error against number of groups and against channels per group, for GN (paper Table 3).

    summary_df: summarize() grouped by at least `norm`, `batch`, `norm.groups` and/or
    `norm.group_channels`. ln and in cells join as G=1 and 1 channel per group; a line is broken
    at a value it has no completed seed for. reference draws the paper's ResNet-50 ImageNet
    ablation in a row of panels of its own below ours (same x, own y: its errors can be far from
    ours). Returns None when neither setting varies.
    """
    if "norm.groups" not in summary_df.columns and "norm.group_channels" not in summary_df.columns:
        return None
    cells = _with_ln_and_in_as_groups(summary_df)
    by_groups = cells[cells["norm.groups"].notna() & cells["norm.group_channels"].isna()]
    by_channels = cells[cells["norm.group_channels"].notna()]
    panels = [
        ("norm.groups", by_groups, "number of groups G", PAPER_GN_GROUPS, "groups", "LN"),
        ("norm.group_channels", by_channels, "channels per group", PAPER_GN_GROUP_CHANNELS,
         "group_channels", "IN"),
    ]
    panels = [p for p in panels if p[1][p[0]].nunique() > 1]
    if not panels:
        return None
    rows_of_panels = 2 if reference else 1
    fig, grid = plt.subplots(rows_of_panels, len(panels), figsize=(5.5 * len(panels),
                             4.2 * rows_of_panels), sharex="col", squeeze=False,
                             layout="constrained")
    for ax in grid[0][1:]:
        ax.sharey(grid[0][0])
    ylabel = METRIC_LABELS.get(_metric_of(summary_df), "error (%)")
    for column_index, (column, rows, xlabel, paper, paper_column, one_is) in enumerate(panels):
        ax = grid[0][column_index]
        keys = ["norm", *varying_columns(rows, [c for c in ("batch", "placement") if c in rows])]
        styles = style_keys_of(rows, keys)
        for index, (key, series) in enumerate(iter_series(rows, keys)):
            line = _on_grid(series, column, rows[column])
            ax.errorbar(line.index, line["mean"], yerr=line["std"].fillna(0.0), capsize=3,
                        color=norm_color(key["norm"], index), label=series_label(key, keys),
                        **line_style(key, styles))
        values = set(rows[column].astype(float))
        if reference:
            values |= set(paper[paper_column].astype(float))
        _set_groups_axis(ax, values, one_is)
        ax.set_title(f"GN, error vs {xlabel}")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if reference:
            ref_ax = grid[1][column_index]
            ref_ax.plot(paper[paper_column], paper["error"], linestyle="--", linewidth=1,
                        marker=".", color="gray", label="paper (ResNet-50, ImageNet)",
                        gid="reference")
            _set_groups_axis(ref_ax, values, one_is)
            ref_ax.set_title(f"published: paper's Table 3, error vs {xlabel}")
            ref_ax.set_ylabel("top-1 val error (%)")
            ref_ax.grid(True, alpha=0.3)
            ref_ax.legend(fontsize=8)
        (grid[-1][column_index]).set_xlabel(xlabel)
    _suptitle(fig, title or f"Group Normalization: groups ablation ({seeds_phrase(cells)})")
    return fig


def bn_gap_vs_batch(summary_df: pd.DataFrame, *, runs: pd.DataFrame | None = None,
                    title: str | None = None) -> Figure | None:
    """Train-mode minus eval-mode test error against batch, a line per batch-dependent norm.

    summary_df: summarize(runs, metric="bn_gap"). A large gap at small batch is BN's train/test
    inconsistency (Wu & Johnson 2021). runs: the load_runs() frame, to draw each seed as a dot.
    Returns None when no run recorded the gap.
    """
    if _metric_of(summary_df, default="bn_gap") != "bn_gap":
        raise ValueError(f"bn_gap_vs_batch needs summarize(..., metric='bn_gap'), got "
                         f"metric={_metric_of(summary_df)!r}")
    cells = summary_df[summary_df["mean"].notna()]
    if cells.empty:
        return None
    keys = series_columns(cells, exclude=(*STAT_COLUMNS, "batch"))
    varying = varying_columns(cells, keys)
    fig, (ax,) = _panels(1, width=6.0)
    seeds = _completed(runs, "bn_gap")
    _plot_cells_vs_batch(ax, cells, keys, varying, mark_diverged=False, runs=seeds,
                         batches=summary_df["batch"])
    set_batch_axis(ax, list(summary_df["batch"].unique()))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel(METRIC_LABELS["bn_gap"])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    shown = seeds_phrase(cells) + ("; dots: single seeds" if seeds is not None else "")
    _suptitle(fig, title or f"Batch-statistics gap vs batch per worker ({shown})")
    return fig
