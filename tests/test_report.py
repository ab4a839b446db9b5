"""Tests for normbench.report and scripts/report.py: the files written and what REPORT.md says."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

from normbench import report

# The run-folder fabricator lives in test_results.py; make it importable in any pytest import mode.
sys.path.insert(0, str(Path(__file__).parent))
from test_results import COMMAND, make_experiment, make_groups_experiment  # noqa: E402
from wandb_files import offline_run, wandb_table  # noqa: E402

from normbench import results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_quietly(experiment_dir: Path, out_dir: Path, **kwargs) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fabricated incomplete run has a truncated line
        return report.write_report(experiment_dir, out_dir, **kwargs)


@pytest.fixture(scope="module")
def cifar_report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    return write_quietly(make_experiment(root / "runs"), root / "results" / "toy")


@pytest.fixture(scope="module")
def paper_report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("paper")
    experiment_dir = make_experiment(root / "runs", experiment="gn_paper", dataset="imagenet")
    (experiment_dir / "command.txt").unlink()
    return write_quietly(experiment_dir, root / "results" / "gn_paper")


def test_report_writes_tables_and_figures(cifar_report):
    out_dir = cifar_report.parent
    assert cifar_report.name == "REPORT.md"
    runs = pd.read_csv(out_dir / "runs.csv")
    assert len(runs) == 13
    assert sorted(runs["status"].unique()) == ["completed", "diverged", "failed", "incomplete"]
    curves = pd.read_csv(out_dir / "curves.csv")
    epochs = curves.groupby("run_dir")["epoch"].max()
    completed = runs.loc[runs["status"] == "completed", "run_dir"]
    assert (epochs[completed] == 6).all() and set(epochs.index) <= set(runs["run_dir"])
    assert {"norm", "batch", "seed", "test_error", "train_error"} <= set(curves.columns)
    summary = pd.read_csv(out_dir / "summary.csv")
    assert set(summary["metric"]) == {"median5_error", "final_error", "final_train_error",
                                      "train_error_fall5"}
    cell = summary[(summary["metric"] == "median5_error") & (summary["norm"] == "bn")
                   & (summary["batch"] == 32)].iloc[0]
    assert (cell["mean"], cell["count"]) == (pytest.approx(10.5), 2)
    for stem in ("error_vs_batch", "shape_vs_batch", "training_curves_batch32",
                 "training_curves_batch2", "bn_gap_vs_batch"):
        for suffix in (".png", ".svg"):
            path = out_dir / "figures" / f"{stem}{suffix}"
            assert path.stat().st_size > 1000, path
    # groups did not vary, so there is no groups figure
    assert not (out_dir / "figures" / "groups_ablation.png").exists()


def test_report_table_has_formatted_numbers_and_marks(cifar_report):
    text = cifar_report.read_text()
    assert text.startswith("# toy\n")
    assert "| norm | batch 32 | batch 8 | batch 2 |" in text
    assert ("| bn | 10.50 ± 0.71 (n=2) | 13.00 ± 1.41 (n=2, 1 incomplete) "
            "| 30.00 (n=1, 1 diverged) |") in text
    assert "| gn | 11.50 ± 0.71 (n=2) | 12.00 ± 0.71 (n=2) | 12.00 (n=1, 1 failed) |" in text
    # the last-epoch table too: curve(e) ends at e - 0.5
    assert "| bn | 10.00 ± 0.71 (n=2) |" in text


def test_report_records_command_figures_statuses_and_environment(cifar_report):
    text = cifar_report.read_text()
    assert f"```bash\n{COMMAND}\n```" in text
    assert "![error_vs_batch](figures/error_vs_batch.png)" in text
    assert "(figures/error_vs_batch.svg)" in text
    for status, count in (("completed", 10), ("diverged", 1), ("failed", 1), ("incomplete", 1)):
        assert f"| {status} | {count} |" in text
    assert "diverged at epoch 3, step 250" in text
    assert "RuntimeError: out of memory" in text
    assert "3 of 6 epochs done" in text
    assert f"| pandas | {pd.__version__} |" in text
    assert "| python |" in text and "| CPU cores |" in text and "| GPU |" in text
    assert "swept `batch`: 2, 8, 32" in text
    assert "Runs trained on: cuda (10 runs); not recorded (3 runs)." in text


def test_cifar10_report_has_keras_reference_not_paper(cifar_report):
    text = cifar_report.read_text()
    assert "Keras ResNet-32 on CIFAR-10" in text
    assert "| bn (Keras ResNet-32) | 13.60 | 13.60 | 13.86 | 15.23 | 19.70 |" in text
    assert "| bn (ours) | 10.50 ± 0.71 (n=2) | – | 13.00 ± 1.41 (n=2, 1 incomplete) | – |" in text
    assert "beside the paper" not in text


def test_gn_paper_report_has_paper_numbers_beside_ours(paper_report):
    text = paper_report.read_text()
    assert text.startswith("# gn_paper\n")
    assert "## Ours beside the paper" in text
    assert "| norm | batch 32 | batch 16 | batch 8 | batch 4 | batch 2 |" in text
    assert "| bn (paper) | 23.60 | 23.70 | 24.80 | 27.30 | 34.70 |" in text
    assert "| gn (paper) | 24.10 | 24.20 | 24.00 | 24.20 | 24.10 |" in text
    assert "| ln (paper) | 25.30 | – | – | – | – |" in text
    assert "| brn (paper) | – | – | – | 26.30 | – |" in text
    # our row sits right above the paper's
    assert ("| gn (ours) | 11.50 ± 0.71 (n=2) | – | 12.00 ± 0.71 (n=2) | – | 12.00 (n=1, 1 failed) |\n"
            "| gn (paper) |") in text
    assert "Keras" not in text
    assert "Command unknown: no `command.txt`" in text


def test_runs_command_prefers_the_argument_then_command_txt(tmp_path):
    (tmp_path / "command.txt").write_text("python run.py -m +experiment=x\n")
    assert report.runs_command(tmp_path, "make x") == "make x"
    assert report.runs_command(tmp_path, None) == "python run.py -m +experiment=x"
    (tmp_path / "command.txt").unlink()
    assert report.runs_command(tmp_path, None) is None


def test_groups_table_puts_ours_beside_the_paper(tmp_path):
    runs = results.load_runs(make_groups_experiment(tmp_path))
    summary = results.summarize(runs, by=["norm", "placement", "batch", *results.extra_factors(runs)])
    table = report.groups_comparison_table(summary)
    assert ("| groups G | 64 | 32 | 16 | 8 | 4 | 2 | 1 |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n"
            "| ours | – | 24.10 ± 0.14 (n=2) | 24.60 ± 0.14 (n=2) | – | – | – | 25.10 ± 0.14 (n=2) |\n"
            "| paper | 24.60 | 24.10 | 24.60 | 24.40 | 24.60 | 24.70 | 25.30 |") in table
    assert ("| ours | – | – | 24.30 ± 0.14 (n=2) | – | 24.90 ± 0.14 (n=2) | – | – |\n"
            "| paper | 24.40 | 24.50 | 24.20 | 24.30 | 24.80 | 25.60 | 28.40 |") in table
    # the main table names channels-per-group runs without their unused default groups=32
    assert "| gn (group_channels=16) | 24.30 ± 0.14 (n=2) |" in report.results_tables(summary)


def test_which_published_numbers_apply():
    def runs(**columns):
        return pd.DataFrame({key: [value, value] for key, value in columns.items()})

    assert report.compares_with_paper(runs(experiment_name="gn_paper", dataset="cifar10", model="resnet50"))
    assert report.compares_with_paper(runs(experiment_name="x", dataset="imagefolder", model="resnet50",
                                           **{"dataset.preset": "imagenet"}))
    assert not report.compares_with_paper(runs(experiment_name="x", dataset="imagefolder",
                                               model="resnet50", **{"dataset.preset": "cifar"}))
    assert not report.compares_with_paper(runs(experiment_name="placement", dataset="cifar10",
                                               model="resnet50"))
    assert report.is_cifar10(runs(dataset="cifar10"))
    assert not report.is_cifar10(runs(dataset="cifar100"))


def test_format_cell():
    def cell(mean, std, count, diverged=0, failed=0, incomplete=0):
        return pd.Series({"mean": mean, "std": std, "count": count, "diverged": diverged,
                          "failed": failed, "incomplete": incomplete})

    assert report.format_cell(cell(24.123, 0.456, 3)) == "24.12 ± 0.46 (n=3)"
    assert report.format_cell(cell(24.1, float("nan"), 1, failed=1)) == "24.10 (n=1, 1 failed)"
    assert report.format_cell(cell(float("nan"), float("nan"), 0, diverged=2)) == "**2 diverged**"
    assert report.format_cell(None) == "–"


def test_cli_writes_report_logs_to_wandb_and_says_where(tmp_path, capsys, monkeypatch,
                                                        wandb_in_tmp):
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = importlib.util.spec_from_file_location("report_cli", REPO / "scripts" / "report.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    experiment_dir = make_experiment(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main([str(experiment_dir), "--wandb", "--command", "make toy"]) == 0
    # the default output folder is results/<experiment folder name>
    out_dir = tmp_path / "results" / "toy"
    assert "results/toy/REPORT.md" in capsys.readouterr().out
    # the --command argument wins over the folder's command.txt
    assert "```bash\nmake toy\n```" in (out_dir / "REPORT.md").read_text()
    (run_file,) = (out_dir / "wandb").glob("offline-run-*/run-*.wandb")
    run = offline_run(run_file)
    # The report's run sits beside the runs: their project and group, read from their configs.
    assert (run["project"], run["group"], run["job_type"]) == ("normbench-toy", "toy", "report")
    (logged,) = run["history"]
    assert sorted(k for k in logged if k.startswith("figures/")) == [
        "figures/bn_gap_vs_batch", "figures/error_vs_batch", "figures/shape_vs_batch",
        "figures/training_curves_batch2", "figures/training_curves_batch32"]
    # The error-vs-batch table, and W&B's line chart of it, one line per norm.
    table = logged["error_vs_batch"]
    assert table["_type"] == "table-file" and table["nrows"] == 6
    assert logged["error_vs_batch_chart_table"]["_type"] == "table-file"
    rows = wandb_table(run_file.parent / "files" / table["path"])
    bn = rows[rows["line"] == "bn"].set_index("batch")
    assert list(bn.index) == [2, 8, 32]
    assert bn.loc[32, "median5_error"] == pytest.approx(10.5)
    assert bn.loc[2, "seeds"] == 1 and bn.loc[2, "diverged"] == 1


def load_quietly(experiment_dir: Path) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fabricated incomplete run has a truncated line
        return results.load_runs(experiment_dir)


def test_shape_table_puts_our_differences_beside_the_published_ones(tmp_path):
    runs = load_quietly(make_experiment(tmp_path / "runs"))
    shape = results.summarize_shape(runs, by=["norm", "placement", "batch"])
    table = report.shape_table(shape, [("paper", results.PAPER_RESNET50_IMAGENET),
                                       ("Keras", results.KERAS_RESNET32_CIFAR10)])
    assert table.startswith("| norm | batch 32 | batch 8 | batch 2 |")
    # Paired by seed. bn: 10/11 at 32, 12/14 at 8 (+2.50), 30.0 at 2 from seed 1 alone (seed 0
    # diverged): 30 - 11 = +19.00, where the cell means would say 30 - 10.5 = +19.50.
    assert "| bn (ours) | +0.00 | +2.50 | +19.00 (n=1) |" in table
    assert "| bn (paper) | +0.00 | +1.20 | +11.10 |" in table
    assert "| bn (Keras) | +0.00 | +0.26 | +6.10 |" in table
    # gn at 2: seed 0 alone (seed 1 failed), 12 - 11 = +1.00 (cell means: 12 - 11.5 = +0.50)
    assert "| gn (ours) | +0.00 | +0.50 | +1.00 (n=1) |" in table
    assert "| gn (paper) | +0.00 | -0.10 | +0.00 |" in table
    # one batch: no shape to show
    assert report.shape_table(shape[shape["batch"] == 32], []) is None


def test_shape_table_without_the_base_cell_shows_missing(tmp_path):
    runs = load_quietly(make_experiment(tmp_path / "runs"))
    runs = runs[~((runs["norm"] == "gn") & (runs["batch"] == 32))]
    shape = results.summarize_shape(runs, by=["norm", "placement", "batch"])
    assert "| gn (ours) | – | – | – |" in report.shape_table(shape, [])


def test_claims_table_pairs_each_claim_by_seed(tmp_path):
    runs = load_quietly(make_experiment(tmp_path / "runs"))
    table = report.claims_table(runs, [("paper", results.PAPER_RESNET50_IMAGENET)])
    lines = table.splitlines()
    assert lines[0] == "| claim | ours: mean over seeds | ours, per seed | paper |"
    # GN - BN at 32: 11 - 10 and 12 - 11
    assert lines[2].startswith("| GN − BN at batch 32")
    assert lines[2].endswith("| +1.00 (n=2) | seed 0: +1.00, seed 1: +1.00 | +0.50 |")
    # BN - GN at 2: bn's seed 0 diverged and gn's seed 1 failed, so no seed has both cells:
    # no number, where the cell means (30 and 12) would claim +18.00
    assert lines[3].startswith("| BN − GN at batch 2")
    assert lines[3].endswith("| – | – | +10.60 |")
    # GN's range: seed 0 has 11, 11.5, 12; seed 1 misses batch 2. The paper's over 32, 8, 2: 0.1
    assert lines[4].startswith("| GN's largest minus smallest error over batches 32 to 2")
    assert lines[4].endswith("| +1.00 (n=1) | seed 0: +1.00 | +0.10 |")


def test_claims_table_needs_bn_and_gn_at_two_batches(tmp_path):
    runs = load_quietly(make_experiment(tmp_path / "runs"))
    assert report.claims_table(runs[runs["norm"] == "gn"], []) is None
    assert report.claims_table(runs[runs["batch"] == 32], []) is None
    # the groups ablation: one batch, and GN split by its groups
    assert report.claims_table(results.load_runs(make_groups_experiment(tmp_path)), []) is None


def test_claims_use_the_norm_before_the_activation(tmp_path):
    runs = load_quietly(make_experiment(tmp_path / "runs", placements=("before", "after")))
    # gn after made 5 points worse than bn after: the claims read the `before` runs only
    gn_after = (runs["norm"] == "gn") & (runs["placement"] == "after")
    runs.loc[gn_after, "median5_error"] += 5.0
    table = report.claims_table(runs, [])
    assert "| +1.00 (n=2) | seed 0: +1.00, seed 1: +1.00 |" in table


def test_cifar10_report_has_the_shape_section(cifar_report):
    text = cifar_report.read_text()
    assert "## Shape: error relative to batch 32" in text
    assert "| bn (paper, ResNet-50 ImageNet) | +0.00 | +1.20 | +11.10 |" in text
    assert "| bn (Keras ResNet-32 CIFAR-10) | +0.00 | +0.26 | +6.10 |" in text


def test_cifar10_jpeg_image_folder_counts_as_cifar10():
    def runs(**columns):
        return pd.DataFrame({key: [value, value] for key, value in columns.items()})

    jpeg = {"dataset": "imagefolder", "dataset.root": "~/.cache/normbench/data/cifar10-jpeg",
            "dataset.image_size": 32, "dataset.class_list": None}
    assert report.is_cifar10(runs(**jpeg))
    assert not report.is_cifar10(runs(**{**jpeg, "dataset.root": "/data/cifar100-jpeg"}))
    assert not report.is_cifar10(runs(**{**jpeg, "dataset.root": "/data/imagenet"}))
    assert not report.is_cifar10(runs(**{**jpeg, "dataset.class_list": "five_classes.txt"}))
    assert not report.is_cifar10(runs(**{**jpeg, "dataset.image_size": 64}))


def test_report_states_cost_and_includes_notes(tmp_path):
    experiment_dir = make_experiment(tmp_path / "runs")
    for number, run_dir in enumerate(results.find_run_dirs(experiment_dir)):
        # two launches of the first run, a line cut short by a kill in another
        (run_dir / "launches.jsonl").write_text(
            '{"started": 1000.0, "outcome": "trained"}\n{"started": 1500.0, "outcome": "resumed"}\n'
            if number == 0 else '{"started": 2000.0, "outcome": "trained"}\n{"star')
    notes = tmp_path / "NOTES.md"
    notes.write_text("BN at batch 2 is worse: see the table.\n")
    text = write_quietly(experiment_dir, tmp_path / "out", notes=notes).read_text()
    assert "## Discussion\n\nBN at batch 2 is worse: see the table.\n" in text
    assert f"--out {(tmp_path / 'out').as_posix()} --notes {notes.as_posix()}`" in text
    # the fixture's wall times (10 s per epoch): 10 completed runs of 6 epochs, a diverged one
    # of 2, an incomplete one of 3 and a failed one of 1 (from its metrics: no summary time)
    # = 600 + 20 + 30 + 10 s; the median run 60 s
    assert "11.0 min summed over 13 runs, median 1.0 min per run" in text
    assert "(1970-01-01 00:16 UTC to" in text  # the first launch, 1000 s after the epoch
    with pytest.raises(FileNotFoundError, match="no_such_notes.md"):
        report.write_report(experiment_dir, tmp_path / "out", notes=tmp_path / "no_such_notes.md")


def test_report_can_leave_out_a_diagnostic(tmp_path):
    experiment_dir = make_experiment(tmp_path / "runs")
    out_dir = tmp_path / "out"
    text = write_quietly(experiment_dir, out_dir, leave_out=["bn_gap", "train_mode_test_error"]).read_text()
    assert "Left out of this report: `bn_gap`, `train_mode_test_error`" in text
    assert f"--out {out_dir.as_posix()} --leave-out bn_gap --leave-out train_mode_test_error`" in text
    assert not (out_dir / "figures" / "bn_gap_vs_batch.png").exists()
    for table in ("runs.csv", "curves.csv"):
        assert "bn_gap" not in pd.read_csv(out_dir / table).columns
    # by default the gap is there
    write_quietly(experiment_dir, tmp_path / "all")
    assert (tmp_path / "all" / "figures" / "bn_gap_vs_batch.png").exists()
    with pytest.raises(ValueError, match="cannot leave out 'test_error'.*bn_gap, train_mode_test_error"):
        report.write_report(experiment_dir, out_dir, leave_out=["test_error"])


def test_report_refuses_wandb_logging_for_runs_of_several_projects(tmp_path):
    runs = load_quietly(make_experiment(tmp_path / "runs"))
    assert report.wandb_destination(runs) == {"project": "normbench-toy", "entity": None,
                                              "group": "toy"}
    runs.loc[runs.index[0], "wandb.project"] = "elsewhere"
    with pytest.raises(ValueError, match="several W&B projects .*elsewhere, normbench-toy"):
        report.wandb_destination(runs)
    with pytest.raises(ValueError, match="no wandb.project"):
        report.wandb_destination(runs.drop(columns=["wandb.project"]))


def test_regenerate_line_is_a_command_that_remakes_the_report(tmp_path, monkeypatch):
    """REPORT.md names the command that regenerates it: run as written, it rewrites the same
    report (all but the time stamp) into the same folder."""
    import re
    import shlex

    from normbench import cli

    monkeypatch.setenv("WANDB_MODE", "disabled")
    experiment_dir = make_experiment(tmp_path / "runs")
    first = write_quietly(experiment_dir, tmp_path / "out", leave_out=("bn_gap",))
    before = first.read_text()
    (line,) = re.findall(r"Regenerate this report: `([^`]*)`", before)
    argv = shlex.split(line)
    assert argv[:2] == ["normbench", "report"]
    first.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(argv[1:]) == 0
    stamp = re.compile(r"^Generated .* UTC from", re.M)
    assert stamp.sub("", first.read_text()) == stamp.sub("", before)


def test_report_shows_whether_training_converged(cifar_report):
    """The Convergence section tabulates each cell's last training error and its fall over the
    last 5 epochs, as summary.csv has them."""
    text = cifar_report.read_text()
    assert "## Convergence" in text
    summary = pd.read_csv(cifar_report.parent / "summary.csv")
    for metric in ("final_train_error", "train_error_fall5"):
        cells = summary[(summary["metric"] == metric) & (summary["count"] > 0)]
        assert len(cells) > 0
        for _, cell in cells.iterrows():
            assert report.format_cell(cell) in text, (metric, cell["norm"], cell["batch"])


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_report_commit_is_dirty_for_edited_code_not_for_edited_results(tmp_path):
    # Committed reports are regenerated beside edited NOTES.md and before their own files are
    # committed; "-dirty" must flag code that differs from the commit, not that.
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True,
                              capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    git("config", "user.email", "test@example.com")
    git("config", "user.name", "test")
    code = tmp_path / "normbench"
    notes = tmp_path / "results" / "toy" / "NOTES.md"
    code.mkdir()
    notes.parent.mkdir(parents=True)
    (code / "train.py").write_text("lr = 0.1\n")
    notes.write_text("first notes\n")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    head = git("rev-parse", "HEAD")

    assert report.git_commit(code) == head
    notes.write_text("edited notes\n")
    assert report.git_commit(code) == head
    (code / "train.py").write_text("lr = 0.2\n")
    assert report.git_commit(code) == head + "-dirty"
