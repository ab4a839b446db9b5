"""Keeping finished runs' records in the repository, so a sweep can outlive the machine.

A sweep of several hours may not finish on one machine: the machine, its running jobs and its
ignored files (``runs/``) can be gone when work resumes. With ``archive_dir`` set (the CIFAR-10
experiment sets ``results/<experiment>/runs``), every run that finishes (completed or diverged)
copies its records, not its checkpoints, to ``<archive_dir>/<run name>/``:

    config.yaml  metrics.jsonl  summary.json

adds the command that trains that run alone to ``<archive_dir>/command.txt`` (the overrides Hydra
recorded for the run's launch: the report made from the archive shows how its runs were made),
and with ``archive_commit=true`` commits that folder to git at once (only those paths: other
staged work is left alone). A relaunch, also on a fresh clone without ``runs/``, skips every
cell whose archived summary says finished, and the report is made from the archive alone
(``normbench report results/<experiment>/runs``). Stopping loses at most the runs in flight.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from .config import RunConfig
from .records import COMMAND_FILE, FINISHED, RunFolder, read_sweep_commands, write_atomic_text

log = logging.getLogger(__name__)

GIT_RETRIES = 10  # parallel jobs of a sweep commit at the same time: git's index lock is busy


def archive_folder(cfg: RunConfig, name: str) -> RunFolder | None:
    """Where the run named ``name`` is archived, or None when ``archive_dir`` is not set."""
    if cfg.archive_dir is None:
        return None
    return RunFolder(Path(cfg.archive_dir) / name)


def archived_summary(archive: RunFolder | None) -> dict[str, Any] | None:
    """The archived run's summary if it finished, else None."""
    if archive is None:
        return None
    summary = archive.read_summary()
    return summary if summary and summary.get("status") in FINISHED else None


def archive_run(folder: RunFolder, archive: RunFolder) -> None:
    """Copy a finished run's records (no checkpoints) from ``folder`` to ``archive``.

    The summary is written last: an archive interrupted halfway has no summary and so does
    not count as finished."""
    archive.path.mkdir(parents=True, exist_ok=True)
    archive.summary_path.unlink(missing_ok=True)
    for source, target in ((folder.config_path, archive.config_path),
                           (folder.metrics_path, archive.metrics_path),
                           (folder.summary_path, archive.summary_path)):
        write_atomic_text(target, source.read_text())


# Where Hydra writes a launch's overrides in the run folder (hydra.output_subdir in
# conf/config.yaml). A run made through the library, not the command, has none.
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"


def run_command(folder: RunFolder) -> str | None:
    """The command that trains the run in ``folder`` alone: ``normbench train`` with the
    overrides of its last launch as Hydra recorded them (a sweep's job: the sweep's fixed
    overrides and the cell's values), or None when Hydra recorded none (or they cannot be read:
    that is said, and the run is archived all the same)."""
    path = folder.path / HYDRA_OVERRIDES
    try:
        overrides = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        log.warning("the command of %s is not recorded: %s cannot be read (%s)", folder.path,
                    path, error)
        return None
    return shlex.join(["normbench", "train", *map(str, overrides or [])])


def record_command(archive: RunFolder, command: str) -> None:
    """Add ``command`` to the archive's command.txt (beside the archived runs), unless it is
    there already: a relaunch of the same cell adds nothing."""
    root = archive.path.parent
    if command in read_sweep_commands(root):
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / COMMAND_FILE, "a") as f:
        f.write(command + "\n")


def commit_archive(archive: RunFolder, message: str) -> bool:
    """``git add`` and ``git commit`` the archive (the folder of all archived runs, so that one
    whose commit failed earlier goes in too), only its paths: other staged work stays staged.
    Returns whether a commit was made; says why not in a warning (the records stay on disk
    either way, and the next finished run's commit takes them along)."""
    if shutil.which("git") is None:
        log.warning("archive_commit: git is not installed; %s is archived but not committed",
                    archive.path)
        return False
    where = archive.path.parent.resolve()
    for attempt in range(GIT_RETRIES):
        add = _git(["add", "--", str(where)], where)
        commit = add if add.returncode else _git(
            ["commit", "--quiet", "--no-verify", "-m", message, "--", str(where)], where)
        if commit.returncode == 0:
            log.info("committed %s", archive.path)
            return True
        output = commit.stdout + commit.stderr
        if "index.lock" not in output:
            break
        time.sleep(0.5 + attempt)  # another job of the sweep is committing
    log.warning("archive_commit: could not commit %s: %s", archive.path, output.strip())
    return False


def _git(args: list[str], where: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                          timeout=120)


__all__ = ["FINISHED", "archive_folder", "archive_run", "archived_summary", "commit_archive",
           "record_command", "run_command"]
