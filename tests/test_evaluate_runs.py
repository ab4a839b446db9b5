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


def test_an_experiment_without_checkpoints_is_exit_1_and_says_so(tmp_path, capsys):
    # the committed records of a finished run: config, metrics, summary, no checkpoint
    import shutil

    from normbench.commands import evaluate_runs

    archived = sorted((ROOT / "results" / "cifar10" / "runs").glob("bn_b32x2_before_s0_*"))[0]
    shutil.copytree(archived, tmp_path / "exp" / archived.name)
    out = tmp_path / "again.csv"
    assert evaluate_runs.main([str(tmp_path / "exp"), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"{archived.name}: skipped (no checkpoint)" in captured.out
    assert f"no run folder with a checkpoint under {tmp_path / 'exp'}" in captured.err
    assert not out.exists()


def test_a_damaged_config_is_one_line_exit_2(tmp_path, capsys):
    from normbench.commands import evaluate_runs

    run = tmp_path / "exp" / "bn_b2x8_before_s0_00000000"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("norm: [unclosed\n")
    assert evaluate_runs.main([str(tmp_path / "exp"), "--out", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(run / "config.yaml") in err and err.count("\n") == 1
