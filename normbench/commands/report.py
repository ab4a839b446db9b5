"""Write the report of an experiment: REPORT.md, runs.csv, summary.csv, curves.csv and figures.

    normbench report runs/<experiment> [--out results/<experiment>] [--notes NOTES.md]
        [--leave-out bn_gap] [--wandb]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from normbench.records import NoRunsFound, RecordsError
from normbench.report import OPTIONAL_METRICS, write_report


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment_dir", type=Path, help="folder holding the experiment's run folders")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: results/<experiment folder name>)")
    parser.add_argument("--command", default=None,
                        help="the command that produced the runs (default: <experiment_dir>/command.txt)")
    parser.add_argument("--notes", type=Path, default=None,
                        help="a markdown file of your own (what the numbers mean), included as the "
                             "report's Discussion section")
    parser.add_argument("--leave-out", action="append", default=[], choices=OPTIONAL_METRICS,
                        help="leave a diagnostic out of the report (repeatable; say why in --notes)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log figures and tables to W&B, in the runs' project and group "
                             "(WANDB_MODE, default offline)")
    args = parser.parse_args(argv)
    if args.notes is not None and not args.notes.is_file():
        parser.error(f"--notes {str(args.notes)!r} is not a file")
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out_dir = args.out or Path("results") / args.experiment_dir.resolve().name
    try:
        report = write_report(args.experiment_dir, out_dir, command=args.command,
                              notes=args.notes, leave_out=args.leave_out, log_to_wandb=args.wandb)
    except (RecordsError, NoRunsFound) as error:  # a damaged record or a wrong folder: one line
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    print(f"tables: {out_dir / 'runs.csv'}, {out_dir / 'summary.csv'}, {out_dir / 'curves.csv'}")
    print(f"figures: {out_dir / 'figures'}")
    return 0
