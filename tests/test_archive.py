"""Archiving finished runs' records (archive_dir, archive_commit): a sweep longer than a machine
is kept survives a relaunch on a fresh clone."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from normbench.config import config_hash, run_name
from normbench.train import run

from conftest import ROOT, TINY, compose_config

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
