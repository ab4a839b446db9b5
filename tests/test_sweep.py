"""Sweeps: a real multirun in a subprocess, relaunched, with a failing cell, then reported."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import ROOT, TINY, run_cli


def outcome_counts(output: str) -> dict[str, int]:
    line = next(line for line in output.splitlines() if line.strip().startswith("trained "))
    return {name: int(count) for name, count in re.findall(r"(\w+) (\d+)", line)}


def test_sweep_runs_relaunches_survives_a_failing_cell_and_reports(tmp_path):
    # bn at batch 1 is refused (BN needs 2 images per worker): that cell fails, the rest run.
    sweep = ["-m", *TINY, "epochs=1", "experiment_name=sweeptest", "norm=bn,gn8", "batch=8,1",
             f"out_root={tmp_path / 'runs'}"]
    first = run_cli(sweep, cwd=tmp_path, check=False)
    output = first.stdout + first.stderr
    # every cell had its turn, and the exit status says that one failed
    assert first.returncode == 1, output
    assert re.search(r"sweep \S+: 1 of 4 runs failed \(listed above\); exit status 1", output)
    assert outcome_counts(output) == {"trained": 3, "resumed": 0, "skipped": 0, "diverged": 0,
                                      "failed": 1, "interrupted": 0, "refused": 0,
                                      "unreported": 0}
    assert re.search(r"failed: bn_b1x4_\S+: ConfigError: batch=1 is not allowed with norm=bn",
                     output)
    experiment = tmp_path / "runs" / "sweeptest"
    summaries = {p.parent.name: json.loads(p.read_text())
                 for p in experiment.glob("*/summary.json")}
    assert sorted(s["status"] for s in summaries.values()) == ["completed"] * 3 + ["failed"]
    assert "experiment_name=sweeptest" in (experiment / "command.txt").read_text()

    # the same command again: nothing is trained, and the refused cell fails again
    second = run_cli(sweep, cwd=tmp_path, check=False)
    assert second.returncode == 1
    assert outcome_counts(second.stdout + second.stderr)["trained"] == 0
    assert outcome_counts(second.stdout + second.stderr)["skipped"] == 3

    report = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(experiment),
                             "--out", str(tmp_path / "report")], capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr
    out = tmp_path / "report"
    assert (out / "REPORT.md").exists() and (out / "runs.csv").exists()
    assert list(out.rglob("*error_vs_batch*.png")) and list(out.rglob("*error_vs_batch*.svg"))
    text = (out / "REPORT.md").read_text()
    assert "failed" in text


def test_parallel_local_sweep_through_joblib(tmp_path):
    # Jobs run in joblib's worker processes: run-folder naming (a custom resolver) and the
    # status summary (read from the run folders) must work there too.
    result = run_cli(["-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", "threads=1",
                      *TINY, "epochs=1", "experiment_name=parallel", "norm=bn,gn8",
                      f"out_root={tmp_path}"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "Joblib.Parallel(n_jobs=2" in output
    assert outcome_counts(output)["trained"] == 2
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "parallel").glob("*/summary.json")]
    assert [s["status"] for s in summaries] == ["completed", "completed"]
