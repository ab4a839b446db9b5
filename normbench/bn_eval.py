"""How batch-dependent norms get their statistics at test time (config key ``bn_eval``).

BN's error at small batch is partly train/test inconsistency (Wu & Johnson 2021): training
normalizes with the statistics of each worker's ``batch`` images, evaluation with moving averages.
This module gives the evaluation loop (:mod:`normbench.evaluation`) the other two choices:

- *batch statistics* (:func:`batch_statistics`): the model in train mode, every batch-dependent
  layer normalizing chunks of ``statistics_batch`` images exactly as in a training step, but with
  nothing written: no running statistics, no step counters (``stats_mode = "frozen"``);
- *precise statistics* (:func:`recompute_population_statistics`, Precise BN): the running
  buffers replaced by the true average of the per-chunk statistics of a number of training
  images, computed with frozen weights in train mode (``stats_mode = "collect"``), instead of the
  exponential moving average. :func:`precise_statistics` puts the training state back afterwards.

The layers concerned are the :class:`~normbench.norms.BatchStatistics` layers that keep running
statistics: ``bn``, ``brn`` (mean and std, its r/d corrections included in train mode),
``syncbn`` and ``evonorm_b0`` (its batch variance).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, ContextManager, Iterable, Iterator

import torch
from torch import nn

from .norms import BatchStatistics, StatisticsSum, norm_spec

log = logging.getLogger(__name__)

BN_EVAL_MODES = ("running", "precise", "batch")

# Precise BN draws its training images from the epoch PRECISE_BN_EPOCH_OFFSET + epoch of the
# training loader: a fixed, reproducible sample that no training epoch ever uses.
PRECISE_BN_EPOCH_OFFSET = 1_000_000


def batch_statistics_layers(model: nn.Module) -> list[BatchStatistics]:
    """The layers of ``model`` whose statistics come from the batch and are kept as running
    buffers (an affine-only EvoNorm-B0 has none)."""
    return [m for m in model.modules() if isinstance(m, BatchStatistics) and m.running_stat_names]


def has_batch_statistics(model: nn.Module) -> bool:
    return bool(batch_statistics_layers(model))


def statistics_batch(norm: str, batch: int, workers: int) -> int:
    """Images per normalization batch in a training step: ``batch`` (per worker), or
    ``batch * workers`` for norms whose statistics cover the whole step (syncbn)."""
    return batch * workers if norm_spec(norm).step_statistics else batch


@contextlib.contextmanager
def batch_statistics(model: nn.Module, chunk: int, *, mode: str = "frozen"
                     ) -> Iterator[list[BatchStatistics]]:
    """``model`` in train mode with its batch-dependent layers normalizing chunks of ``chunk``
    images and writing nothing (``frozen``) or collecting (``collect``); everything is put back
    on exit."""
    layers = batch_statistics_layers(model)
    saved = [(m.virtual_batch, m.stats_mode) for m in layers]
    was_training = model.training
    model.train()
    for m in layers:
        m.virtual_batch, m.stats_mode = chunk, mode
    try:
        yield layers
    finally:
        for m, (virtual_batch, stats_mode) in zip(layers, saved):
            m.virtual_batch, m.stats_mode = virtual_batch, stats_mode
            m.collected = None
        model.train(was_training)


def running_statistics(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """A copy of every batch-dependent layer's running buffers, in layer order."""
    return [{name: getattr(m, name).detach().clone() for name in m.running_stat_names}
            for m in batch_statistics_layers(model)]


@torch.no_grad()
def load_running_statistics(model: nn.Module, saved: list[dict[str, torch.Tensor]]) -> None:
    for m, buffers in zip(batch_statistics_layers(model), saved, strict=True):
        for name, value in buffers.items():
            getattr(m, name).copy_(value)


@torch.no_grad()
def recompute_population_statistics(
        model: nn.Module, batches: Iterable, *, samples: int, chunk: int,
        autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> int:
    """Precise BN (Wu & Johnson 2021): replace every batch-dependent layer's running buffers by
    the true average of its per-chunk statistics over the first ``samples`` images of
    ``batches`` (rounded up to whole chunks of ``chunk`` images), in train mode with frozen
    weights. Returns the number of images used (fewer than asked if ``batches`` runs out).

    Each layer sees its input as it is in training (earlier layers normalize with their batch
    statistics), and every chunk counts equally: the per-worker statistics of ``chunk`` images
    that training folds into the moving average, averaged instead of exponentially weighted.
    """
    wanted = -(-samples // chunk) * chunk
    used = 0
    with batch_statistics(model, chunk, mode="collect") as layers:
        for m in layers:
            m.collected = StatisticsSum()
        for images, _labels in batches:
            images = images[:wanted - used]
            with autocast():
                model(images)
            used += len(images)
            if used >= wanted:
                break
        if used == 0:
            raise ValueError("precise BN: the training batches are empty")
        for m in layers:
            for name, average in m.collected.averages().items():
                buffer = getattr(m, name)
                buffer.copy_(average.to(buffer.dtype))
    return used


@contextlib.contextmanager
def precise_statistics(model: nn.Module, batches: Iterable, *, samples: int, chunk: int,
                       autocast: Callable[[], ContextManager] = contextlib.nullcontext
                       ) -> Iterator[int]:
    """Within the block, ``model``'s running statistics are the precise ones; on exit the
    moving averages are put back, so that evaluation never changes training (BRN's r and d
    read the moving averages). The global RNG state is kept as it was. Yields the number of
    training images used."""
    saved = running_statistics(model)
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            used = recompute_population_statistics(model, batches, samples=samples, chunk=chunk,
                                                   autocast=autocast)
        if used < samples:
            log.warning("precise BN: asked for %d training images, the epoch has %d; using %d",
                        samples, used, used)
        yield used
    finally:
        load_running_statistics(model, saved)


@contextlib.contextmanager
def dedicated_epoch(train_loader, epoch: int) -> Iterator[Iterable]:
    """``train_loader`` set to the Precise-BN epoch of training epoch ``epoch`` (a reproducible
    sample no training epoch uses), set back to ``epoch`` on exit so the training stream is
    undisturbed."""
    train_loader.set_epoch(PRECISE_BN_EPOCH_OFFSET + epoch)
    try:
        yield train_loader
    finally:
        train_loader.set_epoch(epoch)


__all__ = ["BN_EVAL_MODES", "PRECISE_BN_EPOCH_OFFSET", "batch_statistics",
           "batch_statistics_layers", "dedicated_epoch", "has_batch_statistics",
           "load_running_statistics", "precise_statistics", "recompute_population_statistics",
           "running_statistics", "statistics_batch"]
