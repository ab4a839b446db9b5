"""Training one run: config -> data, model, optimizer -> epochs -> run folder (and W&B).

:func:`run` is the whole job (what ``run.py`` calls); :class:`Trainer` holds the pieces; the
training step itself is a few plain lines in :meth:`Trainer.train_epoch`.

One SGD step sees ``batch * workers`` images. Batch-dependent norms take statistics per chunk of
``batch`` images (virtual workers), the loss is the mean over all images (= the average of the
workers' mean losses, as data-parallel training computes it), and the learning rate follows the
linear scaling rule: ``lr = optim.lr_per_256 * batch * workers / 256``.

With several processes (torchrun, SLURM; :mod:`normbench.distributed`) each process trains
``workers / N`` of the virtual workers under DistributedDataParallel, and the step is the same;
the first process keeps the records.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import (ConfigError, OptimConfig, RunConfig, build_model_from_config,
                     config_differences, parse_config, run_key, run_name)
from .archive import (archive_folder, archive_run, archived_summary, commit_archive,
                      record_command, run_command)
from .bn_eval import dedicated_epoch, statistics_batch
from .distributed import (average_over_processes, average_running_statistics,
                          check_process_count, data_parallel, first_process_decides,
                          is_first_process, min_over_processes, rank, sum_over_processes,
                          world_size)
from .evaluation import evaluate_epoch
from .fast_paths import use_channels_last
from .machine import cpu_features, cpu_has_bf16, cuda_has_bf16, describe_machine
from .norms import set_total_steps
from .records import (COMPLETED, DIVERGED, FAILED, FINISHED, INTERRUPTED, RESUMED, RUN_KEY_ENTRY,
                      SKIPPED, TRAINED, OtherProcessRunFolder, RecordsError, RunFolder,
                      failure_summary, sigterm_interrupts)
from .tracking import Tracker

log = logging.getLogger(__name__)


NO_STEP = 2**62  # "no step yet" for the first non-finite step of an epoch (int64, min-reduced)


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"the training loss became NaN or infinite at epoch {epoch}, "
                         f"step {step}")
        self.epoch, self.step = epoch, step


def select_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world_size() > 1:
        # each process of a launch has its own GPU, made current when it joined the group
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a run uses, or None for full precision.

    ``bf16``: bf16 autocast. ``auto``: bf16 where the hardware computes it natively (GPUs of
    compute capability 8.0 and up: :func:`normbench.machine.cuda_has_bf16`; CPUs with
    AVX512-BF16 or AMX: :func:`normbench.machine.cpu_has_bf16`), fp32 elsewhere (where bf16 is
    emulated it is slower than fp32). The norms keep their statistics in fp32 under autocast
    (see :mod:`normbench.norms`)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and ((device.type == "cuda" and cuda_has_bf16()) or
                                (device.type == "cpu" and cpu_has_bf16())):
        return torch.bfloat16
    return None


def precision_used(amp_dtype: torch.dtype | None) -> str:
    """The precision a run actually trains in, as recorded: 'bf16' or 'fp32'."""
    return "bf16" if amp_dtype == torch.bfloat16 else "fp32"


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic matrix products on CUDA.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    # cuDNN picks the fastest conv algorithm for each input shape once; every training step has
    # the same shapes, so this pays after the first step. Its choice may vary between runs,
    # hence off when the run must be deterministic.
    torch.backends.cudnn.benchmark = not deterministic


def learning_rate(optim: OptimConfig, *, global_batch: int, epoch_progress: float,
                  epochs: int) -> float:
    """The learning rate at ``epoch_progress`` (epochs done, fractional) of an ``epochs`` run:
    linear scaling, optional linear warm-up, step decay at fractions of the run."""
    base = optim.lr_per_256 * global_batch / 256
    warmup = optim.warmup_epochs
    if warmup and epoch_progress < warmup:
        return base * (epoch_progress + 1e-8) / warmup
    drops = sum(epoch_progress >= m * epochs - 1e-9 for m in optim.milestones)
    return base * optim.lr_decay ** drops


def parameter_groups(model: nn.Module, weight_decay: float,
                     norm_weight_decay: bool) -> list[dict[str, Any]]:
    """Weight decay on every weight by default (the paper decays gamma and beta too); with
    ``norm_weight_decay=false`` the norms' parameters and all biases get none."""
    if norm_weight_decay:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    norm_params = {id(p) for m in model.modules() if hasattr(m, "values_per_statistic")
                   for p in m.parameters(recurse=False)}
    decayed, free = [], []
    for name, p in model.named_parameters():
        (free if id(p) in norm_params or name.endswith(".bias") else decayed).append(p)
    return [{"params": decayed, "weight_decay": weight_decay},
            {"params": free, "weight_decay": 0.0}]


def sgd(model: nn.Module, optim: OptimConfig, fused: bool = True) -> torch.optim.SGD:
    """SGD as the config says; its lr is set every step (:func:`learning_rate`).

    ``fused``: one kernel updates every parameter (CPU and CUDA) instead of a loop of five or
    so small ops per parameter, several hundred per step on a ResNet, a fixed cost that weighs
    most on small batches. The update is the loop's up to floating-point rounding
    (tests/test_training_step.py compares the weights after an epoch)."""
    return torch.optim.SGD(
        parameter_groups(model, optim.weight_decay, optim.norm_weight_decay),
        lr=0.0, momentum=optim.momentum, nesterov=optim.nesterov,
        fused=fused or None, foreach=False if not fused else None)


def median_of_last(values: list[float], count: int = 5) -> float:
    return float(statistics.median(values[-count:]))


class Trainer:
    def __init__(self, cfg: RunConfig | Mapping[str, Any], folder: RunFolder, *,
                 fused_sgd: bool = True) -> None:
        """``fused_sgd=False``: SGD's per-parameter loop instead of the fused kernel (the same
        numbers, slower; the benchmark's path before issue #13)."""
        from .data import build_loaders  # data pulls in torchvision; keep `import normbench` light

        self.cfg = cfg = parse_config(cfg)  # a plain mapping (tests, tools) is parsed here
        self.folder = folder
        self.device = select_device(cfg.device)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        if cfg.precision == "auto" and self.device.type == "cpu" and self.amp_dtype is None:
            log.info("precision=auto: fp32, this CPU has no bf16 units (%s)", cpu_features())
        if cfg.threads is not None:
            # Several runs sharing a CPU (a parallel local sweep) must split its cores: torch's
            # threads spin while waiting, and oversubscribed they run many times slower.
            torch.set_num_threads(cfg.threads)
        set_determinism(cfg.seed, cfg.deterministic)
        self.global_batch = cfg.global_batch
        # With N processes each loads its 1/N of every step: workers / N virtual workers.
        self.processes, self.rank = world_size(), rank()
        self.train_loader, self.test_loader, self.data_info = build_loaders(
            cfg.dataset.to_dict(), global_batch=self.global_batch, eval_batch=cfg.eval_batch,
            seed=cfg.seed, device=self.device, rank=self.rank, world_size=self.processes,
            num_workers=cfg.num_workers)
        if len(self.train_loader) == 0:
            raise ValueError(f"dataset {cfg.dataset.name} has {self.data_info.num_train} "
                             f"training images, fewer than one step of batch x workers = "
                             f"{self.global_batch}")
        self.model = build_model_from_config(cfg, self.data_info.num_classes).to(self.device)
        set_total_steps(self.model, cfg.epochs * len(self.train_loader))  # BRN's schedule
        # channels_last (NHWC) where it is faster for this norm and device; the inputs are put
        # in the same format in every step (a conv fed NCHW would transpose them itself).
        self.memory_format = (torch.channels_last if use_channels_last(
            cfg.channels_last, cfg.norm.name, self.device, self.amp_dtype)
            else torch.contiguous_format)
        self.model.to(memory_format=self.memory_format)
        # What a training step calls: DDP around the model with several processes. The plain
        # model is evaluated and checkpointed (no "module." prefix: checkpoints do not depend
        # on the number of processes).
        self.training_model = data_parallel(self.model, self.device)
        if cfg.compile:
            # After the DDP wrap, so that the compiler sees DDP's gradient buckets and splits
            # the graph at them (compiling the inner model first hides them). In place
            # (nn.Module.compile): checkpoints keep their keys. With one process the evaluated
            # model is the compiled one too.
            self.training_model.compile(mode=cfg.compile_mode)
        self.optimizer = sgd(self.model, cfg.optim, fused=fused_sgd)
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.wandb_id: str | None = None

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch, "step": self.step, "history": self.history,
                "wandb_id": self.wandb_id, RUN_KEY_ENTRY: run_key(self.cfg)}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = list(state["history"])
        self.wandb_id = state["wandb_id"]

    # -- one epoch ---------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _progress(self, loader, desc: str) -> Iterator:
        """``loader``'s batches, images in the model's memory format, with a progress bar."""
        batches = ((images.contiguous(memory_format=self.memory_format), labels)
                   for images, labels in loader)
        if not self.cfg.progress or self.rank != 0:  # one progress bar per launch
            return batches
        from tqdm import tqdm
        return iter(tqdm(batches, total=len(loader), desc=desc, leave=False, dynamic_ncols=True))

    def train_epoch(self) -> dict[str, float]:
        """One epoch of SGD steps. The step never waits for the device: loss and error are
        summed on the device and read once, at the end of the epoch (on a GPU a read per step
        would stall the queue of kernels, most at small batches). A non-finite loss is noticed
        then too, with the step where it first appeared."""
        cfg, model = self.cfg, self.training_model
        model.train()
        self.train_loader.set_epoch(self.epoch)
        steps = len(self.train_loader)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        wrong = torch.zeros((), dtype=torch.int64, device=self.device)
        first_bad_step = torch.full((), NO_STEP, dtype=torch.int64, device=self.device)
        seen = 0
        start = time.perf_counter()
        desc = f"epoch {self.epoch + 1}/{cfg.epochs} train"
        for index, (images, labels) in enumerate(self._progress(self.train_loader, desc)):
            lr = learning_rate(cfg.optim, global_batch=self.global_batch,
                               epoch_progress=self.epoch + index / steps, epochs=cfg.epochs)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with self._autocast():
                logits = model(images)
                loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            with torch.no_grad():
                loss = loss.detach()
                loss_sum += loss * labels.numel()
                wrong += (logits.argmax(1) != labels).sum()
                # the first step (1-based) whose loss was NaN or infinite
                first_bad_step.copy_(torch.where(loss.isfinite(), first_bad_step,
                                                 first_bad_step.clamp(max=self.step)))
            seen += labels.numel()
        # The one read of the epoch, summed over all processes (a no-op with one).
        step_loss, step_wrong, step_seen = sum_over_processes(
            [loss_sum.item(), wrong.item(), seen])
        bad_step = int(min_over_processes(first_bad_step.item()))
        if bad_step != NO_STEP or not math.isfinite(step_loss):
            raise Diverged(self.epoch + 1, bad_step if bad_step != NO_STEP else self.step)
        elapsed = time.perf_counter() - start
        return {"train_loss": step_loss / step_seen, "train_error": 100.0 * step_wrong / step_seen,
                "lr": lr, "images_per_second": step_seen / elapsed, "epoch_time": elapsed}

    def evaluate(self) -> dict[str, float]:
        """Test metrics as ``bn_eval`` says; with batch-dependent norms also
        ``train_mode_test_error`` and ``bn_gap`` (see :mod:`normbench.evaluation`)."""
        cfg = self.cfg
        return evaluate_epoch(
            self.model, lambda desc: self._progress(self.test_loader, desc),
            bn_eval=cfg.bn_eval,
            statistics_batch=statistics_batch(cfg.norm.name, cfg.batch, cfg.workers),
            precise_batches=lambda: dedicated_epoch(self.train_loader, self.epoch),
            precise_samples=cfg.precise_bn_samples, autocast=self._autocast)

    def evaluate_all_processes(self) -> dict[str, float]:
        """:meth:`evaluate` on every process's shard of the test set, averaged over the whole
        test set; before it, the running statistics are made the same on every process (their
        average, see :mod:`normbench.distributed`). With one process: :meth:`evaluate`.
        Every value :meth:`evaluate` returns must be a per-image average over the test images
        (or a difference of two): that is what makes the weighted average right."""
        from .data import eval_shard

        average_running_statistics(self.model)
        shard = eval_shard(self.data_info.num_test, self.rank, self.processes)
        return average_over_processes(self.evaluate(), images=len(shard))

    # -- the run -----------------------------------------------------------------------------
    def fit(self, tracker: Tracker) -> dict[str, Any]:
        cfg = self.cfg
        wall_start = time.perf_counter() - (self.history[-1]["wall_time"] if self.history else 0)
        while self.epoch < cfg.epochs:
            record = {"epoch": self.epoch + 1}
            record.update(self.train_epoch())
            record.update(self.evaluate_all_processes())
            self.epoch += 1
            record["step"] = self.step
            record["wall_time"] = time.perf_counter() - wall_start
            self.history.append(record)
            # Checkpoint first: it is the source of truth, metrics.jsonl is rebuilt from it.
            self.folder.save_checkpoint(self.state())
            self.folder.append_metrics(record)
            tracker.log(record, step=self.epoch)
            log.info("epoch %d/%d  train err %.2f  test err %.2f  loss %.3f  lr %.4g  %.0f img/s",
                     self.epoch, cfg.epochs, record["train_error"], record["test_error"],
                     record["train_loss"], record["lr"], record["images_per_second"])
        return self.summary(COMPLETED)

    def summary(self, status: str, **extra: Any) -> dict[str, Any]:
        errors = [r["test_error"] for r in self.history]
        finished = status == COMPLETED
        return {
            "status": status,
            "final_error": errors[-1] if finished else None,
            "median5_error": median_of_last(errors) if finished else None,
            "best_error": min(errors) if errors else None,
            "final_train_error": self.history[-1]["train_error"] if self.history else None,
            "epochs": self.epoch,
            "steps": self.step,
            "images_per_second": (statistics.median(r["images_per_second"] for r in self.history)
                                  if self.history else None),
            "wall_time": self.history[-1]["wall_time"] if self.history else 0.0,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
            # what the run actually used where the config says auto
            "precision": precision_used(self.amp_dtype),
            "channels_last": self.memory_format == torch.channels_last,
            "num_workers": self.data_info.num_workers,  # DataLoader processes (0: data on device)
            "machine": describe_machine(self.device),
            "processes": self.processes,
            "skipped_files": self.data_info.skipped_files,  # unreadable images skipped
            **extra,
        }


def run(cfg: RunConfig | Mapping[str, Any], run_dir: str | os.PathLike) -> dict[str, Any]:
    """Train (or resume, or skip) the run ``cfg`` in ``run_dir``; return its summary.

    ``cfg`` is a :class:`~normbench.config.RunConfig`, or the plain mapping Hydra composes,
    parsed here (a bad value is refused before any work, and the folder says why).

    A folder whose summary says completed or diverged is not trained again. A folder with a
    checkpoint resumes from it. A failure is recorded in ``summary.json`` and re-raised.

    Several processes (torch.distributed started, see :mod:`normbench.distributed`) call this
    together, with the same ``run_dir``: the first keeps the records and decides whether to
    skip, resume or refuse; the others follow its decisions and write nothing.
    """
    folder = RunFolder(run_dir) if is_first_process() else OtherProcessRunFolder(run_dir)
    first_process_decides(folder.open)
    started = time.time()
    outcome = FAILED
    try:
        with sigterm_interrupts():  # SIGTERM (SLURM's notice before a kill) stops like Ctrl-C
            try:
                parsed = parse_config(cfg)
                check_process_count(parsed, world_size())
            except ConfigError as error:
                # Refused before any work; the folder says why, so a sweep's report shows the
                # cell (a damaged config.yaml, or a finished run's summary, stays as it is).
                with contextlib.suppress(RecordsError):
                    if folder.read_config() is None:
                        folder.write_config(cfg.to_dict() if isinstance(cfg, RunConfig)
                                            else cfg)
                folder.record_failure(failure_summary(error))
                raise
            summary = _run_in_folder(parsed, folder)
            if is_first_process():
                keep_in_archive(parsed, folder)
        outcome = summary["outcome"]
        if outcome != SKIPPED and summary["status"] == DIVERGED:
            outcome = DIVERGED
        return summary
    except (Exception, KeyboardInterrupt) as error:
        outcome = INTERRUPTED if isinstance(error, KeyboardInterrupt) else FAILED
        raise
    finally:
        folder.record_launch(outcome, started)
        folder.close()


def _run_in_folder(cfg: RunConfig, folder: RunFolder) -> dict[str, Any]:
    previous = first_process_decides(lambda: _finished_run(cfg, folder))
    if previous is not None:
        log.info("%s: already %s, nothing to do", folder.path, previous["status"])
        return {**previous, "outcome": SKIPPED}
    try:
        trainer = Trainer(cfg, folder)
        # read by the first process, sent to the others: every process resumes from it; a
        # checkpoint of another config is refused
        checkpoint = first_process_decides(lambda: folder.load_checkpoint(run_key(cfg)))
    except Exception as error:  # data or records unusable: say so in the folder, then raise
        folder.record_failure(failure_summary(error))
        raise
    outcome = TRAINED
    if checkpoint is not None:
        trainer.restore(checkpoint)
        folder.rewrite_metrics(trainer.history)
        outcome = RESUMED
        log.info("%s: resuming after epoch %d", folder.path, trainer.epoch)
    wandb_settings = cfg.wandb if is_first_process() else replace(cfg.wandb, mode="disabled")
    tracker = Tracker(wandb_settings, folder.path, cfg, run_id=trainer.wandb_id,
                      name=run_name(cfg), history=trainer.history)
    trainer.wandb_id = tracker.run_id
    try:
        summary = trainer.fit(tracker)
    except Diverged as error:
        # Divergence is a result of the protocol (e.g. BN at batch 2 with a large lr), not a
        # crash: it is recorded as such and the run counts as finished.
        log.error("%s: diverged: %s", folder.path, error)
        summary = trainer.summary(DIVERGED, error=str(error),
                                  diverged_at={"epoch": error.epoch, "step": error.step})
    except Exception as error:
        summary = {**trainer.summary(FAILED), **failure_summary(error)}
        folder.record_failure(summary)  # best effort: never hides `error` (e.g. a full disk)
        tracker.summary({k: v for k, v in summary.items() if k != "traceback"})
        tracker.finish(exit_code=1)
        raise
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): no summary, the checkpoint resumes
        tracker.finish(exit_code=1)
        raise
    folder.write_summary(summary)
    tracker.summary(summary)
    tracker.finish(exit_code=0)
    return {**summary, "outcome": outcome}


def keep_in_archive(cfg: RunConfig, folder: RunFolder) -> None:
    """With ``archive_dir`` set: copy the records of the finished run in ``folder`` there (and
    commit them with ``archive_commit``), unless they are there already (see
    :mod:`normbench.archive`)."""
    archive = archive_folder(cfg, run_name(cfg))
    summary = folder.read_summary()
    if (archive is None or archive.path.resolve() == folder.path.resolve() or not summary
            or summary.get("status") not in FINISHED or archived_summary(archive) is not None):
        return
    archive_run(folder, archive)
    command = run_command(folder)
    if command is not None:
        record_command(archive, command)
    log.info("%s: records archived in %s", folder.path, archive.path)
    if cfg.archive_commit:
        commit_archive(archive, f"{archive.path}: {summary['status']} "
                                f"(median-of-5 error {summary.get('median5_error')})")


def _finished_run(cfg: RunConfig, folder: RunFolder) -> dict[str, Any] | None:
    """The summary of the run in ``folder`` if it already completed or diverged, or of its
    archived records (``archive_dir``). Otherwise None, once the folder is known to hold this
    config (or none) and has it written. A folder holding another config is refused first,
    finished or not: its result is not this config's."""
    stored = folder.read_config()
    if stored is None:  # config.yaml deleted: a checkpoint left here says which config it is
        stored = folder.checkpoint_run_key()
    if stored is not None and config_differences(stored, cfg):
        raise RecordsError(f"run folder {folder.path} holds a run with a different config "
                           f"(keys: {', '.join(config_differences(stored, cfg))}); choose "
                           f"another folder")
    previous = folder.read_summary()
    if previous and previous["status"] in FINISHED:
        return previous
    archive = archive_folder(cfg, run_name(cfg))
    archived = archived_summary(archive)
    if archived is not None:
        stored = archive.read_config()
        if stored is not None and config_differences(stored, cfg):
            raise RecordsError(f"archived run {archive.path} holds a different config (keys: "
                               f"{', '.join(config_differences(stored, cfg))})")
        log.info("%s: finished in the archive %s", folder.path, archive.path)
        return archived
    folder.write_config(cfg.to_dict())
    return None
