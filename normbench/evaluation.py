"""Evaluating a model on the test set.

Kept apart from the training loop so that evaluation modes (how BN-like layers get their
statistics at test time, config key ``bn_eval``) live in one place; the statistics machinery is
in :mod:`normbench.bn_eval`.

Per epoch, :func:`evaluate_epoch` records ``test_loss`` and ``test_error`` evaluated as
``bn_eval`` says, and, for models with batch-dependent norms only (bn, brn, syncbn,
evonorm_b0), two more keys:

- ``train_mode_test_error``: the test error with the statistics the model uses in training,
  i.e. consecutive chunks of ``batch`` test images (``batch * workers`` for syncbn) in the
  loaders' fixed shuffled evaluation order (:func:`normbench.data.eval_order`, so that a
  chunk mixes classes as a training batch does), nothing written to the running statistics;
- ``bn_gap = train_mode_test_error - test_error``, in percentage points: how much worse (> 0)
  or better (< 0) the model does with training-mode batch statistics than with the evaluation
  statistics of ``bn_eval``. With ``bn_eval=batch`` both are the same evaluation and the gap
  is 0.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .bn_eval import BN_EVAL_MODES, batch_statistics, has_batch_statistics, precise_statistics

Autocast = Callable[[], contextlib.AbstractContextManager]


def batches_of_whole_chunks(loader: Iterable, chunk: int
                            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The test stream regrouped so that every forward sees whole chunks of ``chunk``
    consecutive images: ``(images, labels, scored)``, where only the first ``scored`` images
    count. Images left over from one loader batch start the next; the last partial chunk of the
    test set is filled up with the stream's first images, whose predictions are not counted, so
    every test image is scored exactly once, with the statistics of ``chunk`` images, whatever
    ``eval_batch`` is."""
    first: torch.Tensor | None = None
    held_images = held_labels = None
    for images, labels in loader:
        if held_images is not None:
            images, labels = torch.cat([held_images, images]), torch.cat([held_labels, labels])
        if first is None and len(images) >= chunk:
            first = images[:chunk]
        whole = len(images) // chunk * chunk
        if whole:
            yield images[:whole], labels[:whole], whole
        held_images, held_labels = images[whole:], labels[whole:]
    if held_images is not None and len(held_images):
        if first is None:
            raise ValueError(f"the test set has {len(held_images)} images, fewer than one "
                             f"normalization batch of {chunk}")
        filled = torch.cat([held_images, first[:chunk - len(held_images)]])
        yield filled, held_labels, len(held_labels)


def _score(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, int]],
           autocast: Autocast) -> dict[str, float]:
    # Summed on the device and read once: a read per batch would make the GPU wait each time.
    loss_sum = wrong = None
    seen = 0
    for images, labels, scored in batches:
        with autocast():
            logits = model(images)[:scored]
        batch_loss = F.cross_entropy(logits.float(), labels, reduction="sum").double()
        batch_wrong = (logits.argmax(1) != labels).sum()
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        wrong = batch_wrong if wrong is None else wrong + batch_wrong
        seen += labels.numel()
    return {"test_loss": loss_sum.item() / seen, "test_error": 100.0 * wrong.item() / seen}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, autocast: Autocast = contextlib.nullcontext,
             statistics_batch: int | None = None) -> dict[str, float]:
    """Test loss and top-1 error (%) of ``model`` over ``loader``.

    ``statistics_batch=None``: eval mode (batch-dependent layers use their running statistics).
    Otherwise train-mode batch statistics over consecutive chunks of ``statistics_batch`` test
    images (see :func:`batches_of_whole_chunks`), with nothing written to the model.
    """
    if statistics_batch is None:
        was_training = model.training
        model.eval()
        try:
            return _score(model, ((x, y, len(y)) for x, y in loader), autocast)
        finally:
            model.train(was_training)
    with batch_statistics(model, statistics_batch):
        return _score(model, batches_of_whole_chunks(loader, statistics_batch), autocast)


def evaluate_epoch(model: nn.Module, test_batches: Callable[[str], Iterable], *, bn_eval: str,
                   statistics_batch: int, precise_batches: Callable[[], ContextManager[Iterable]],
                   precise_samples: int, autocast: Autocast = contextlib.nullcontext
                   ) -> dict[str, float]:
    """One epoch's test metrics (see the module docstring for the keys).

    ``test_batches(description)`` iterates the test set (it may be asked twice);
    ``precise_batches()`` is a context giving training batches for ``bn_eval=precise``
    (e.g. :func:`normbench.bn_eval.dedicated_epoch`). The model's state is the same afterwards.
    """
    if bn_eval not in BN_EVAL_MODES:
        raise ValueError(f"bn_eval={bn_eval!r} is not allowed; choose one of: "
                         f"{', '.join(BN_EVAL_MODES)}")
    if not has_batch_statistics(model):  # every bn_eval mode is the same evaluation
        return evaluate(model, test_batches("test"), autocast=autocast)
    train_mode = evaluate(model, test_batches("test, batch statistics"), autocast=autocast,
                          statistics_batch=statistics_batch)
    if bn_eval == "batch":
        record = dict(train_mode)
    elif bn_eval == "precise":
        with precise_batches() as batches, precise_statistics(
                model, batches, samples=precise_samples, chunk=statistics_batch,
                autocast=autocast):
            record = evaluate(model, test_batches("test, precise statistics"), autocast=autocast)
    else:
        record = evaluate(model, test_batches("test"), autocast=autocast)
    record["train_mode_test_error"] = train_mode["test_error"]
    record["bn_gap"] = train_mode["test_error"] - record["test_error"]
    return record


__all__ = ["batches_of_whole_chunks", "evaluate", "evaluate_epoch"]
