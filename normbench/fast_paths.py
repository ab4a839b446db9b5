"""Fast paths that change how a model runs, never what it computes (up to floating-point
rounding): the channels_last memory format and torch.compile.

Config keys (``conf/config.yaml``):

- ``channels_last: auto | true | false``. ``auto`` picks the layout that is faster for the
  norm, device and precision (the autocast dtype the run resolved):

  - CUDA: on when the norm's kernels work on NHWC tensors without copies (the registry's
    ``NormSpec.channels_last``: on for bn, brn, syncbn, frn, evonorm_b0 and none; off for gn,
    ln and in, whose torch GroupNorm kernel is slower in NHWC, and for evonorm_s0, whose
    grouped reshape copies NHWC tensors). The convs gain most: cuDNN's bf16 tensor-core convs
    want NHWC and transpose NCHW inputs internally.
  - CPU: :data:`CPU_CHANNELS_LAST`, measured by ``make bench`` (item 9, ResNet-8 and
    ResNet-20, one thread; results/bench): oneDNN's convs are faster in NHWC in fp32 and bf16,
    and so is the step with bn in both and with gn in fp32; in bf16 torch's GroupNorm kernel
    is much slower in NHWC than in NCHW, more than the convs gain. Norms not measured there
    stay NCHW on the CPU.
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

import torch

from .norms import norm_spec

CHANNELS_LAST_SETTINGS = ("auto", True, False)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# channels_last: auto on the CPU: {norm: {precision: NHWC?}}, precision "fp32" or "bf16" (the
# autocast dtype). Measured in results/bench (item 9) for bn and gn; syncbn runs bn's kernels on
# one process, ln and in run gn's.
CPU_CHANNELS_LAST: dict[str, dict[str, bool]] = {
    "bn": {"fp32": True, "bf16": True},
    "syncbn": {"fp32": True, "bf16": True},
    "gn": {"fp32": True, "bf16": False},
    "ln": {"fp32": True, "bf16": False},
    "in": {"fp32": True, "bf16": False},
}


def use_channels_last(setting: str | bool, norm: str, device: torch.device,
                      autocast_dtype: torch.dtype | None) -> bool:
    """Whether a model with norm ``norm`` on ``device`` runs in channels_last for ``setting``,
    when it trains under autocast to ``autocast_dtype`` (None: full precision)."""
    if setting != "auto":
        return bool(setting)
    spec = norm_spec(norm)  # an unknown norm fails here, naming the known ones
    device_type = torch.device(device).type
    if device_type == "cuda":
        return spec.channels_last
    if device_type == "cpu":
        precision = "fp32" if autocast_dtype is None else _precision_name(autocast_dtype)
        return CPU_CHANNELS_LAST.get(norm, {}).get(precision, False)
    return False  # other devices: not measured


def _precision_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


__all__ = ["CHANNELS_LAST_SETTINGS", "COMPILE_MODES", "CPU_CHANNELS_LAST", "use_channels_last"]
