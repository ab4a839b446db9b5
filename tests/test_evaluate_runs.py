"""scripts/evaluate_runs.py: a finished run's checkpoint evaluated again gives its recorded numbers."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest

from conftest import ROOT, TINY, run_cli


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_runs", ROOT / "scripts" / "evaluate_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reevaluation_reproduces_the_records_of_the_last_epoch(tmp_path, capsys):
    run_cli(["-m", *TINY, "norm=bn,gn8", f"out_root={tmp_path}", "experiment_name=ev"], cwd=tmp_path)
    (tmp_path / "ev" / "half_a_run").mkdir()  # a folder without a checkpoint is passed over
    (tmp_path / "ev" / "half_a_run" / "config.yaml").write_text("norm: {name: bn}\n")
    out = tmp_path / "out" / "again.csv"
    assert load_script().main([str(tmp_path / "ev"), "--out", str(out)]) == 0
    frame = pd.read_csv(out).set_index("norm")
    assert sorted(frame.index) == ["bn", "gn"] and (frame["epoch"] == 2).all()
    # the same weights and statistics, the same evaluation code: the same numbers
    assert frame["test_error"].tolist() == pytest.approx(frame["recorded_test_error"].tolist())
    assert frame.loc["bn", "bn_gap"] == pytest.approx(frame.loc["bn", "recorded_bn_gap"])
    assert pd.isna(frame.loc["gn", "bn_gap"])  # gn has no batch statistics
    assert "| bn | before | 8 |" in out.with_suffix(".md").read_text()
    assert "half_a_run: skipped (no checkpoint)" in capsys.readouterr().out

    only = tmp_path / "out" / "bn_only.csv"
    assert load_script().main([str(tmp_path / "ev"), "--out", str(only), "--batch-dependent-only"]) == 0
    assert pd.read_csv(only)["norm"].tolist() == ["bn"]
