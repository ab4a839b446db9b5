"""The run folder: everything one run leaves on disk, written so that a crash loses nothing.

    <run folder>/
      config.yaml      the resolved config (written once, before training)
      metrics.jsonl    one JSON line per finished epoch, flushed and fsynced as it goes
      summary.json     written at the end: status completed / diverged / failed, errors, speed
      checkpoint.pt    model, optimizer and history after the last finished epoch
      checkpoint.prev.pt  the one before it (fallback when the newest is unreadable)
      checkpoint.pt.corrupt  an unreadable newest checkpoint, set aside at the next save
      launches.jsonl   one line per launch: when, and what it did (trained, resumed, skipped,
                       failed, diverged), read by the end-of-sweep status summary
      .lock            held while a process trains in this folder

In a multi-process run only the first process (rank 0) writes here; the others hold an
:class:`OtherProcessRunFolder`.

Every file except metrics.jsonl is replaced atomically (write a temporary file, fsync, rename),
so a kill at any moment leaves the previous version intact; a write that fails (disk full)
raises RecordsError naming the file and also leaves the previous version. The checkpoint is the
source of truth: on resume, metrics.jsonl is rewritten from the history stored in the checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

log = logging.getLogger(__name__)


class RecordsError(RuntimeError):
    """The run folder cannot be used: not writable, locked, or holding unreadable records."""


def _fsync_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:  # disk full, permissions: the old version of `path` is intact
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(path, error) from error


def write_error(path: Path, error: OSError) -> RecordsError:
    return RecordsError(f"cannot write {path}: {error}; the run stopped, its records are those "
                        f"of its last finished epoch. Free space (or fix permissions) and "
                        f"relaunch: the run resumes from its checkpoint")


def write_atomic_text(path: Path, text: str) -> None:
    _fsync_write(path, lambda f: f.write(text.encode()))


class RunFolder:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self.checkpoint_path = self.path / "checkpoint.pt"
        self.previous_checkpoint_path = self.path / "checkpoint.prev.pt"
        self.launches_path = self.path / "launches.jsonl"
        self._lock_file = None
        self._unreadable: set[Path] = set()  # checkpoints that load_checkpoint could not read

    # -- set-up ------------------------------------------------------------------------------
    def open(self) -> None:
        """Create the folder, prove it writable and take its lock, before any training."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_bytes(b"ok")
            probe.unlink()
            self._lock_file = open(self.path / ".lock", "a+")
        except OSError as error:
            raise RecordsError(f"run folder {self.path} cannot be written: {error}") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise RecordsError(f"run folder {self.path} is in use by another process (its .lock "
                               f"is held); wait for that run or choose another folder") from None

    def close(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # -- config and summary ------------------------------------------------------------------
    def read_config(self) -> dict[str, Any] | None:
        if not self.config_path.exists():
            return None
        return yaml.safe_load(self.config_path.read_text())

    def write_config(self, config: Mapping[str, Any]) -> None:
        write_atomic_text(self.config_path, yaml.safe_dump(dict(config), sort_keys=False))

    def read_summary(self) -> dict[str, Any] | None:
        if not self.summary_path.exists():
            return None
        try:
            return json.loads(self.summary_path.read_text())
        except json.JSONDecodeError as error:
            raise RecordsError(f"{self.summary_path} is not valid JSON ({error}); move it away "
                               f"to let the run resume from its checkpoint") from None

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_atomic_text(self.summary_path, json.dumps(dict(summary), indent=2) + "\n")

    # -- metrics -----------------------------------------------------------------------------
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

    def record_launch(self, outcome: str, started: float) -> None:
        """Append what this launch did (``started`` is its start time, seconds since the epoch).

        Best effort: it runs as a run ends, also on a full disk, where it must not hide the run's
        own error. A last line cut short by a kill is ended first, so it cannot swallow this one."""
        line = json.dumps({"started": started, "outcome": outcome}) + "\n"
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

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Write checkpoint.pt; the one it replaces becomes checkpoint.prev.pt, except one that
        :meth:`load_checkpoint` found unreadable: that is kept as checkpoint.pt.corrupt, so it
        never replaces the good previous checkpoint."""
        tmp = self.path / ".checkpoint.pt.tmp"
        try:
            with open(tmp, "wb") as f:
                torch.save(dict(state), f)
                f.flush()
                os.fsync(f.fileno())
            if self.checkpoint_path in self._unreadable:
                os.replace(self.checkpoint_path, self.path / "checkpoint.pt.corrupt")
                self._unreadable.discard(self.checkpoint_path)
            elif self.checkpoint_path.exists():
                os.replace(self.checkpoint_path, self.previous_checkpoint_path)
            os.replace(tmp, self.checkpoint_path)
        except OSError as error:  # disk full, permissions: the last checkpoint is intact
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise write_error(self.checkpoint_path, error) from error

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The newest readable checkpoint, or None when the run has none yet.

        An unreadable newest checkpoint is reported by path and the previous one is used; if
        checkpoints exist but none can be read, or metrics.jsonl holds epochs but no checkpoint
        is left, the run refuses rather than start over and overwrite its records."""
        candidates = [p for p in (self.checkpoint_path, self.previous_checkpoint_path)
                      if p.exists()]
        if not candidates and self.metrics_path.exists() and self.metrics_path.read_text().strip():
            raise RecordsError(f"{self.metrics_path} holds finished epochs but the run folder has "
                               f"no checkpoint ({self.checkpoint_path.name}, "
                               f"{self.previous_checkpoint_path.name}) to resume from; delete the "
                               f"run folder to start this run over")
        problems = []
        for path in candidates:
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # truncated zip, bad pickle, ...: all mean "unreadable"
                self._unreadable.add(path)
                problems.append(f"{path}: {type(error).__name__}: {error}")
                log.warning("checkpoint %s is unreadable (%s)%s", path, error,
                            "; trying the previous one" if path != candidates[-1] else "")
        if problems:
            raise RecordsError("no readable checkpoint in the run folder:\n  "
                               + "\n  ".join(problems)
                               + "\nDelete the run folder to start this run over.")
        return None


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

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        pass

    def rewrite_metrics(self, history: list[Mapping[str, Any]]) -> None:
        pass

    def record_launch(self, outcome: str, started: float) -> None:
        pass

    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        pass
