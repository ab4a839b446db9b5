"""Fast paths that change how a model runs, never what it computes (up to floating-point
rounding): the channels_last memory format and torch.compile.

Config keys (``conf/config.yaml``):

- ``channels_last: auto | true | false``. ``auto`` turns it on for CUDA when the norm's kernels
  work on NHWC tensors without copies (the registry's ``NormSpec.channels_last``: on for bn,
  brn, syncbn, frn, evonorm_b0 and none; off for gn, ln and in, whose torch GroupNorm kernel is
  slower in NHWC, and for evonorm_s0, whose grouped reshape copies NHWC tensors). On CUDA the
  convs gain most: cuDNN's bf16 tensor-core convs want NHWC and transpose NCHW inputs
  internally. On the CPU ``auto`` is off: it has not been measured to pay there (``make bench``
  measures it on the device it runs on).
- ``compile: true`` runs the model through ``torch.compile`` (``nn.Module.compile``: in place,
  so checkpoints keep their keys and evaluation uses the compiled model too), with
  ``compile_mode``: ``default``; ``reduce-overhead`` (CUDA graphs: removes the per-kernel
  launch cost that dominates small batches; on the CPU it is the same as ``default``);
  ``max-autotune`` / ``max-autotune-no-cudagraphs`` (longer compilation, tuned kernels). The
  first steps are slow (compilation: tens of seconds on a CPU, minutes for ResNet-50 on a GPU),
  and torch.compile needs a C++ compiler on the CPU.

Both keys are left out of the run folder's name (:data:`normbench.config.NON_RUN_KEYS`): like
``device`` they change rounding, not results, so turning them on resumes or skips the same runs.
``tests/test_fast_paths.py`` checks that a few training steps give the same losses and
parameters with each fast path on and off.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .norms import norm_spec

CHANNELS_LAST_SETTINGS = ("auto", True, False)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def use_channels_last(setting: str | bool, norm: str, device: torch.device) -> bool:
    """Whether a model with norm ``norm`` on ``device`` runs in channels_last for ``setting``."""
    if setting == "auto":
        return torch.device(device).type == "cuda" and norm_spec(norm).channels_last
    return bool(setting)


def apply_fast_paths(model: nn.Module, cfg: Mapping[str, Any], device: torch.device) -> nn.Module:
    """Put ``model`` (already on ``device``) in channels_last and compile it, as the config's
    ``channels_last``, ``compile`` and ``compile_mode`` say. In place; returns ``model``."""
    if use_channels_last(cfg["channels_last"], cfg["norm"]["name"], device):
        model.to(memory_format=torch.channels_last)
    if cfg["compile"]:
        model.compile(mode=cfg["compile_mode"])
    return model


__all__ = ["CHANNELS_LAST_SETTINGS", "COMPILE_MODES", "apply_fast_paths", "use_channels_last"]
