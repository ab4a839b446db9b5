"""Evaluate the last checkpoint of every run of an experiment again, with today's evaluation code.

    normbench evaluate runs/<experiment> --out results/<experiment>/reevaluated.csv

For each run folder that holds a checkpoint, the run's own config (config.yaml) rebuilds its data
and model, the checkpoint's weights and statistics are loaded, and the test set is evaluated as
a run evaluates it after an epoch (`test_error`, and for batch-dependent norms
`train_mode_test_error` and `bn_gap`). Use it when an evaluation was wrong in the records and has
been fixed since: the recorded last-epoch `test_error` is written beside the new one, so a
checkpoint that is not the last epoch's, or an evaluation that changed what it should not, shows.
It writes a CSV and a markdown table (same name, .md) and trains nothing. Damaged records stop
it with one line naming the file (exit status 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from normbench.bn_eval import has_batch_statistics
from normbench.config import parse_config, run_key
from normbench.records import NoRunsFound, RecordsError, RunFolder, find_run_dirs
from normbench.train import Trainer

CELL = ("norm", "placement", "batch")  # the markdown table's rows: one per cell, seeds averaged


def evaluate_run(run_dir: Path, threads: int, batch_dependent_only: bool = False) -> dict | None:
    """Return the run's keys, recorded last-epoch errors and the new evaluation; None when the
    folder has no checkpoint, or (batch_dependent_only) its model has no batch-dependent norm."""
    folder = RunFolder(run_dir)
    cfg = folder.read_config()
    if cfg is None:
        raise RecordsError(f"{folder.config_path} does not exist")
    if not (folder.checkpoint_path.exists() or folder.previous_checkpoint_path.exists()):
        # nothing to evaluate, e.g. the archived records of results/*/runs (no checkpoints):
        # passed over, where training would refuse a folder whose epochs lost their checkpoint
        return None
    state = folder.load_checkpoint(run_key(cfg))  # refuses a checkpoint of another config
    if state is None:
        return None
    cfg = parse_config({**cfg, "device": "cpu", "threads": threads, "progress": False,
                        "compile": False})
    trainer = Trainer(cfg, folder)
    if batch_dependent_only and not has_batch_statistics(trainer.model):
        return None
    trainer.restore(state)
    recorded = folder.read_metrics()[-1]
    new = trainer.evaluate()
    row = {"run_dir": run_dir.as_posix(), "norm": cfg.norm.name, "placement": cfg.placement,
           "batch": cfg.batch, "seed": cfg.seed, "epoch": state["epoch"],
           "recorded_test_error": recorded["test_error"], "test_error": new["test_error"]}
    for key in ("train_mode_test_error", "bn_gap"):
        if key in new:
            row[f"recorded_{key}"] = recorded.get(key)
            row[key] = new[key]
    return row


def markdown(frame: pd.DataFrame) -> str:
    """Mean over seeds per (norm, placement, batch) of the new evaluation, as a markdown table."""
    columns = [c for c in ("test_error", "train_mode_test_error", "bn_gap") if c in frame.columns]
    table = frame.groupby(list(CELL), sort=True)[columns].agg(["mean", "count"])
    header = ["norm", "placement", "batch", *[f"{c} (mean, n)" for c in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for key, row in table.iterrows():
        cells = [f"{row[(c, 'mean')]:.2f} (n={int(row[(c, 'count')])})" for c in columns]
        lines.append("| " + " | ".join([*map(str, key), *cells]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    try:
        return evaluate_experiment(argv, prog)
    except (RecordsError, NoRunsFound) as error:  # a damaged record or a wrong folder: one line
        print(f"error: {error}", file=sys.stderr)
        return 2


def evaluate_experiment(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment_dir", type=Path, help="folder holding the experiment's run folders")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write (and a .md beside it)")
    parser.add_argument("--batch-dependent-only", action="store_true",
                        help="only runs whose norm records train_mode_test_error (bn, brn, ...)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    run_dirs = find_run_dirs(args.experiment_dir)
    rows = []
    for number, run_dir in enumerate(run_dirs, start=1):
        row = evaluate_run(run_dir, args.threads, args.batch_dependent_only)
        if row is None:
            print(f"[{number}/{len(run_dirs)}] {run_dir.name}: skipped (no checkpoint"
                  f"{', or no batch-dependent norm' if args.batch_dependent_only else ''})", flush=True)
            continue
        rows.append(row)
        gap = f", bn_gap {row['bn_gap']:.2f}" if "bn_gap" in row else ""
        print(f"[{number}/{len(run_dirs)}] {run_dir.name}: test_error {row['test_error']:.2f} "
              f"(recorded {row['recorded_test_error']:.2f}){gap}", flush=True)
    if not rows:
        print(f"no run folder with a checkpoint under {args.experiment_dir}", file=sys.stderr)
        return 1
    frame = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    args.out.with_suffix(".md").write_text(markdown(frame))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0
