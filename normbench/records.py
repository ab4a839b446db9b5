"""The run folder: everything one run leaves on disk, written so that a crash loses nothing.

    <run folder>/
      config.yaml      the resolved config (written once, before training)
      metrics.jsonl    one JSON line per finished epoch, flushed and fsynced as it goes
      summary.json     written at the end: status completed / diverged / failed, errors, speed
      checkpoint.pt    model, optimizer and history after the last finished epoch
      checkpoint.prev.pt  the one before it (fallback when the newest is unreadable)
      launches.jsonl   one line per launch: when, and what it did (trained, resumed, skipped,
                       failed, diverged), read by the end-of-sweep status summary
      .lock            held while a process trains in this folder

Every file except metrics.jsonl is replaced atomically (write a temporary file, fsync, rename),
so a kill at any moment leaves the previous version intact. The checkpoint is the source of
truth: on resume, metrics.jsonl is rewritten from the history stored in the checkpoint.
"""

from __future__ import annotations

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
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(dict(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite_metrics(self, history: list[Mapping[str, Any]]) -> None:
        write_atomic_text(self.metrics_path, "".join(json.dumps(dict(r)) + "\n" for r in history))

    def record_launch(self, outcome: str, started: float) -> None:
        """Append what this launch did (``started`` is its start time, seconds since the epoch)."""
        with open(self.launches_path, "a") as f:
            f.write(json.dumps({"started": started, "outcome": outcome}) + "\n")

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        tmp = self.path / ".checkpoint.pt.tmp"
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        if self.checkpoint_path.exists():
            os.replace(self.checkpoint_path, self.previous_checkpoint_path)
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The newest readable checkpoint, or None when the run has none yet.

        An unreadable newest checkpoint is reported by path and the previous one is used; if
        checkpoints exist but none can be read, the run refuses rather than start over and
        overwrite its records."""
        candidates = [p for p in (self.checkpoint_path, self.previous_checkpoint_path)
                      if p.exists()]
        problems = []
        for path in candidates:
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # truncated zip, bad pickle, ...: all mean "unreadable"
                problems.append(f"{path}: {type(error).__name__}: {error}")
                log.warning("checkpoint %s is unreadable (%s); trying the previous one",
                            path, error)
        if problems:
            raise RecordsError("no readable checkpoint in the run folder:\n  "
                               + "\n  ".join(problems)
                               + "\nDelete the run folder to start this run over.")
        return None
