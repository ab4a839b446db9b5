"""Archiving finished runs' records (archive_dir, archive_commit): a sweep longer than a machine
is kept survives a relaunch on a fresh clone."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from normbench.archive import record_command, run_command
from normbench.commands.report import main as report_cli
from normbench.config import config_hash, run_name
from normbench.records import RunFolder
from normbench.train import run

from conftest import ROOT, TINY, compose_config, run_cli

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def tiny_config(tmp_path, *extra: str) -> dict:
    return compose_config(TINY + ["epochs=1", f"out_root={tmp_path / 'runs'}",
                                  f"archive_dir={tmp_path / 'results' / 'runs'}", *extra])


def test_a_finished_run_is_archived_without_checkpoints(tmp_path):
    cfg = tiny_config(tmp_path)
    run(cfg, tmp_path / "runs" / run_name(cfg))
    archived = tmp_path / "results" / "runs" / run_name(cfg)
    assert sorted(p.name for p in archived.iterdir()) == [
        "config.yaml", "metrics.jsonl", "summary.json"]


def test_a_fresh_clone_skips_every_archived_run(tmp_path):
    cfg = tiny_config(tmp_path)
    first = run(cfg, tmp_path / "runs" / run_name(cfg))
    shutil.rmtree(tmp_path / "runs")  # a fresh clone: no run folders, only the archive
    again = run(cfg, tmp_path / "runs" / run_name(cfg))
    assert again["outcome"] == "skipped"
    assert again["final_error"] == first["final_error"]
    assert not (tmp_path / "runs" / run_name(cfg) / "checkpoint.pt").exists()


def test_archive_keys_do_not_change_the_run_name(tmp_path):
    plain = compose_config(TINY + ["epochs=1"])
    assert config_hash(tiny_config(tmp_path, "archive_commit=true")) == config_hash(plain)


def test_archive_commit_commits_only_the_archived_run(tmp_path, monkeypatch):
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True,
                              capture_output=True, text=True).stdout
    git("init", "-q")
    git("config", "user.email", "test@example.com")
    git("config", "user.name", "test")
    # the project's own ignore rules: they must not hide an experiment's archived runs
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    (tmp_path / "work.txt").write_text("staged work in progress\n")
    git("add", "work.txt")
    cfg = compose_config(TINY + ["epochs=1", f"out_root={tmp_path / 'runs'}",
                                 f"archive_dir={tmp_path / 'results' / 'tiny' / 'runs'}",
                                 "archive_commit=true"])
    run(cfg, tmp_path / "runs" / run_name(cfg))
    committed = git("show", "--name-only", "--format=%s", "HEAD").split()
    assert f"results/tiny/runs/{run_name(cfg)}/summary.json" in committed
    assert "work.txt" not in committed
    assert "work.txt" in git("diff", "--cached", "--name-only")  # still staged, not lost


def test_a_failed_archive_commit_keeps_the_run_and_its_records(tmp_path, caplog):
    # outside a git repository the commit fails: the run still completes, its records stay
    # archived on disk (the next finished run's commit takes them along), and a warning says why
    assert subprocess.run(["git", "-C", str(tmp_path), "rev-parse"],
                          capture_output=True).returncode != 0  # not inside a repository
    cfg = tiny_config(tmp_path, "archive_commit=true")
    with caplog.at_level("WARNING", logger="normbench.archive"):
        result = run(cfg, tmp_path / "runs" / run_name(cfg))
    assert result["status"] == "completed"
    archived = tmp_path / "results" / "runs" / run_name(cfg)
    assert (archived / "summary.json").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("could not commit" in w and str(archived) in w for w in warnings), warnings


def test_a_sweep_records_each_archived_run_s_command_and_the_report_shows_them(tmp_path):
    # The archive's report shows how its runs were made, also on a fresh clone, where the
    # sweep folder's command.txt is gone: each archived run adds the command that trains it.
    archive = tmp_path / "results" / "runs"
    sweep = ["-m", *TINY, "epochs=1", "experiment_name=archived", "norm=bn,gn8",
             f"out_root={tmp_path / 'runs'}", f"archive_dir={archive}"]
    assert run_cli(sweep, cwd=tmp_path).returncode == 0
    commands = (archive / "command.txt").read_text().splitlines()
    assert len(commands) == 2
    assert all(c.startswith("normbench train ") and "epochs=1" in c for c in commands)
    assert sorted(c.split("norm=")[1].split()[0] for c in commands) == ["bn", "gn8"]

    shutil.rmtree(tmp_path / "runs")  # a fresh clone: the relaunch skips both, adds nothing
    assert run_cli(sweep, cwd=tmp_path).returncode == 0
    assert (archive / "command.txt").read_text().splitlines() == commands

    assert report_cli([str(archive), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "REPORT.md").read_text()
    assert "Command unknown" not in text and commands[0] in text and commands[1] in text


def test_a_run_made_without_hydra_is_archived_without_a_command(tmp_path):
    cfg = tiny_config(tmp_path)
    run(cfg, tmp_path / "runs" / run_name(cfg))
    assert (tmp_path / "results" / "runs" / run_name(cfg) / "summary.json").exists()
    assert not (tmp_path / "results" / "runs" / "command.txt").exists()


def test_run_command_quotes_the_overrides_hydra_recorded(tmp_path):
    folder = RunFolder(tmp_path / "run")
    (folder.path / ".hydra").mkdir(parents=True)
    (folder.path / ".hydra" / "overrides.yaml").write_text(
        "- norm=gn\n- optim.milestones=[0.5, 0.8]\n")
    command = run_command(folder)
    assert command == "normbench train norm=gn 'optim.milestones=[0.5, 0.8]'"
    record_command(RunFolder(tmp_path / "archive" / "a"), command)
    record_command(RunFolder(tmp_path / "archive" / "b"), command)  # the same: not repeated
    assert (tmp_path / "archive" / "command.txt").read_text() == command + "\n"
