"""What `normbench train -m OVERRIDES` would do, cell by cell, without doing any of it.

    normbench plan experiment=cifar10                 # the experiment's grid
    normbench plan experiment=cifar10 seed=1 norm=bn  # the same overrides train -m takes

A sweep that runs over several sessions (results/cifar10: each finished run committed as it
ends) is relaunched with the same command; this lists which of its cells that relaunch skips
(finished, in the run folder or in the committed archive), which resume from a checkpoint,
which start from scratch and which would be refused (a bad value, or a folder holding another
config), and what the finished ones took. It writes nothing: no run folder, no lock, no W&B.

The cells are Hydra's own expansion of the sweep (its basic sweeper: the experiment's
`hydra.sweeper.params`, then the command line's), so the run folders named here are the ones
the sweep opens.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FINISHED_HERE = "finished"
TRAINING = "training"  # another launch holds the folder now: a relaunch is refused this cell
RESUMES = "resumes"
TO_TRAIN = "to train"
REFUSED = "refused"
STATES = (FINISHED_HERE, TRAINING, RESUMES, TO_TRAIN, REFUSED)


@dataclass
class Cell:
    overrides: list[str]  # the job's overrides, as the sweep launches it
    state: str  # one of STATES
    folder: str  # the run folder the sweep opens (or where the finished records are)
    detail: str = ""
    wall_time: float | None = None  # seconds, for finished runs


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override list of every job `normbench train -m OVERRIDES` launches, in its order.

    Must run inside hydra.initialize_config_dir (the config loader resolves group sweeps such
    as `norm=glob(gn*)`)."""
    import hydra
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    base = hydra.compose(config_name="config", overrides=fixed, return_hydra_config=True)
    params = base.hydra.sweeper.get("params") or {}
    # As Hydra's BasicSweeper.sweep: the config's sweep first, the command line's after it (a
    # key in both takes the command line's values).
    lines = [f"{key}={value}" for key, value in params.items()] + list(overrides)
    batches = BasicSweeper.split_arguments(parser.parse_overrides(lines), None)
    return [job for batch in batches for job in batch]


def plan_cell(job: list[str]) -> Cell:
    """What the sweep does with one job. Must run inside hydra.initialize_config_dir."""
    import hydra
    from omegaconf import OmegaConf

    from normbench.archive import archive_folder, archived_summary
    from normbench.config import ConfigError, config_differences, parse_config
    from normbench.hydra_main import job_config
    from normbench.records import FINISHED, RecordsError, RunFolder, folder_in_use

    root = hydra.compose(config_name="config", overrides=job, return_hydra_config=True)
    # Only the two keys that name the folder are resolved: other hydra keys call resolvers
    # that take the run folder's lock (normbench.hydra_callbacks.if_run_folder_held).
    folder = RunFolder(Path(str(OmegaConf.select(root, "hydra.sweep.dir")))
                       / str(OmegaConf.select(root, "hydra.sweep.subdir")))

    def cell(state: str, detail: str = "", where: Path = folder.path,
             summary: dict[str, Any] | None = None) -> Cell:
        return Cell(job, state, where.as_posix(), detail,
                    None if summary is None else summary.get("wall_time"))

    try:
        cfg = parse_config(job_config(root))
    except ConfigError as error:
        return cell(REFUSED, str(error))
    try:
        stored = folder.read_config()
        if stored is not None and config_differences(stored, cfg):
            return cell(REFUSED, "the folder holds a run of another config (keys: "
                                 f"{', '.join(config_differences(stored, cfg))})")
        summary = folder.read_summary()
        if summary and summary.get("status") in FINISHED:
            return cell(FINISHED_HERE, _finished_detail(summary), summary=summary)
        archive = archive_folder(cfg, folder.path.name)
        archived = archived_summary(archive)
        if archived is not None:
            return cell(FINISHED_HERE, _finished_detail(archived) + " (archived)", archive.path,
                        archived)
        folder.check_resumable()  # as training will: epochs without a checkpoint are refused
        epochs = len(folder.read_metrics()) if folder.metrics_path.exists() else 0
    except RecordsError as error:
        return cell(REFUSED, str(error))
    if folder_in_use(folder.path):
        return cell(TRAINING, f"by another launch now ({epochs} of {cfg.epochs} epochs recorded)")
    if folder.checkpoint_path.exists() or folder.previous_checkpoint_path.exists():
        return cell(RESUMES, f"from its checkpoint ({epochs} of {cfg.epochs} epochs recorded)")
    if summary is not None:  # failed or refused before: trained again from the start
        return cell(TO_TRAIN, f"its last launch ended {summary.get('status')}: "
                              f"{summary.get('error', 'no reason recorded')}")
    return cell(TO_TRAIN)


def _finished_detail(summary: dict[str, Any]) -> str:
    error = summary.get("median5_error")
    shown = "n/a" if error is None else f"{error:.2f}"
    return f"{summary['status']}, median-of-5 error {shown}"


def format_plan(cells: list[Cell], command: str) -> str:
    from normbench.report import format_duration

    width = max(len(cell.folder) for cell in cells)
    lines = [f"{len(cells)} cells of `{command}`:", ""]
    for cell in cells:
        detail = cell.detail
        if cell.state == REFUSED:
            detail = f"{' '.join(cell.overrides)}: {detail}"
        lines.append(f"  {cell.state:<9} {cell.folder:<{width}}  {detail}".rstrip())
    counts = {state: sum(cell.state == state for cell in cells) for state in STATES}
    lines += ["", f"{counts[FINISHED_HERE]} finished (the sweep skips them), {counts[TRAINING]} "
                  f"training now in another launch, {counts[RESUMES]} resume from a checkpoint, "
                  f"{counts[TO_TRAIN]} to train from the start, {counts[REFUSED]} refused."]
    times = [cell.wall_time for cell in cells if cell.wall_time is not None]
    if times:
        low, high = format_duration(min(times)), format_duration(max(times))
        each = low if low == high else f"{low} to {high}"
        lines.append(f"The finished runs took {each} each ({format_duration(sum(times))} in all, as their "
                     "summaries record).")
    return "\n".join(lines)


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="List what `normbench train -m OVERRIDES` would do with each cell of the "
                    "sweep (skip it as finished, resume it, train it, refuse it) without doing "
                    "any of it.")
    parser.add_argument("overrides", nargs="*", help="the overrides `normbench train -m` takes, "
                        "e.g. experiment=cifar10 seed=1")
    parser.add_argument("--config-dir", type=Path, default=None,
                        help="a folder of your own configs beside normbench's (as train's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    import hydra
    from hydra.errors import HydraException

    from normbench import hydra_main  # noqa: F401  registers the experiments and resolvers
    from normbench.config_files import config_dir

    overrides = list(args.overrides)
    if args.config_dir is not None:
        overrides.append(f"hydra.searchpath=[file://{args.config_dir.expanduser().resolve()}]")
    try:
        with hydra.initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            jobs = sweep_jobs(overrides)
            cells = []
            progress = sys.stderr.isatty()  # composing a cell takes a fraction of a second
            for index, job in enumerate(jobs, 1):
                if progress:
                    print(f"\rreading cell {index} of {len(jobs)}", end="", file=sys.stderr,
                          flush=True)
                cells.append(plan_cell(job))
            if progress:
                print("\r" + " " * 40 + "\r", end="", file=sys.stderr, flush=True)
    except HydraException as error:  # an unknown key, group or option: Hydra's own message
        print(f"error: {error}", file=sys.stderr)
        return 2
    config_dir_option = [] if args.config_dir is None else [f"--config-dir {args.config_dir}"]
    command = " ".join(["normbench train -m", *config_dir_option, *args.overrides])
    print(format_plan(cells, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
