"""How many DataLoader worker processes `num_workers: auto` means for this process.

auto = the CPUs this process may use, divided by the processes on the node that share them,
minus one for the main process (which runs the training step), and at least 0:

- the CPUs this process may use: its affinity mask (``os.sched_getaffinity``: what SLURM, a
  container or taskset gave it), capped by ``SLURM_CPUS_PER_TASK`` where SLURM sets it (a SLURM
  task's own CPUs, even where the mask shows the whole node);
- the processes sharing them: ``LOCAL_WORLD_SIZE``, the processes torchrun started on this node
  (each sees the same CPUs); 1 otherwise, also under srun, where each task is one process with
  its own ``SLURM_CPUS_PER_TASK`` CPUs.

Only image folders with ``preset: imagenet`` use DataLoader workers; the other data sets are
held on the device and use none (the run's summary records the number used).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .base import DatasetError

AUTO = "auto"


def available_cpus(environ: Mapping[str, str] | None = None) -> int:
    """The CPUs this process may run on: its affinity mask, capped by SLURM_CPUS_PER_TASK."""
    environ = os.environ if environ is None else environ
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:  # macOS, Windows: no affinity masks
        cpus = os.cpu_count() or 1
    slurm = environ.get("SLURM_CPUS_PER_TASK")
    if slurm:
        cpus = min(cpus, _positive_int("SLURM_CPUS_PER_TASK", slurm))
    return cpus


def processes_on_node(environ: Mapping[str, str] | None = None) -> int:
    """The processes of this run that share this process's CPUs (torchrun's LOCAL_WORLD_SIZE)."""
    environ = os.environ if environ is None else environ
    value = environ.get("LOCAL_WORLD_SIZE")
    return _positive_int("LOCAL_WORLD_SIZE", value) if value else 1


def auto_num_workers(environ: Mapping[str, str] | None = None) -> int:
    """`num_workers: auto` here: CPUs per process on this node, minus the main process, >= 0."""
    return max(available_cpus(environ) // processes_on_node(environ) - 1, 0)


def resolve_num_workers(value: int | str, environ: Mapping[str, str] | None = None) -> int:
    """The config's `num_workers` (auto or an integer >= 0) as a number of processes."""
    if value == AUTO:
        return auto_num_workers(environ)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DatasetError(
            f"num_workers={value!r} is not allowed; choose auto (CPUs per process on this "
            "node minus one) or an integer >= 0"
        )
    return value


def _positive_int(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise DatasetError(f"environment variable {name}={text!r} is not a positive integer")
    return value
