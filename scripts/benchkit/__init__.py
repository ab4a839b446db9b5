"""The performance benchmark (``scripts/bench.py``, ``make bench``, ``make gpu-check``).

How every figure is measured is in :mod:`benchkit.measure`. The items (numbers as in the
report):

1. ``framework_overhead``: normbench's training step (:meth:`Trainer.train_epoch`) against a
   minimal hand-written loop with the same model, SGD settings and pre-made batches.
2. ``virtual_workers``: a step with ``workers=8 batch=2`` (BN statistics per chunk of 2) with
   each per-worker BN implementation against plain BN on the same 16 images, in fp32 and bf16,
   NCHW and channels_last.
3. ``virtual_workers_epoch``: an epoch of the 8-worker batch-2 protocol (steps of 16 images)
   against the same images as 8x more steps of 2 images; below the 3x target, where the time
   goes (fixed cost per step, cost per image, a profile by op class).
4. ``norms``: each norm's training step against bn's, at batch 32 and 2 (x ``workers``).
5. ``data_loading``: images per second the input pipeline delivers against what the model
   trains on.
6. ``gpu_resnet50`` (CUDA only): ResNet-50 bf16 images/s, bn and gn, eager and compiled,
   channels_last; GN/BN ratio; CUDA graphs at batch 2 x 8; the per-worker BN implementations.
7. ``fast_paths``: torch.compile against the eager step (CUDA, or ``--compile``).
8. ``default_vs_today``: the default path (auto precision and layout, the device's per-worker
   BN) against today's (fp32, NCHW, hand-written BN), ResNet-8 and ResNet-20, bn and gn, batch
   32 x 8 and 2 x 8.
9. ``layouts``: channels_last against NCHW per model, norm, precision and batch: the data behind
   ``channels_last: auto`` (normbench.fast_paths.CPU_CHANNELS_LAST).
10. ``bf16_results``: a short real training run's test error in bf16 and fp32, same seeds,
    against the seed-to-seed spread.
"""

from __future__ import annotations

from typing import Callable

from .cpu_items import (data_loading, fast_paths, framework_overhead, norms, virtual_workers,
                        virtual_workers_epoch)
from .default_path import bf16_results, default_vs_today, layouts
from .gpu_items import gpu_resnet50
from .measure import Context, Item

ITEMS: dict[int, Callable[[Context], Item]] = {
    1: framework_overhead, 2: virtual_workers, 3: virtual_workers_epoch, 4: norms,
    5: data_loading, 6: gpu_resnet50, 7: fast_paths, 8: default_vs_today, 9: layouts,
    10: bf16_results,
}

__all__ = ["ITEMS"]
