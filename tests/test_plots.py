"""Tests for normbench.plots: what is drawn where, checked on the returned Figure objects."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402

from normbench import plots, results  # noqa: E402

NAN = float("nan")

# The run-folder fabricator lives in test_results.py; make it importable in any pytest import mode.
sys.path.insert(0, str(Path(__file__).parent))
from test_results import curve, make_experiment, make_groups_experiment  # noqa: E402


def load_quietly(experiment_dir: Path) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fabricated incomplete run has a truncated line
        return results.load_runs(experiment_dir)


@pytest.fixture(scope="module")
def two_placements(tmp_path_factory) -> pd.DataFrame:
    return load_quietly(make_experiment(tmp_path_factory.mktemp("runs"), placements=("before", "after")))


@pytest.fixture(scope="module")
def one_placement(tmp_path_factory) -> pd.DataFrame:
    return load_quietly(make_experiment(tmp_path_factory.mktemp("runs")))


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def errorbars(ax) -> dict[str, tuple[list, list]]:
    """Return {legend label: (x, y)} of the errorbar lines in a panel."""
    found = {}
    for container in ax.containers:
        if isinstance(container, ErrorbarContainer):
            line = container.lines[0]
            found[container.get_label()] = (list(line.get_xdata()), list(line.get_ydata()))
    return found


def title_of(fig) -> str:
    """The figure's title on one line (it is wrapped to the figure's width)."""
    return " ".join(fig.get_suptitle().split())


def mean_lines(ax) -> list:
    """The lines of a panel that are in its legend (not the faint single seeds)."""
    return [line for line in ax.lines if not line.get_label().startswith("_")]


def diverged_markers(ax) -> list:
    return [line for line in ax.lines if line.get_gid() == "diverged"]


# --------------------------------------------------------------------------- error_vs_batch


def test_error_vs_batch_panel_per_placement_line_per_norm(two_placements):
    fig = plots.error_vs_batch(results.summarize(two_placements))
    assert len(fig.axes) == 2
    before, after = fig.axes
    assert "before" in before.get_title() and "after" in after.get_title()
    for ax in fig.axes:
        assert sorted(errorbars(ax)) == ["bn", "gn"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["bn", "gn"]
        assert "batch per worker" in ax.get_xlabel()
    assert "median of last 5" in before.get_ylabel()
    assert title_of(fig)
    # Means over completed seeds, largest batch first.
    assert errorbars(before)["bn"] == ([32, 8, 2], pytest.approx([10.5, 13.0, 30.0]))
    assert errorbars(after)["gn"] == ([32, 8, 2], pytest.approx([12.5, 13.0, 13.0]))


def test_error_vs_batch_axis_is_log2_with_32_on_the_left(one_placement):
    fig = plots.error_vs_batch(results.summarize(one_placement))
    (ax,) = fig.axes  # one placement, one panel
    assert ax.get_xscale() == "log"
    assert ax.xaxis.get_transform().base == 2
    left, right = ax.get_xlim()
    assert left > 32 and right < 2  # inverted: 32 on the left, 2 on the right
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "8", "32"]
    x32 = ax.transData.transform((32, 10))[0]
    x2 = ax.transData.transform((2, 10))[0]
    assert x32 < x2


def test_error_vs_batch_error_bars_are_std_over_seeds(one_placement):
    fig = plots.error_vs_batch(results.summarize(one_placement))
    container = next(c for c in fig.axes[0].containers if c.get_label() == "bn")
    (bars,) = container.lines[2]
    # the first bar spans mean +- std at batch 32: 10.5 +- sqrt(0.5)
    (_, low), (_, high) = bars.get_segments()[0]
    assert (low, high) == (pytest.approx(10.5 - 0.5**0.5), pytest.approx(10.5 + 0.5**0.5))


def test_error_vs_batch_marks_diverged_cells(one_placement):
    fig = plots.error_vs_batch(results.summarize(one_placement))
    ax = fig.axes[0]
    (marker,) = diverged_markers(ax)
    assert marker.get_marker() == "x"
    assert list(marker.get_xdata()) == [2]
    assert marker.get_color() == plots.NORM_COLORS["bn"]
    assert "1/2 diverged" in [t.get_text() for t in ax.texts]
    # the marker sits above every data point
    marker_y = ax.transAxes.transform((0, marker.get_ydata()[0]))[1]
    top_point = ax.transData.transform((2, 30.0))[1]
    assert marker_y > top_point


def test_error_vs_batch_keeps_a_cell_where_every_seed_diverged(one_placement):
    runs = one_placement[~((one_placement["norm"] == "bn") & (one_placement["batch"] == 2)
                           & (one_placement["seed"] == 1))]
    fig = plots.error_vs_batch(results.summarize(runs))
    ax = fig.axes[0]
    assert len(diverged_markers(ax)) == 1
    assert "diverged" in [t.get_text() for t in ax.texts]
    # no point where nothing completed: the line stops there
    assert errorbars(ax)["bn"] == ([32, 8, 2], pytest.approx([10.5, 13.0, NAN], nan_ok=True))


def test_error_vs_batch_breaks_a_line_at_a_batch_that_was_not_run(one_placement):
    runs = one_placement[~((one_placement["norm"] == "gn") & (one_placement["batch"] == 8))]
    fig = plots.error_vs_batch(results.summarize(runs))
    lines = errorbars(fig.axes[0])
    # gn was not run at batch 8: NaN there, so no segment joins its 32 and 2 (bn's line is whole)
    assert lines["gn"] == ([32, 8, 2], pytest.approx([11.5, NAN, 12.0], nan_ok=True))
    assert lines["bn"] == ([32, 8, 2], pytest.approx([10.5, 13.0, 30.0]))


def test_error_vs_batch_shows_every_seed_as_a_dot(one_placement):
    fig = plots.error_vs_batch(results.summarize(one_placement), runs=one_placement)
    ax = fig.axes[0]
    # beside their batch, a fixed step on the log2 axis
    dots = {line.get_color(): sorted(zip(
                (line.get_xdata() / plots.SEED_OFFSET).round(9).tolist(), line.get_ydata()))
            for line in ax.lines if line.get_gid() == "seeds"}
    # completed seeds only: bn's diverged seed at 2 and its incomplete run at 8 are not dots
    assert dots[plots.NORM_COLORS["bn"]] == [(2, 30.0), (8, 12.0), (8, 14.0), (32, 10.0),
                                             (32, 11.0)]
    assert dots[plots.NORM_COLORS["gn"]] == [(2, 12.0), (8, 11.5), (8, 12.5), (32, 11.0),
                                             (32, 12.0)]
    assert "dots: single seeds" in title_of(fig)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["bn", "gn"]  # dots not in it


def test_error_vs_batch_title_says_one_seed_when_there_is_one(one_placement):
    one_seed = one_placement[one_placement["seed"] == 0]
    title = title_of(plots.error_vs_batch(results.summarize(one_seed)))
    assert "one seed per cell" in title and "std" not in title
    # bn's batch-2 cell has one completed seed (the other diverged), the other cells two
    title = title_of(plots.error_vs_batch(results.summarize(one_placement)))
    assert "mean ± std over 1 to 2 seeds per cell" in title


def references(ax) -> dict[str, list]:
    return {line.get_label(): list(line.get_ydata()) for line in ax.lines
            if line.get_gid() == "reference"}


def test_error_vs_batch_draws_reference_for_our_norms_in_its_own_panel(one_placement):
    fig = plots.error_vs_batch(results.summarize(one_placement),
                               reference=results.PAPER_RESNET50_IMAGENET, reference_label="paper")
    ours, theirs = fig.axes
    # ln, in and brn were not run, so only bn and gn of the paper are drawn
    assert references(theirs) == {"bn (paper)": [23.6, 23.7, 24.8, 27.3, 34.7],
                                  "gn (paper)": [24.1, 24.2, 24.0, 24.2, 24.1]}
    assert references(ours) == {} and "paper" in theirs.get_title()
    fig.canvas.draw()
    assert [t.get_text() for t in theirs.get_xticklabels()] == ["2", "4", "8", "16", "32"]
    assert [t.get_text() for t in ours.get_xticklabels()] == ["2", "8", "32"]


def test_error_vs_batch_reference_far_away_does_not_squash_our_lines(two_placements):
    paper = results.PAPER_RESNET50_IMAGENET
    far = paper.assign(error=paper["error"] + 40)
    fig = plots.error_vs_batch(results.summarize(two_placements), reference=far)
    before, after, theirs = fig.axes
    # our panels share their y axis with each other, not with the published one
    assert before.get_ylim() == after.get_ylim()
    assert before.get_ylim()[1] < 40 < 60 < theirs.get_ylim()[0]
    assert references(before) == references(after) == {}


# --------------------------------------------------------------------------- shape_vs_batch


def test_shape_vs_batch_puts_our_differences_beside_the_published_ones(two_placements):
    paper = results.PAPER_RESNET50_IMAGENET
    far = paper.assign(error=paper["error"] + 40)
    fig = plots.shape_vs_batch(results.summarize_shape(two_placements),
                               [("paper", far), ("Keras", results.KERAS_RESNET32_CIFAR10)])
    before, after = fig.axes
    ours = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in before.lines if line.get_gid() is None and line.get_label()[0] != "_"}
    # each norm minus its own error at batch 32, paired by seed: bn at 2 is seed 1's 30 - 11
    # (seed 0 diverged), gn at 2 seed 0's 12 - 11 (seed 1 failed)
    assert ours["bn"] == ([32, 8, 2], pytest.approx([0.0, 2.5, 19.0]))
    assert ours["gn"] == ([32, 8, 2], pytest.approx([0.0, 0.5, 1.0]))
    # the published differences, whatever their level (40 points up here): 34.7 - 23.6 for bn
    theirs = references(before)
    assert theirs["bn (paper)"] == pytest.approx([0.0, 0.1, 1.2, 3.7, 11.1])
    assert theirs["gn (Keras)"] == pytest.approx([0.0, 0.24, 0.18, -0.02, 0.16])
    assert references(after) == theirs
    assert "batch 32" in title_of(fig) and "dashed: published" in title_of(fig)


def test_shape_vs_batch_none_with_one_batch(one_placement):
    one_batch = one_placement[one_placement["batch"] == 32]
    assert plots.shape_vs_batch(results.summarize_shape(one_batch)) is None


# --------------------------------------------------------------------------- training_curves


def test_training_curves_two_panels_line_per_norm(one_placement):
    curves = results.curves_of(one_placement)
    fig = plots.training_curves(curves)
    train, test = fig.axes
    assert (train.get_title(), test.get_title()) == ("train error", "test error")
    assert train.get_xlabel() == "epoch" and "%" in test.get_ylabel()
    assert "batch 32" in title_of(fig)  # the default is the largest batch
    for ax in fig.axes:
        assert [line.get_label() for line in mean_lines(ax)] == ["bn, n=2", "gn, n=2"]
    gn_test = mean_lines(test)[1]
    assert list(gn_test.get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(gn_test.get_ydata()) == pytest.approx(curve(11.5))  # mean of seeds 11 and 12
    assert list(mean_lines(train)[1].get_ydata()) == pytest.approx([e - 5.0 for e in curve(11.5)])
    # each of the two seeds is drawn too, faintly, in the line's colour
    gn_seeds = [list(line.get_ydata()) for line in test.lines
                if line.get_gid() == "seeds" and line.get_color() == gn_test.get_color()]
    assert gn_seeds == [pytest.approx(curve(11.0)), pytest.approx(curve(12.0))]
    assert "n in the legend" in title_of(fig)


def test_training_curves_leave_out_diverged_and_failed_runs(one_placement):
    fig = plots.training_curves(results.curves_of(one_placement), batch=2)
    test = fig.axes[1]
    bn, gn = test.lines  # one seed each: no faint seed lines
    assert (bn.get_label(), gn.get_label()) == ("bn, n=1", "gn, n=1")
    assert "one seed per line" in title_of(fig)
    assert list(bn.get_ydata()) == pytest.approx(curve(30.0))  # the diverged seed is left out
    assert list(gn.get_ydata()) == pytest.approx(curve(12.0))  # the failed seed is left out


def test_training_curves_split_placements_by_line_style(two_placements):
    fig = plots.training_curves(results.curves_of(two_placements))
    labels = [line.get_label() for line in mean_lines(fig.axes[0])]
    assert labels == ["bn (placement=after), n=2", "bn (placement=before), n=2",
                      "gn (placement=after), n=2", "gn (placement=before), n=2"]
    styles = [line.get_linestyle() for line in mean_lines(fig.axes[0])]
    assert styles[0] != styles[1] and styles[0] == styles[2]


def test_training_curves_none_without_completed_runs(one_placement):
    curves = results.curves_of(one_placement)
    assert plots.training_curves(curves[curves["status"] == "failed"]) is None


# --------------------------------------------------------------------------- groups_ablation


def test_groups_ablation_panels_and_values(tmp_path):
    runs = results.load_runs(make_groups_experiment(tmp_path))
    summary = results.summarize(runs, by=["norm", "batch", *results.extra_factors(runs)])
    fig = plots.groups_ablation(summary)
    by_groups, by_channels = fig.axes
    assert "groups" in by_groups.get_xlabel() and "channels per group" in by_channels.get_xlabel()
    lines = errorbars(by_groups)
    assert lines["gn"] == ([32, 16, 1], pytest.approx([24.1, 24.6, 25.1]))
    # LN is GN with one group: a point at G=1, nothing where it was not run
    assert lines["ln"] == ([32, 16, 1], pytest.approx([NAN, NAN, 25.3], nan_ok=True))
    assert errorbars(by_channels) == {"gn": ([16, 4], pytest.approx([24.3, 24.9]))}
    for ax in fig.axes:
        assert ax.get_xscale() == "log"
        left, right = ax.get_xlim()
        assert left > right  # many groups on the left, as the paper's table reads


def test_groups_ablation_reference_and_none_when_nothing_varies(tmp_path, one_placement):
    runs = results.load_runs(make_groups_experiment(tmp_path))
    summary = results.summarize(runs, by=["norm", "batch", *results.extra_factors(runs)])
    fig = plots.groups_ablation(summary, reference=True)
    ours_groups, ours_channels, paper_groups, paper_channels = fig.axes  # the paper's row below
    assert references(ours_groups) == references(ours_channels) == {}
    assert list(references(paper_groups).values()) == [list(results.PAPER_GN_GROUPS["error"])]
    assert (list(references(paper_channels).values())
            == [list(results.PAPER_GN_GROUP_CHANNELS["error"])])
    assert paper_groups.get_xlim() == ours_groups.get_xlim()
    assert plots.groups_ablation(results.summarize(one_placement)) is None


# --------------------------------------------------------------------------- bn_gap_vs_batch


def test_bn_gap_vs_batch_line_per_batch_dependent_norm(one_placement):
    fig = plots.bn_gap_vs_batch(results.summarize(one_placement, metric="bn_gap"))
    (ax,) = fig.axes
    # gn records no gap, so only bn is drawn
    assert errorbars(ax) == {"bn": ([32, 8, 2], pytest.approx([0.5, 2.0, 10.0]))}
    assert ax.get_xlim()[0] > ax.get_xlim()[1]
    assert "train-mode" in ax.get_ylabel()


def test_bn_gap_vs_batch_none_without_gap_and_refuses_other_metrics(one_placement):
    gn_only = one_placement[one_placement["norm"] == "gn"]
    assert plots.bn_gap_vs_batch(results.summarize(gn_only, metric="bn_gap")) is None
    with pytest.raises(ValueError, match="bn_gap"):
        plots.bn_gap_vs_batch(results.summarize(one_placement))
