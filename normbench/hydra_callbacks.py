"""Hydra's edge of the run folder (nothing else in normbench imports this).

:class:`SweepSummary` writes the sweep's command to ``<sweep dir>/command.txt`` when a multirun
starts and prints a one-screen status summary when it ends: how many of the cells it launched
were trained, resumed, skipped (already finished), failed, diverged, interrupted or refused (their
folder was in use by another launch), with the reasons. Each job records what it did in the
sweep's own records (:func:`normbench.records.record_sweep_job`), from the process that ran it,
so the summary works the same with every launcher (local, joblib, SLURM through submitit),
counts every cell it launched, and never another sweep's runs in the same experiment folder.

A job that runs in a child process of the sweep's launcher (hydra/launcher=local, joblib) stops,
as on SIGTERM (its checkpoint stays), when the launcher dies: a sweep killed with -9 leaves no
workers training on, holding the next cell's folder.

:func:`if_run_folder_held` is the resolver that keeps Hydra's own files (``.hydra/``, run.log)
out of a run folder that another launch holds (conf/config.yaml).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from . import records
from .distributed import launch_rank

log = logging.getLogger(__name__)

LAUNCHER_POLL_SECONDS = 1.0
# After the launcher died: how long a job may take to stop at its next step (and record that it
# was interrupted) before its process is ended outright.
STOP_GRACE_SECONDS = 60.0


def if_run_folder_held(value: Any, otherwise: Any = None, *, _root_: DictConfig) -> Any:
    """``value`` in the process that writes the job's run folder (``hydra.runtime.output_dir``):
    the first process of a launch, once it holds the folder's lock, which it takes now (the run
    opening the folder next takes it over). ``otherwise`` in the other processes of a
    multi-process launch, and in a launch refused because another holds the folder: then Hydra
    writes neither .hydra/ nor run.log there, and the run says why on the console."""
    if launch_rank() != 0:
        return otherwise
    return value if records.claim_run_folder(_root_.hydra.runtime.output_dir) else otherwise


def failure_reason(run_dir: Path) -> str:
    try:
        summary = records.read_summary(run_dir)
    except records.RecordsError as error:
        return str(error)
    if summary is None:
        return f"no {records.SUMMARY_FILE} (see the run's log)"
    return summary.get("error") or summary["status"]


# Outcomes that make the sweep's exit status 1 (after every cell has had its turn): a run that
# failed or whose process ended without reporting. Diverged is a result, not a failure; refused
# means another launch holds the run; interrupted sweeps exit on the signal already.
FAILING_OUTCOMES = (records.FAILED, records.UNREPORTED)


def sweep_jobs(sweep_dir: Path, sweep_id: str) -> list[dict[str, Any]]:
    return records.read_sweep_jobs(records.sweep_records_folder(sweep_dir, sweep_id))


def format_sweep_summary(jobs: list[dict[str, Any]], sweep_dir: Path) -> str:
    counts = Counter(job["outcome"] for job in jobs)
    lines = [f"sweep {sweep_dir}: {len(jobs)} runs in this launch",
             "  " + "  ".join(f"{name} {counts.get(name, 0)}" for name in records.SWEEP_OUTCOMES)]
    for job in jobs:
        if job["outcome"] in records.PROBLEM_OUTCOMES:
            run_dir = Path(job["run_dir"])
            reason = job.get("detail") or failure_reason(run_dir)
            lines.append(f"  {job['outcome']:>11}: {run_dir.name}: {reason}")
    return "\n".join(lines)


class _LauncherWatch:
    """In a job running in a child process of the sweep's launcher: when the launcher dies
    (this process is handed to another parent), SIGTERM this process, which stops the run as on
    Ctrl-C (:func:`normbench.records.sigterm_interrupts`), then end it if it has not stopped."""

    def __init__(self, launcher_pid: int) -> None:
        self.launcher_pid = launcher_pid
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="launcher-watch", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stopped.wait(LAUNCHER_POLL_SECONDS):
            if os.getppid() != self.launcher_pid:
                log.error("the sweep's launcher (process %d) is gone: stopping this run; "
                          "relaunch the sweep to resume it", self.launcher_pid)
                os.kill(os.getpid(), signal.SIGTERM)
                if not self.stopped.wait(STOP_GRACE_SECONDS):
                    os._exit(143)  # 128 + SIGTERM, as if the signal had ended it
                return

    def stop(self) -> None:
        self.stopped.set()


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Runs in the launching process; these attributes travel with the callback to the
        # jobs' processes (Hydra pickles it for joblib and submitit).
        self.started = time.time()
        self.launcher_pid = os.getpid()
        self.sweep_id = (f"{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-"
                         f"{self.launcher_pid}")
        from normbench.hydra_main import typed_command  # the sweep's own entry point

        records.record_sweep_command(config.hydra.sweep.dir, typed_command())

    def _job_records(self, config: DictConfig) -> tuple[Path, int, Path] | None:
        """(the sweep's records folder, job number, run folder), or None outside a sweep and in
        the other processes of a multi-process job (the first records for all)."""
        if not hasattr(self, "sweep_id") or launch_rank() != 0:
            return None
        return (records.sweep_records_folder(config.hydra.sweep.dir, self.sweep_id),
                int(config.hydra.job.num), Path(config.hydra.runtime.output_dir))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        job = self._job_records(config)
        if job is None:
            return
        self.job_started = time.time()
        records.record_sweep_job(*job, records.UNREPORTED)
        in_child = os.getpid() != self.launcher_pid and os.getppid() == self.launcher_pid
        self.watch = _LauncherWatch(self.launcher_pid) if in_child else None

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        job = self._job_records(config)
        if job is None:
            return
        if getattr(self, "watch", None) is not None:
            self.watch.stop()
        folder, number, run_dir = job
        records.release_claim(run_dir)  # a claim the run did not take over (it never started)
        launch = records.launch_of_process(run_dir, self.job_started, os.getpid(),
                                           socket.gethostname())
        if launch is not None:
            records.record_sweep_job(folder, number, run_dir, launch["outcome"])
            return
        detail = ("its run folder is in use by another process; nothing in it was changed"
                  if records.is_in_use(run_dir) else
                  "the run did not start (its folder could not be opened; see the console)")
        records.record_sweep_job(folder, number, run_dir, records.REFUSED, detail=detail)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not hasattr(self, "sweep_id"):
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sweep_jobs(sweep_dir, self.sweep_id)
        print(format_sweep_summary(jobs, sweep_dir), flush=True)
        failing = sum(job["outcome"] in FAILING_OUTCOMES for job in jobs)
        if failing:
            # Every cell had its turn; the exit status tells scripts (make, CI, a job chain)
            # that the sweep's results are incomplete.
            print(f"sweep {sweep_dir}: {failing} of {len(jobs)} runs failed (listed above); "
                  f"exit status 1", flush=True)
            sys.exit(1)
