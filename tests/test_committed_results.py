"""The committed results/ are what their records say: every number in a report is re-derived here
from the per-epoch records the report writer saved beside it (curves.csv), so a table edited by
hand, or generated from other runs than the CSVs it ships with, fails."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from normbench import report, results

ROOT = Path(__file__).resolve().parents[1]
# Reports written with their per-epoch records (older ones, such as results/demo, predate them).
REPORTS = sorted(path.parent for path in (ROOT / "results").rglob("curves.csv"))


def test_the_reproduction_on_real_data_is_committed():
    for name in ("cifar10_cpu", "cifar10_cpu_long"):
        assert ROOT / "results" / name in REPORTS
        assert "## Discussion" in (ROOT / "results" / name / "REPORT.md").read_text()


@pytest.fixture(params=REPORTS, ids=lambda path: path.name)
def committed(request):
    out_dir = request.param
    return (out_dir, pd.read_csv(out_dir / "runs.csv"), pd.read_csv(out_dir / "curves.csv"),
            pd.read_csv(out_dir / "summary.csv"))


def test_run_metrics_are_those_of_their_epochs(committed):
    _, runs, curves, _ = committed
    for _, run in runs[runs["status"] == "completed"].iterrows():
        errors = curves[curves["run_dir"] == run["run_dir"]].sort_values("epoch")["test_error"]
        assert len(errors) == run["epochs"], run["run_dir"]
        assert run["final_error"] == pytest.approx(errors.iloc[-1]), run["run_dir"]
        assert run["median5_error"] == pytest.approx(errors.iloc[-5:].median()), run["run_dir"]


def test_summary_and_report_tables_are_those_of_the_runs(committed):
    out_dir, runs, _, summary = committed
    text = (out_dir / "REPORT.md").read_text()
    by = [c for c in report.CORE_KEYS if c in runs.columns]
    for metric in ("median5_error", "final_error"):
        ours = results.summarize(runs, metric=metric, by=by)
        theirs = summary[summary["metric"] == metric]
        merged = ours.merge(theirs, on=by, suffixes=("", "_committed"), validate="one_to_one")
        assert len(merged) == len(ours) == len(theirs)
        assert merged["mean"].to_numpy() == pytest.approx(merged["mean_committed"].to_numpy(), nan_ok=True)
        assert (merged["count"] == merged["count_committed"]).all()
        # each cell of the report's tables, as the report formats it
        for _, cell in ours.iterrows():
            assert report.format_cell(cell) in text, (metric, dict(cell[by]))
    assert f"| completed | {int((runs['status'] == 'completed').sum())} |" in text


def test_make_cifar10_report_remakes_the_committed_report():
    """results/cifar10 is made from its committed records alone: `make cifar10-report` must run
    the command its REPORT.md names, notes included, or a regenerated report loses them."""
    import re

    makefile = (ROOT / "Makefile").read_text()
    (target,) = re.findall(r"^cifar10-report:.*\n\t\$\(NORMBENCH\) (report .*)$", makefile, re.M)
    text = (ROOT / "results" / "cifar10" / "REPORT.md").read_text()
    (line,) = re.findall(r"Regenerate this report: `normbench (report [^`]*)`", text)
    assert target == line


def test_each_archived_run_has_the_command_that_trains_it():
    """An archive's command.txt (what its report shows under "How the runs were made") names,
    for each archived run, a command whose config is that run's: one line per run, none for a
    run that is not there."""
    import shlex

    from omegaconf import OmegaConf

    from normbench.config import run_name
    from normbench.hydra_main import compose

    for archive in sorted((ROOT / "results").rglob("runs/command.txt")):
        named = sorted(run_name(OmegaConf.to_container(compose(shlex.split(line)[2:]),
                                                       resolve=True))
                       for line in archive.read_text().splitlines())
        archived = sorted(p.parent.name for p in archive.parent.glob("*/summary.json"))
        assert named == archived, archive
