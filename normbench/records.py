"""The run folder: everything one run leaves on disk, written so that a crash loses nothing.

This module is the one owner of that format: it alone opens these files, and the status words
are defined here. Training writes through :class:`RunFolder`; results, the report, the sweep
summary and scripts/evaluate_runs.py read through it (or the functions below, which work on any
folder holding these files, e.g. an archived run without checkpoints).

    <run folder>/
      config.yaml      the resolved config (written once, before training)
      metrics.jsonl    one JSON line per finished epoch, flushed and fsynced as it goes
      summary.json     written at the end: status completed / diverged / failed, errors, speed
      checkpoint.pt    model, optimizer and history after the last finished epoch, and the run
                       key of the config that trained it (a checkpoint names its run)
      checkpoint.prev.pt  the one before it (fallback when the newest is unreadable)
      checkpoint.pt.corrupt  an unreadable newest checkpoint, set aside at the next save
      launches.jsonl   one line per launch: when, by which process, and what it did (trained,
                       resumed, skipped, failed, diverged, interrupted)
      .lock            held while a process trains in this folder

A sweep keeps its own launch records beside its run folders, one file per job, so that its
end-of-sweep summary counts every cell it launched (also one refused because its folder was in
use) and only those (not another sweep's in the same experiment folder):

    <sweep folder>/.sweeps/<sweep launch id>/<job number>.json

In a multi-process run only the first process (rank 0) writes here; the others hold an
:class:`OtherProcessRunFolder`.

Every file except metrics.jsonl and launches.jsonl is replaced atomically (write a temporary file,
fsync, rename), so a kill at any moment leaves the previous version intact; a write that fails
(disk full) raises RecordsError naming the file and also leaves the previous version. The
checkpoint is the source of truth: on resume, metrics.jsonl is rewritten from the history stored
in the checkpoint. Records that cannot be read (damaged by hand, by another tool, by a disk) are
refused with one line naming the file and what is wrong; they are never overwritten silently.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import signal
import socket
import threading
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

log = logging.getLogger(__name__)

# -- the status words --------------------------------------------------------------------------
# What summary.json says about a run ...
COMPLETED = "completed"
DIVERGED = "diverged"    # the loss became NaN or infinite: a result of the protocol, not a crash
FAILED = "failed"
RECORDED_STATUSES = (COMPLETED, DIVERGED, FAILED)
# ... and what a reader says of a run folder without summary.json (running, killed, interrupted)
INCOMPLETE = "incomplete"
STATUSES = (*RECORDED_STATUSES, INCOMPLETE)
FINISHED = (COMPLETED, DIVERGED)  # a run in one of these states is never trained again

# What one launch did in a run folder (launches.jsonl) ...
TRAINED = "trained"
RESUMED = "resumed"
SKIPPED = "skipped"      # already finished
INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM: the checkpoint resumes it
LAUNCH_OUTCOMES = (TRAINED, RESUMED, SKIPPED, DIVERGED, FAILED, INTERRUPTED)
# ... and, in a sweep's records, what became of a job that left no launch record in its folder
REFUSED = "refused"        # the run folder was in use by another launch, or could not be opened
UNREPORTED = "unreported"  # the job started and its process ended without reporting (killed)
SWEEP_OUTCOMES = (*LAUNCH_OUTCOMES, REFUSED, UNREPORTED)
# outcomes the end-of-sweep summary lists with their reasons
PROBLEM_OUTCOMES = (FAILED, DIVERGED, INTERRUPTED, REFUSED, UNREPORTED)

# -- the files ---------------------------------------------------------------------------------
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"
CORRUPT_CHECKPOINT_FILE = "checkpoint.pt.corrupt"
LAUNCHES_FILE = "launches.jsonl"
LOCK_FILE = ".lock"
SWEEP_RECORDS_FOLDER = ".sweeps"
COMMAND_FILE = "command.txt"  # in a sweep's folder: the command of each of its launches
# Files that mark a folder as a run folder even before config.yaml exists.
RUN_MARKERS = (METRICS_FILE, SUMMARY_FILE, LAUNCHES_FILE, "run.log")

# What a checkpoint holds (RUN_KEY_ENTRY: the run key of the config that trained it; checkpoints
# saved before it was recorded lack it and are trusted only beside this run's config.yaml).
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "step", "history", "wandb_id")
RUN_KEY_ENTRY = "run_key"


class RecordsError(RuntimeError):
    """The run folder cannot be used: not writable, locked, or holding unreadable records."""


class NoRunsFound(FileNotFoundError):
    """The experiment folder does not exist or holds no run folder (a mistyped path, usually):
    the commands print it as one line, not a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived during a run (SLURM sends it before killing a job): the run stops as on
    Ctrl-C, its records are those of its last finished epoch and a relaunch resumes it."""


# -- writing -----------------------------------------------------------------------------------
def _fsync_write(path: Path, data: bytes | memoryview, before_rename=None) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, call ``before_rename`` (if
    given), rename it to ``path``. On an OSError (disk full, permissions) the temporary file is
    removed, the old version of ``path`` is intact, and a RecordsError names ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(path, error) from error


def write_error(path: Path, error: OSError) -> RecordsError:
    what = "the disk is full" if error.errno == errno.ENOSPC else "the write failed"
    return RecordsError(f"cannot write {path}: {what} ({error}); the run stopped, its records "
                        f"are those of its last finished epoch. Free space (or fix permissions) "
                        f"and relaunch: the run resumes from its checkpoint")


def write_atomic_text(path: Path, text: str) -> None:
    _fsync_write(path, text.encode())


# -- reading (any folder holding these files: a run folder, an archived run) -------------------
def _read_text(path: Path, remedy: str = "") -> str | None:
    """The file's text, None when it does not exist; RecordsError (ending with ``remedy``, what
    to do about it) when it is not text."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise RecordsError(f"{path} cannot be read: {error}") from None
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise RecordsError(f"{path} is damaged: it is not text (binary data at byte "
                           f"{_first_non_utf8(data)}){remedy}") from None


def _first_non_utf8(data: bytes) -> int:
    try:
        data.decode()
    except UnicodeDecodeError as error:
        return error.start
    return -1


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "empty (null)"}.get(type(value), type(value).__name__)


def read_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The run's config.yaml as a dict, None when the folder has none (yet)."""
    path = Path(folder) / CONFIG_FILE
    remedy = "; restore it or delete the run folder"
    text = _read_text(path, remedy)
    if text is None:
        return None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise RecordsError(f"{path} is damaged: it is not valid YAML{at} "
                           f"({getattr(error, 'problem', None) or error}){remedy}") from None
    if not isinstance(config, dict):
        raise RecordsError(f"{path} is damaged: it holds {_kind(config)}, not a mapping of "
                           f"config keys{remedy}")
    return config


def read_summary(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The run's summary.json, None while the run is unfinished (no summary yet)."""
    path = Path(folder) / SUMMARY_FILE
    move_away = "move it away to let the run resume from its checkpoint"
    text = _read_text(path, f"; {move_away}")
    if text is None:
        return None
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordsError(f"{path} is not valid JSON ({error}); {move_away}") from None
    if not isinstance(summary, dict):
        raise RecordsError(f"{path} is damaged: it holds {_kind(summary)}, not a JSON object "
                           f"with a status; {move_away}")
    if summary.get("status") not in RECORDED_STATUSES:
        found = f"status {summary['status']!r}" if "status" in summary else "no status"
        raise RecordsError(f"{path} is damaged: it has {found} (expected one of "
                           f"{', '.join(RECORDED_STATUSES)}); {move_away}")
    return summary


def read_metrics(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch records of a run, one dict per epoch, in epoch order.

    A truncated last line (the run was killed while writing it) is dropped with a warning; a
    bad line anywhere else means the file is damaged. When a resumed run wrote an epoch twice
    (before metrics.jsonl was rewritten from the checkpoint), the later record wins."""
    path = Path(folder) / METRICS_FILE
    text = _read_text(path)
    if text is None:
        return []
    lines = [line for line in text.splitlines() if line.strip()]
    records: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                warnings.warn(f"{path}: ignoring truncated last line {number}: {line[:80]!r}")
                continue
            raise RecordsError(f"{path} is damaged: line {number} is not valid JSON "
                               f"({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise RecordsError(f"{path} is damaged: line {number} is not an epoch's record "
                               f"(a JSON object with an integer 'epoch')")
        records[record["epoch"]] = record
    return [records[epoch] for epoch in sorted(records)]


def read_launches(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The run folder's launch records, oldest first. A line cut short by a kill is skipped:
    a launch killed while recording itself has nothing else to say."""
    text = _read_text(Path(folder) / LAUNCHES_FILE) or ""
    launches = []
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("started"), (int, float)):
                launches.append(record)
    return launches


def last_launch(folder: str | os.PathLike) -> dict[str, Any] | None:
    launches = read_launches(folder)
    return launches[-1] if launches else None


def last_written(folder: str | os.PathLike) -> float | None:
    """When the run last wrote an epoch or its summary (seconds since the epoch), or None."""
    times = [path.stat().st_mtime for path in (Path(folder) / METRICS_FILE,
                                               Path(folder) / SUMMARY_FILE) if path.exists()]
    return max(times) if times else None


def _is_inside_hidden_or_wandb(path: Path, root: Path) -> bool:
    """True under .hydra/ and the like, or wandb/: their config.yaml files are not runs."""
    return any(part.startswith(".") or part == "wandb" for part in path.relative_to(root).parts)


def find_run_dirs(experiment_dir: str | os.PathLike) -> list[Path]:
    """The run folders (those holding a config.yaml) under an experiment folder, sorted.

    Hidden folders and wandb/ are skipped: Hydra keeps a `.hydra/config.yaml` and W&B a
    `files/config.yaml` inside each run folder. A folder that looks like a run (it has a log or
    records) but has no config.yaml cannot be placed in the grid: it is named in a warning.
    """
    root = Path(experiment_dir)
    if not root.is_dir():
        raise NoRunsFound(f"experiment folder {str(root)!r} does not exist")
    run_dirs = sorted(path.parent for path in root.rglob(CONFIG_FILE)
                      if not _is_inside_hidden_or_wandb(path.parent, root))
    without_config = sorted(
        {path.parent for marker in RUN_MARKERS for path in root.rglob(marker)
         if not _is_inside_hidden_or_wandb(path.parent, root)} - set(run_dirs))
    for folder in without_config:
        warnings.warn(f"{folder} looks like a run folder but has no {CONFIG_FILE}; it is left out "
                      f"(see its run.log)")
    return run_dirs


def failure_summary(error: BaseException) -> dict[str, Any]:
    """The summary of a run that failed with ``error`` (call it while handling the error)."""
    return {"status": FAILED, "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc()}


# -- locks -------------------------------------------------------------------------------------
# Run folders whose lock this process took before opening them (claim_run_folder), by path.
_claimed: dict[Path, Any] = {}


def _take_lock(path: Path):
    """The open, locked .lock file of the run folder ``path`` (created if needed); RecordsError
    when the folder cannot be written or another process holds the lock."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
        lock_file = open(path / LOCK_FILE, "a+")
    except OSError as error:
        raise RecordsError(f"run folder {path} cannot be written: {error}") from None
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise RecordsError(f"run folder {path} is in use by another process (its .lock is "
                           f"held); wait for that run or choose another folder") from None
    return lock_file


def folder_in_use(path: str | os.PathLike) -> bool:
    """Whether another process holds the run folder's lock now (a run training in it), found
    without writing anything: the lock is tried and let go at once, and no .lock is created."""
    try:
        lock_file = open(Path(path) / LOCK_FILE)
    except OSError:  # no lock file: no run has opened the folder
        return False
    with lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock_file, fcntl.LOCK_UN)
        return False


def claim_run_folder(path: str | os.PathLike) -> bool:
    """Take the run folder's lock now, for the :class:`RunFolder` this process opens next on
    it; False (and nothing written) when another process holds it or it cannot be written.

    For launchers that write into the folder before the run opens it (Hydra writes .hydra/ and
    run.log): they write only when this returns True, so a refused second launch changes
    nothing in the folder of the launch that holds it."""
    path = Path(path).resolve()
    if path in _claimed:
        return True
    try:
        _claimed[path] = _take_lock(path)
    except RecordsError:
        return False
    return True


def release_claim(path: str | os.PathLike) -> None:
    """Release a claim that no :class:`RunFolder` took over (the run never opened the folder)."""
    lock_file = _claimed.pop(Path(path).resolve(), None)
    if lock_file is not None:
        lock_file.close()  # closing the file releases its lock


def is_in_use(path: str | os.PathLike) -> bool:
    """Whether another process holds the run folder's lock now (creates and changes nothing)."""
    try:
        fd = os.open(Path(path) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the shared lock taken just to look


# -- SIGTERM -----------------------------------------------------------------------------------
def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"stopped by {signal.Signals(signum).name}; relaunch to resume from the "
                     f"last checkpoint")


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While inside: SIGTERM raises :class:`Terminated` (a KeyboardInterrupt), so a run stops as
    on Ctrl-C, at a point where its records are consistent (every write is atomic). Outside the
    main thread (where Python cannot handle signals) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- the run folder ----------------------------------------------------------------------------
class RunFolder:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.config_path = self.path / CONFIG_FILE
        self.metrics_path = self.path / METRICS_FILE
        self.summary_path = self.path / SUMMARY_FILE
        self.checkpoint_path = self.path / CHECKPOINT_FILE
        self.previous_checkpoint_path = self.path / PREVIOUS_CHECKPOINT_FILE
        self.launches_path = self.path / LAUNCHES_FILE
        self._lock_file = None
        self._unreadable: set[Path] = set()  # checkpoints that load_checkpoint could not read

    # -- set-up ------------------------------------------------------------------------------
    def open(self) -> None:
        """Create the folder, prove it writable and take its lock, before any training (or
        take over the lock :func:`claim_run_folder` took for it in this process)."""
        claimed = _claimed.pop(self.path.resolve(), None)
        self._lock_file = claimed if claimed is not None else _take_lock(self.path)

    def close(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # -- config and summary ------------------------------------------------------------------
    def read_config(self) -> dict[str, Any] | None:
        return read_config(self.path)

    def write_config(self, config: Mapping[str, Any]) -> None:
        write_atomic_text(self.config_path, yaml.safe_dump(dict(config), sort_keys=False))

    def read_summary(self) -> dict[str, Any] | None:
        return read_summary(self.path)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        if summary.get("status") not in RECORDED_STATUSES:
            raise ValueError(f"a summary's status must be one of {RECORDED_STATUSES}, "
                             f"got {summary.get('status')!r}")
        write_atomic_text(self.summary_path, json.dumps(dict(summary), indent=2) + "\n")

    def record_failure(self, summary: Mapping[str, Any]) -> None:
        """Write the summary of a failed launch, best effort: it runs while an error is on its
        way out, which it must not hide (on a full disk this write fails too). A summary that
        says the run finished, or one that cannot be read, is left as it is: a launch that
        failed before training must not overwrite a result, nor damaged records."""
        try:
            previous = self.read_summary()
        except RecordsError as error:
            log.warning("%s left as it is: %s", self.summary_path, error)
            return
        if previous is not None and previous["status"] in FINISHED:
            log.warning("%s left as it is: it says %s", self.summary_path, previous["status"])
            return
        try:
            self.write_summary(summary)
        except RecordsError as error:
            log.warning("could not record the failure in %s: %s", self.summary_path,
                        error.__cause__ or error)

    # -- metrics -----------------------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(dict(record)) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as error:
            raise write_error(self.metrics_path, error) from error

    def rewrite_metrics(self, history: list[Mapping[str, Any]]) -> None:
        write_atomic_text(self.metrics_path, "".join(json.dumps(dict(r)) + "\n" for r in history))

    # -- launches ----------------------------------------------------------------------------
    def record_launch(self, outcome: str, started: float) -> None:
        """Append what this launch did (``started`` is its start time, seconds since the epoch),
        with the host and process that did it (how a sweep finds its own job's launch).

        Best effort: it runs as a run ends, also on a full disk, where it must not hide the run's
        own error. A last line cut short by a kill is ended first, so it cannot swallow this one."""
        line = json.dumps({"started": started, "outcome": outcome, "host": socket.gethostname(),
                           "pid": os.getpid()}) + "\n"
        try:
            with open(self.launches_path, "a+b") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        line = "\n" + line
                f.write(line.encode())
        except OSError as error:
            log.warning("could not record this launch in %s: %s", self.launches_path, error)

    def read_launches(self) -> list[dict[str, Any]]:
        return read_launches(self.path)

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Write checkpoint.pt; the one it replaces becomes checkpoint.prev.pt, except one that
        :meth:`load_checkpoint` found unreadable: that is kept as checkpoint.pt.corrupt, so it
        never replaces the good previous checkpoint.

        The state is serialized in memory first, so that writing it is a plain file write whose
        failure (disk full) is an OSError like any other record's; torch.save writing to the
        file itself reports a full disk as a RuntimeError from its zip writer."""
        missing = [key for key in CHECKPOINT_KEYS if key not in state]
        if missing:
            raise ValueError(f"a checkpoint needs {', '.join(missing)}")
        import torch  # here: the readers of records (results, report) do not need torch

        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        _fsync_write(self.checkpoint_path, buffer.getbuffer(), self._rotate_checkpoints)

    def _rotate_checkpoints(self) -> None:
        if self.checkpoint_path in self._unreadable:
            os.replace(self.checkpoint_path, self.path / CORRUPT_CHECKPOINT_FILE)
            self._unreadable.discard(self.checkpoint_path)
        elif self.checkpoint_path.exists():
            os.replace(self.checkpoint_path, self.previous_checkpoint_path)

    def check_resumable(self) -> None:
        """RecordsError when metrics.jsonl holds finished epochs but no checkpoint is left: the
        run can neither resume nor start over without overwriting its records."""
        has_checkpoint = self.checkpoint_path.exists() or self.previous_checkpoint_path.exists()
        if not has_checkpoint and (_read_text(self.metrics_path) or "").strip():
            raise RecordsError(f"{self.metrics_path} holds finished epochs but the run folder has "
                               f"no checkpoint ({CHECKPOINT_FILE}, {PREVIOUS_CHECKPOINT_FILE}) to "
                               f"resume from; delete the run folder to start this run over")

    def load_checkpoint(self, run_key: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The newest readable checkpoint, or None when the run has none yet.

        An unreadable newest checkpoint (or one missing entries) is reported by path and the
        previous one is used; if checkpoints exist but none can be read, or metrics.jsonl holds
        epochs but no checkpoint is left, the run refuses rather than start over and overwrite
        its records. With ``run_key``, a checkpoint saved by a run of another config is refused
        (a folder reused after its config.yaml was deleted)."""
        self.check_resumable()
        candidates = [p for p in (self.checkpoint_path, self.previous_checkpoint_path)
                      if p.exists()]
        problems = []
        for path in candidates:
            try:
                state = self._read_checkpoint(path)
            except RecordsError as error:
                self._unreadable.add(path)
                problems.append(str(error))
                log.warning("%s%s", error,
                            "; trying the previous one" if path != candidates[-1] else "")
                continue
            if run_key is not None:
                self._check_run_key(path, state, run_key)
            return state
        if problems:
            raise RecordsError(f"no readable checkpoint in the run folder: {'; '.join(problems)}; "
                               f"delete the run folder to start this run over")
        return None

    def checkpoint_run_key(self) -> dict[str, Any] | None:
        """The run key stored in the newest readable checkpoint; None when the folder has no
        checkpoint. RecordsError when it has one that does not say which config trained it."""
        state = self.load_checkpoint()
        if state is None:
            return None
        if RUN_KEY_ENTRY not in state:
            raise RecordsError(f"run folder {self.path} has a checkpoint but no {CONFIG_FILE}, "
                               f"and the checkpoint does not say which config trained it (saved "
                               f"by an older normbench); restore {CONFIG_FILE} or delete the run "
                               f"folder")
        return state[RUN_KEY_ENTRY]

    @staticmethod
    def _read_checkpoint(path: Path) -> dict[str, Any]:
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated zip, bad pickle, ...: all mean "unreadable"
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise RecordsError(f"checkpoint {path} is unreadable ({type(error).__name__}: "
                               f"{first_line})") from None
        if not isinstance(state, dict):
            raise RecordsError(f"checkpoint {path} is damaged: it holds {_kind(state)}, not a "
                               f"checkpoint's entries")
        missing = [key for key in CHECKPOINT_KEYS if key not in state]
        if missing:
            raise RecordsError(f"checkpoint {path} is damaged: it lacks {', '.join(missing)}")
        return state

    @staticmethod
    def _check_run_key(path: Path, state: Mapping[str, Any], run_key: Mapping[str, Any]) -> None:
        stored = state.get(RUN_KEY_ENTRY)
        if stored is None:
            return  # saved before checkpoints named their run: config.yaml vouches for it
        differences = differing_keys(stored, run_key)
        if differences:
            raise RecordsError(f"checkpoint {path} was saved by a run of another config (keys: "
                               f"{', '.join(differences)}); this run folder holds another run: "
                               f"choose another folder")


def differing_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two nested mappings. A key that one side lacks
    counts as None there: a config key added after a run was recorded, whose default (None)
    changes nothing, does not make that run another config's."""
    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, Mapping):
            out: dict[str, Any] = {}
            for k, v in node.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: node}
    a, b = flat(old), flat(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


class OtherProcessRunFolder(RunFolder):
    """The run folder as the other processes of a multi-process run hold it (rank > 0): the
    first process alone takes the lock and writes the records, so every write here does
    nothing. Reads are not needed: the first process's decisions and checkpoint reach the
    others through :func:`normbench.distributed.first_process_decides`."""

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def write_config(self, config: Mapping[str, Any]) -> None:
        pass

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        pass

    def record_failure(self, summary: Mapping[str, Any]) -> None:
        pass

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        pass

    def rewrite_metrics(self, history: list[Mapping[str, Any]]) -> None:
        pass

    def record_launch(self, outcome: str, started: float) -> None:
        pass

    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        pass


# -- a sweep's own launch records --------------------------------------------------------------
def record_sweep_command(sweep_dir: str | os.PathLike, command: str) -> None:
    """Append the command of a sweep's launch to its command.txt."""
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(sweep_dir) / COMMAND_FILE, "a") as f:
        f.write(command + "\n")


def read_sweep_commands(sweep_dir: str | os.PathLike) -> list[str]:
    """The commands of a sweep folder's launches, oldest first."""
    text = _read_text(Path(sweep_dir) / COMMAND_FILE) or ""
    return [line for line in text.strip().splitlines() if line.strip()]


def sweep_records_folder(sweep_dir: str | os.PathLike, sweep_id: str) -> Path:
    """Where the jobs of the sweep launch ``sweep_id`` record what they did."""
    return Path(sweep_dir) / SWEEP_RECORDS_FOLDER / sweep_id


def launch_of_process(run_dir: str | os.PathLike, since: float, pid: int,
                      host: str) -> dict[str, Any] | None:
    """The last launch record in ``run_dir`` made by process ``pid`` on ``host`` at or after
    ``since``: what one job of a sweep did there. None when that job left none (refused)."""
    for record in reversed(read_launches(run_dir)):
        if (record.get("pid") == pid and record.get("host") == host
                and record["started"] >= since):
            return record
    return None


def record_sweep_job(records_folder: Path, job: int, run_dir: str | os.PathLike,
                     outcome: str, detail: str | None = None) -> None:
    """Write (or replace) what job number ``job`` of a sweep did: UNREPORTED when it starts,
    its outcome when it ends (``detail``: why, where its run folder cannot say). Best effort: a
    sweep's records must not fail its runs."""
    if outcome not in SWEEP_OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; one of {SWEEP_OUTCOMES}")
    record = {"job": job, "run_dir": str(run_dir), "outcome": outcome, "detail": detail}
    try:
        records_folder.mkdir(parents=True, exist_ok=True)
        write_atomic_text(records_folder / f"{job}.json", json.dumps(record))
    except (OSError, RecordsError) as error:
        log.warning("could not record job %d of the sweep in %s: %s", job, records_folder, error)


def read_sweep_jobs(records_folder: Path) -> list[dict[str, Any]]:
    """The jobs of one sweep launch, by job number."""
    jobs = []
    for path in records_folder.glob("*.json") if records_folder.is_dir() else []:
        with contextlib.suppress(json.JSONDecodeError, RecordsError):
            record = json.loads(_read_text(path) or "")
            if isinstance(record, dict) and record.get("outcome") in SWEEP_OUTCOMES:
                jobs.append(record)
    return sorted(jobs, key=lambda record: record.get("job", 0))
