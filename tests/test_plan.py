"""`normbench plan`: what a sweep would do with each cell, read without doing any of it."""

from __future__ import annotations

import pytest

from conftest import TINY, compose_config, run_cli

from normbench import records
from normbench.commands import plan
from normbench.train import run as train_run


def plan_of(capsys, overrides: list[str]) -> tuple[int, str]:
    status = plan.main(overrides, "normbench plan")
    return status, capsys.readouterr().out


def cell_lines(output: str) -> dict[str, str]:
    """{run folder name: its line} of the plan's cell lines (`  STATE  FOLDER  DETAIL`)."""
    lines = {}
    for line in output.splitlines():
        state = next((s for s in plan.STATES if line.startswith(f"  {s} ")), None)
        if state is not None:
            folder = line[len(state) + 2:].split()[0]
            lines[folder.rsplit("/", 1)[-1]] = line
    return lines


def test_plan_names_the_folders_the_sweep_trains_then_skips(tmp_path, capsys):
    out_root = tmp_path / "runs"
    sweep = [*TINY, "epochs=1", "experiment_name=plantest", "norm=bn,gn8", f"out_root={out_root}"]
    status, before = plan_of(capsys, sweep)
    assert status == 0
    assert before.startswith("2 cells of `normbench train -m ")
    assert "0 finished (the sweep skips them), 0 training now in another launch, 0 resume " \
           "from a checkpoint, 2 to train from the start, 0 refused." in before
    assert not out_root.exists()  # planning writes nothing

    run_cli(["-m", *sweep], cwd=tmp_path)
    trained = sorted(p.name for p in (out_root / "plantest").iterdir() if p.name[:2] in ("bn", "gn"))
    status, after = plan_of(capsys, sweep)
    assert sorted(cell_lines(after)) == trained  # the very folders the sweep made
    assert all(" finished " in line and "completed, median-of-5 error" in line
               for line in cell_lines(after).values())
    assert "2 finished (the sweep skips them)" in after
    assert "The finished runs took" in after


def test_plan_reads_each_state_of_a_cell(tmp_path, capsys):
    out_root, archive = tmp_path / "runs", tmp_path / "archive"
    common = [*TINY, "experiment_name=states", f"out_root={out_root}", f"archive_dir={archive}"]
    _, first = plan_of(capsys, [*common, "seed=0,1,2,3,4"])
    names = sorted(cell_lines(first), key=lambda name: name.split("_s")[1])
    folders = {seed: out_root / "states" / name for seed, name in enumerate(names)}
    finished = {"status": "completed", "median5_error": 12.5, "wall_time": 3600.0}
    folders[0].mkdir(parents=True)
    records.RunFolder(folders[0]).write_summary(finished)
    (archive / names[1]).mkdir(parents=True)
    records.RunFolder(archive / names[1]).write_summary({**finished, "median5_error": 13.0})
    folders[2].mkdir(parents=True)
    (folders[2] / records.CHECKPOINT_FILE).write_bytes(b"a checkpoint")
    (folders[2] / records.METRICS_FILE).write_text('{"epoch": 1}\n')
    held = records.RunFolder(folders[3])
    held.open()  # a launch training in it now
    folders[4].mkdir(parents=True)  # holds seed 0's config: not this cell's run
    records.RunFolder(folders[4]).write_config(compose_config([*common, "seed=0"]))
    try:
        _, output = plan_of(capsys, [*common, "seed=0,1,2,3,4"])
    finally:
        held.close()
    lines = cell_lines(output)
    assert "finished" in lines[names[0]] and "error 12.50" in lines[names[0]]
    assert "finished" in lines[names[1]] and "error 13.00 (archived)" in lines[names[1]]
    assert str(archive / names[1]) in lines[names[1]]
    assert "resumes" in lines[names[2]] and "(1 of 2 epochs recorded)" in lines[names[2]]
    assert "training" in lines[names[3]] and "by another launch now" in lines[names[3]]
    assert "refused" in lines[names[4]] and "another config (keys: seed)" in lines[names[4]]
    assert "2 finished (the sweep skips them), 1 training now in another launch, 1 resume " \
           "from a checkpoint, 0 to train from the start, 1 refused." in output
    assert "The finished runs took 1 h 00 min each (2 h 00 min in all" in output
    assert not (folders[0] / records.LOCK_FILE).exists()  # reading took no lock


def test_plan_refuses_a_bad_value_by_name_and_a_failed_run_trains_again(tmp_path, capsys):
    out_root = tmp_path / "runs"
    common = [*TINY, "experiment_name=bad", f"out_root={out_root}"]
    _, output = plan_of(capsys, [*common, "norm=bn", "batch=8,1"])
    lines = list(cell_lines(output).values())
    refused = next(line for line in lines if " refused " in line)
    assert "batch=1" in refused and "is not allowed with norm=bn" in refused

    _, first = plan_of(capsys, [*common, "norm=gn8"])
    (name,) = cell_lines(first)
    folder = out_root / "bad" / name
    folder.mkdir(parents=True)
    records.RunFolder(folder).write_summary({"status": "failed", "error": "RuntimeError: boom"})
    _, again = plan_of(capsys, [*common, "norm=gn8"])
    assert "to train" in again and "its last launch ended failed: RuntimeError: boom" in again

    # epochs recorded but no checkpoint left: training refuses this folder, so the plan does
    (folder / records.METRICS_FILE).write_text('{"epoch": 1}\n')
    _, lost = plan_of(capsys, [*common, "norm=gn8"])
    assert " refused " in lost and "holds finished epochs but the run folder has no checkpoint" in lost
    with pytest.raises(records.RecordsError, match="holds finished epochs"):
        train_run(compose_config([*common, "norm=gn8"]), folder)


def test_plan_of_an_unknown_option_is_one_error_line(tmp_path, capsys):
    status = plan.main(["norm=nonorm", f"out_root={tmp_path}"], "normbench plan")
    assert status == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "nonorm" in error
    assert not any(tmp_path.iterdir())


def test_plan_expands_the_experiments_grid_with_the_command_lines_values_winning(capsys):
    status, output = plan_of(capsys, ["experiment=cifar10", "seed=0,1", "norm=bn",
                                      "out_root=/nonexistent/runs"])
    assert status == 0
    # experiments/cifar10.yaml sweeps norm bn,gn8 x batch 32..2 x seed 0: norm and seed here win
    assert output.startswith("10 cells of `normbench train -m experiment=cifar10 seed=0,1 norm=bn")
    jobs = list(cell_lines(output))
    assert all(name.startswith("bn_b") for name in jobs)
    assert {name.split("_s")[1][0] for name in jobs} == {"0", "1"}


def test_plan_is_a_subcommand():
    from normbench import cli

    assert "plan" in cli.SUBCOMMANDS and "plan" in cli.usage()
