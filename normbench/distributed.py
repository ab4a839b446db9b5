"""Several processes: torchrun or SLURM (through submitit), DistributedDataParallel, and the few
collective operations the training loop needs. Importable without Hydra; with one process every
function here is a no-op or returns its input, so the single-process path is untouched.

The protocol does not depend on the number of processes N. ``workers`` stays the total number of
workers of an SGD step: each process runs ``workers / N`` virtual workers on its
``batch * workers / N`` images (:func:`normbench.data.build_loaders` shards every step), takes
the mean loss over them, and DDP averages the gradients, so a step is the single-process step
with ``workers`` virtual workers. BN statistics stay per worker (``broadcast_buffers=False``);
``norm=syncbn`` synchronizes them through its own differentiable all-gather of each process's
count, mean and M2, merged as Chan et al. (:class:`normbench.norms.SyncBatchNorm2d`).

Running statistics: each process keeps the moving averages of its own workers. Before every
evaluation (and so before every checkpoint) :func:`average_running_statistics` replaces them on
every process by their average over the processes. The moving average is linear and all
processes start from the same values, so this is exactly the single-process rule (the average of
the ``workers`` running estimates), and every process evaluates with the same statistics.

Who does what: the first process (rank 0) keeps the records (run folder, lock, checkpoint, W&B,
progress output); decisions it takes from the folder (skip, resume, refuse) reach the others
through :func:`first_process_decides`.
"""

from __future__ import annotations

import atexit
import hashlib
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, RunConfig
from .norms import norm_layers

T = TypeVar("T")

# Devices a multi-process run accepts: each process takes its own GPU (cuda:LOCAL_RANK), so a
# config cannot name one.
MULTI_PROCESS_DEVICES = ("auto", "cuda", "cpu")


@dataclass(frozen=True)
class Launch:
    """This process's place in a multi-process launch."""

    rank: int  # 0 .. world_size - 1 over all nodes
    world_size: int  # processes in the launch
    local_rank: int  # index on this node: the GPU this process uses
    master_addr: str  # host of rank 0, where the process group meets
    master_port: int
    launcher: str  # torchrun | submitit


# ---- the launch -------------------------------------------------------------------------------
def launch_from_environment(environ: Mapping[str, str] | None = None) -> Launch | None:
    """This process's launch, from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) or from a submitit job with several tasks (SLURM_PROCID,
    SLURM_NTASKS, ... through submitit's JobEnvironment); None for a single process.

    Plain SLURM variables alone do not count: an interactive allocation or a batch script has
    them in a single process, which would then wait for processes that never come."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        launch = Launch(rank=int(environ["RANK"]), world_size=int(environ["WORLD_SIZE"]),
                        local_rank=int(environ.get("LOCAL_RANK", 0)),
                        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                        master_port=int(environ.get("MASTER_PORT", 29500)), launcher="torchrun")
    elif environ.get("SUBMITIT_EXECUTOR"):
        launch = _submitit_launch(environ)
    else:
        return None
    return launch if launch.world_size > 1 else None


def _submitit_launch(environ: Mapping[str, str]) -> Launch:
    import submitit  # only inside submitit jobs

    job = submitit.JobEnvironment()
    return Launch(rank=job.global_rank, world_size=job.num_tasks, local_rank=job.local_rank,
                  master_addr=environ.get("MASTER_ADDR", job.hostnames[0]),
                  master_port=int(environ.get("MASTER_PORT", job_port(job.job_id))),
                  launcher="submitit")


def job_port(job_id: str) -> int:
    """A port every task of a job derives alike from the job id, in 20000-29999 (below Linux's
    ephemeral ports, so that no outgoing connection holds it)."""
    digest = hashlib.sha256(job_id.encode()).digest()
    return 20000 + int.from_bytes(digest[:4], "little") % 10000


def launch_rank() -> int:
    """This process's rank from the environment alone (0 for a single process): usable before
    the process group exists, e.g. by the Hydra resolvers in ``run.py``."""
    launch = launch_from_environment()
    return 0 if launch is None else launch.rank


def uses_cuda(device: str) -> bool:
    """Whether the processes of a run configured with ``device`` train on CUDA GPUs."""
    return device != "cpu" and torch.cuda.is_available()


def start_process_group(device: str) -> Launch | None:
    """Join this launch's process group: NCCL when the processes train on CUDA GPUs (each on
    cuda:LOCAL_RANK), gloo otherwise. Once per process: later calls (the runs of a sweep) reuse
    the group. Returns the launch, None for a single process (nothing is started)."""
    launch = launch_from_environment()
    if launch is None or dist.is_initialized():
        return launch
    # submitit sets no MASTER_ADDR / MASTER_PORT; torchrun does, and those win.
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    os.environ.setdefault("MASTER_PORT", str(launch.master_port))
    if uses_cuda(device):
        # cuda:LOCAL_RANK; modulo the visible GPUs for clusters that show each task only its own
        gpu = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(gpu)
        dist.init_process_group("nccl", init_method="env://", rank=launch.rank,
                                world_size=launch.world_size, device_id=gpu)
    else:
        dist.init_process_group("gloo", init_method="env://", rank=launch.rank,
                                world_size=launch.world_size)
    atexit.register(_stop_process_group)
    return launch


def _stop_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- where this process stands --------------------------------------------------------------
def world_size() -> int:
    """Processes training together (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_first_process() -> bool:
    """Whether this process keeps the records (rank 0, or the only process)."""
    return rank() == 0


def check_process_count(cfg: RunConfig, processes: int) -> None:
    """Raise :class:`ConfigError` for a config that ``processes`` processes cannot run."""
    if processes == 1:
        return
    workers = cfg.workers
    if workers % processes:
        multiples = ", ".join(str(processes * k) for k in range(1, 4))
        raise ConfigError(f"workers={workers} is not divisible by the {processes} processes of "
                          f"this launch (each process runs workers / {processes} virtual "
                          f"workers); choose a multiple of {processes}: {multiples}, ...")
    if cfg.device not in MULTI_PROCESS_DEVICES:
        raise ConfigError(f"device={cfg.device!r} is not allowed with {processes} processes: "
                          f"each process uses its own GPU (cuda:LOCAL_RANK); choose one of: "
                          f"{', '.join(MULTI_PROCESS_DEVICES)}")
    if cfg.bn_eval == "precise":
        # Precise BN would recompute the statistics from each process's own shard, so processes
        # would evaluate with different statistics.
        raise ConfigError(f"bn_eval=precise is not supported with {processes} processes yet; "
                          f"choose one of: running, batch (or run it in one process)")


# ---- collective operations ------------------------------------------------------------------
def _collective_device() -> torch.device:
    """Where tensors for a collective must live: the process's GPU with NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def first_process_decides(decide: Callable[[], T]) -> T:
    """``decide()`` run on the first process only; every process returns its result, or raises
    the exception it raised. With one process: ``decide()``."""
    if world_size() == 1:
        return decide()
    outcome: list[Any] = [None]
    if is_first_process():
        try:
            outcome = [(True, decide())]
        except Exception as error:  # every process must learn of it, or the others would wait
            outcome = [(False, error)]
    dist.broadcast_object_list(outcome, src=0, device=_collective_device())
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


def sum_over_processes(values: list[float]) -> list[float]:
    """Each value summed over all processes (float64: exact for counts below 2**53)."""
    if world_size() == 1:
        return list(values)
    totals = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(totals)
    return totals.tolist()


def min_over_processes(value: float) -> float:
    """The smallest of the processes' values (float64: exact for integers below 2**53)."""
    if world_size() == 1:
        return value
    smallest = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    return smallest.item()


def average_over_processes(metrics: Mapping[str, float], images: int) -> dict[str, float]:
    """Per-image averages measured on ``images`` images here -> the same averages over all
    processes' images (each process's value weighted by its number of images)."""
    if world_size() == 1:
        return dict(metrics)
    *sums, total = sum_over_processes([value * images for value in metrics.values()] + [images])
    return {key: value / total for key, value in zip(metrics, sums)}


@torch.no_grad()
def average_running_statistics(model: nn.Module) -> None:
    """Replace the norm layers' floating-point buffers (running mean, variance, ...; not step
    counters) by their average over all processes. See the module docstring for why this is the
    single-process rule."""
    if world_size() == 1:
        return
    buffers = [b for _, layer in norm_layers(model) for b in layer.buffers(recurse=False)
               if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).double() for b in buffers]).to(_collective_device())
    dist.all_reduce(flat)
    flat /= world_size()
    for buffer, average in zip(buffers, flat.split([b.numel() for b in buffers])):
        buffer.copy_(average.view_as(buffer))


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when several processes train, else ``model``.
    ``broadcast_buffers=False``: BN statistics stay per worker, as in the paper's protocol."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # Newer torch renames broadcast_buffers (same meaning for the forward passes, which is what
    # matters: at construction every process holds the same buffers anyway).
    takes_new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = {"forward_sync_buffers" if takes_new_name else "broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   **no_buffer_sync)


__all__ = ["Launch", "MULTI_PROCESS_DEVICES", "average_over_processes",
           "average_running_statistics", "check_process_count", "data_parallel",
           "first_process_decides", "is_first_process", "job_port", "launch_from_environment",
           "launch_rank", "min_over_processes", "rank", "start_process_group", "sum_over_processes", "uses_cuda",
           "world_size"]
