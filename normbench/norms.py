"""Normalization layers and the one registry that names them.

A norm is named by a string (``bn``, ``gn``, ``ln``, ``in``, ``brn``, ``syncbn``, ``frn``,
``evonorm_b0``, ``evonorm_s0``, ``none``) and built by :func:`build_norm`. Each entry of
:data:`NORMS` says what the rest of the code must know about the layer:

- ``batch_dependent``: its statistics mix the images of a worker's batch. Those layers take their
  statistics per chunk of ``virtual_batch`` images, which is how one process runs several
  *virtual workers* (DESIGN.md), and share the machinery of :class:`BatchStatistics` (running
  statistics, Precise BN, evaluation with batch statistics; see :mod:`normbench.bn_eval`).
- ``step_statistics``: the statistics cover every worker of the SGD step (``syncbn``).
- ``replaces_activation``: the layer carries its own nonlinearity (FRN's TLU, EvoNorm), so the
  model drops the unit's activation; see :mod:`normbench.models`.

``ln`` and ``in`` have the GN paper's meaning: GroupNorm with one group (statistics over C, H, W
of each sample) and with one group per channel, both with a per-channel affine gamma and beta.

Weight Standardization (:class:`WSConv2d`) is not a norm but a modifier of the conv before one;
it lives here because it belongs to the same zoo.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

EPS = 1e-5  # the GN paper's epsilon for every norm
FRN_EPS = 1e-6  # Singh & Krishnan 2019, the paper's listing of the FRN layer
WS_EPS = 1e-5  # Qiao et al. 2019, the constant of the authors' code


# The fewest values a norm's statistic may cover in training: over one value the variance is 0
# (or FRN's x / sqrt(x^2 + eps) is sign(x)), so the layer outputs a constant and passes no
# gradient. A layer that can (FRN with a learned eps) says so in `min_values_per_statistic`.
MIN_VALUES_PER_STATISTIC = 2


class NormConfigError(ValueError):
    """A norm was asked for with a name or options it does not accept."""


# ---- virtual workers: one batch seen as per-worker chunks ------------------------------------
def worker_chunks(x: torch.Tensor, virtual_batch: int | None, layer: str) -> torch.Tensor:
    """``x`` (N, C, H, W) as (W, B, C, H, W): ``W = N / B`` chunks of ``B = virtual_batch`` images
    (one chunk of all N when ``virtual_batch`` is None). A view, no copy."""
    n = x.shape[0]
    chunk = n if virtual_batch is None else virtual_batch
    if n % chunk:
        raise ValueError(f"{layer}: a batch of {n} images is not a multiple of the per-worker "
                         f"batch {chunk}")
    return x.unflatten(0, (n // chunk, chunk))


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is a 16-bit float (autocast): statistics need the precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def moments(x: torch.Tensor, dim: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of ``x`` over ``dim`` (kept as size-1 dims), differentiable.

    On CUDA ``torch.var_mean`` (one fused kernel). Elsewhere the two-pass formula
    ``mean((x - mean)^2)``, as exact: on the CPU ``var_mean`` is a Welford loop many times
    slower than a sum (a third of a BRN training step went to it on ResNet-20)."""
    if x.device.type == "cuda":
        var, mean = torch.var_mean(x, dim=dim, correction=0, keepdim=True)
        return mean, var
    mean = x.mean(dim=dim, keepdim=True)
    centered = x - mean
    return mean, (centered * centered).mean(dim=dim, keepdim=True)


def chunk_moments(chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of each channel of each chunk, over (B, H, W): shape
    (W, 1, C, 1, 1) each, ready to broadcast against ``chunks``."""
    return moments(full_precision(chunks), (1, 3, 4))


def per_chunk(statistic: torch.Tensor) -> torch.Tensor:
    """A (W, 1, C, 1, 1) statistic as a (W, C) table: one row per worker."""
    return statistic.reshape(statistic.shape[0], -1)


def channel_view(t: torch.Tensor) -> torch.Tensor:
    """A per-channel vector (C,) shaped to broadcast against (W, B, C, H, W) chunks."""
    return t.view(1, 1, -1, 1, 1)


# ---- layers whose statistics come from the batch ---------------------------------------------
STATS_MODES = ("update", "frozen", "collect")


class StatisticsSum:
    """Sums of per-chunk statistics over many chunks: Precise BN's true average (Wu & Johnson
    2021), as opposed to the exponential moving average of training."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.chunks = 0

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for name, table in stats.items():  # table: (W, C), one row per chunk
            total = table.detach().double().sum(0)
            self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.chunks += next(iter(stats.values())).shape[0]

    def averages(self) -> dict[str, torch.Tensor]:
        return {name: total / self.chunks for name, total in self.sums.items()}


class BatchStatistics:
    """Mixin of the batch-dependent layers: per-worker chunks and what happens to the statistics.

    ``virtual_batch`` is the per-worker batch (None: the whole batch is one worker).
    ``running_stat_names`` are the buffers a training step folds its statistics into.
    ``stats_mode`` says what a *training-mode* forward does with the statistics it computes:

    - ``update`` (training): fold them into the running buffers at rate ``momentum`` and count
      the step;
    - ``frozen``: nothing; buffers and step counters stay as they are (evaluation with batch
      statistics);
    - ``collect``: add them to ``collected`` (a :class:`StatisticsSum`) for Precise BN.

    Eval mode always uses the running buffers. :mod:`normbench.bn_eval` switches the modes.

    ``layer_name`` is the layer's name in its model (set by :func:`name_batch_statistics_layers`),
    for errors that must say which layer.
    """

    running_stat_names: tuple[str, ...] = ()
    momentum: float

    def _init_batch_statistics(self, virtual_batch: int | None) -> None:
        self.virtual_batch = virtual_batch
        self.stats_mode = "update"
        self.collected: StatisticsSum | None = None
        self.layer_name: str | None = None

    def _refuse_single_values(self, x: torch.Tensor, chunk: int) -> None:
        """Raise :class:`NormConfigError` when a training-mode forward would take a statistic
        over one value: chunks of ``chunk`` images on a 1x1 map. The batch variance of one value
        is 0, so BN's output would be beta whatever the input (and the unbiased running
        variance would divide by zero)."""
        channels, height, width = x.shape[1:]
        if chunk * height * width > 1:
            return
        where = f" at layer {self.layer_name}" if self.layer_name else ""
        raise NormConfigError(
            f"{type(self).__name__}{where} would normalize a single value per channel in "
            f"training: batch={chunk} image per worker on a {height}x{width} map (input "
            f"{channels}x{height}x{width}: the images are too small for this model's stem); "
            f"choose batch >= 2 images per worker, larger images or a stem that keeps larger "
            f"maps (stem='cifar' for 32x32 images), or a batch-independent norm such as gn")

    def _absorb(self, stats: dict[str, torch.Tensor]) -> None:
        """Handle this step's statistics: ``{buffer name: (W, C) per-chunk values}``."""
        if self.stats_mode == "update":
            with torch.no_grad():
                for name, table in stats.items():
                    running = getattr(self, name)
                    # The mean over chunks: the moving average is linear, so this is the average
                    # of the W running estimates that W separate workers would keep.
                    running.lerp_(table.mean(0).to(running.dtype), self.momentum)
            self._count_step()
        elif self.stats_mode == "collect":
            self.collected.add(stats)

    def _count_step(self) -> None:
        """Advance the layer's step counter, if it has one."""


def _dot_over_pixels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) over the last (pixel) dim, in the inputs' precision: autocast would run
    vecdot in bf16 (it is on autocast's lower-precision list), and statistics need fp32."""
    with torch.autocast(a.device.type, enabled=False):
        return torch.linalg.vecdot(a, b, dim=3)


def _as_chunks(t: torch.Tensor, workers: int) -> torch.Tensor:
    """(N, C, H, W) as (W, N / W, C, H * W): a view for NCHW and channels_last tensors."""
    return t.unflatten(0, (workers, -1)).flatten(3)


class ChunkBatchNorm(torch.autograd.Function):
    """Training-mode BN of every chunk of ``chunk`` images in one pass, hand-written backward.

    ``x`` is (N, C, H, W) in any memory format; its W = N / chunk chunks (workers) are viewed as
    (W, B, C, L), L = H * W. Per chunk w and channel c, over its n = B * L values::

        mean = sum(x) / n     d = x - mean     var = sum(d * d) / n     (biased, two-pass)
        y = d * (weight / sqrt(var + eps)) + bias

    Returns ``y`` (N, C, H, W, dtype and memory format of ``x``) and (W, C) tables of the means
    and biased variances, which carry no gradient (they feed the running statistics).

    The backward is the classic BN gradient with x_hat = d / sqrt(var + eps)::

        dx = scale * (g - sum(g) / n - x_hat * sum(g * x_hat) / n),  scale = weight / sqrt(...)
        dweight = sum over chunks of sum(g * x_hat),  dbias = sum over chunks of sum(g)

    Why by hand: autograd through ``var_mean`` and ``chunks * scale + shift`` costs several
    extra passes and fresh full-size buffers per layer, and ``torch.var_mean`` alone is many
    times slower than a sum on the CPU. Here the forward is two reductions and three
    elementwise passes writing one buffer, the output; the backward recomputes d into the
    buffer that becomes dx. Like torch's BN, only the input (plus per-channel vectors) is kept
    for the backward. ``y`` is a tensor of its own, not a view: an in-place activation after
    the norm (ReLU(inplace=True)) then costs nothing, where on a view autograd would copy.
    Statistics are float32 when the input is 16-bit (autocast). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()  # so that the chunks below are views, of `out` too
        workers = x.shape[0] // chunk
        chunks = full_precision(_as_chunks(x, workers))
        inv_n = 1.0 / (chunks.shape[1] * chunks.shape[3])
        mean = chunks.sum(dim=(1, 3), keepdim=True).mul_(inv_n)  # (W, 1, C, 1)
        out = torch.empty_like(x, dtype=chunks.dtype)  # NCHW or channels_last, as x
        y = _as_chunks(out, workers)  # a view: what is written to y lands in `out`
        torch.sub(chunks, mean, out=y)
        var = _dot_over_pixels(y, y).sum(1, keepdim=True).mul_(inv_n)  # (W, 1, C)
        invstd = (var + eps).rsqrt_().unsqueeze(3)
        y.mul_(invstd * weight.view(1, 1, -1, 1)).add_(bias.view(1, 1, -1, 1))
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.inv_n = inv_n
        mean, var = mean.view(workers, -1), var.view(workers, -1)
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # no zero gradients made for mean and var
        return out.to(x.dtype), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor, _grad_mean: Any, _grad_var: Any
                 ) -> tuple[torch.Tensor | None, ...]:
        if grad_y is None:  # the output was not used
            return None, None, None, None, None
        x, mean, invstd, weight = ctx.saved_tensors
        workers = mean.shape[0]
        g = full_precision(_as_chunks(grad_y, workers))
        d = full_precision(_as_chunks(x, workers)) - mean  # becomes dx in place
        sum_g = g.sum(dim=(1, 3), keepdim=True)  # (W, 1, C, 1)
        sum_g_xhat = _dot_over_pixels(g, d).sum(1, keepdim=True).unsqueeze(3)
        sum_g_xhat.mul_(invstd)
        grad_x = None
        if ctx.needs_input_grad[0]:
            scale = invstd * weight.view(1, 1, -1, 1)
            # dx = d * k + shift + g * scale, with k and shift per chunk and channel
            k = (scale * invstd).mul_(sum_g_xhat).mul_(-ctx.inv_n)
            shift = (scale * sum_g).mul_(-ctx.inv_n)
            grad_x = d.mul_(k).add_(shift).addcmul_(g, scale).reshape(x.shape).to(x.dtype)
        grad_weight = sum_g_xhat.sum(dim=(0, 1, 3)) if ctx.needs_input_grad[1] else None
        grad_bias = sum_g.sum(dim=(0, 1, 3)) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None


# The per-worker BN's implementations. All compute the same thing (each chunk of ``chunk``
# images normalized by its own biased variance; per-chunk means and unbiased variances for the
# running statistics) and differ in speed only:
#
# - ``per_worker``: the library's batch-norm kernel once per worker, on views of the chunks,
#   outputs joined by one copy (``torch.cat``). Its per-chunk statistics land in rows of a
#   (W, C) table through the kernel's running-statistics arguments at momentum 1.
# - ``folded``: one call of the kernel on the batch with the worker axis folded into the
#   channels, (W * B, C, H, W) -> (B, W * C, H, W); a copy in and a copy out.
# - ``hand_written``: :class:`ChunkBatchNorm`, every chunk in one pass of reductions and
#   elementwise ops with a hand-written backward (the implementation before the library
#   kernel; kept for comparison in ``make bench`` and the tests).
#
# Measured (``make bench`` item 2, results/bench: a ResNet-20 step at batch 2 x 8 and 32 x 8,
# one thread): on the CPU ``per_worker`` is the fastest or level with the fastest in fp32 and
# bf16, NCHW and channels_last. ``hand_written`` falls behind in bf16 (it makes fp32 copies of
# the whole input, where the kernel reads bf16 and accumulates in fp32), and ``folded``'s
# copies cost several times the kernel in channels_last. On CUDA ``folded``: one kernel
# instead of W launches per layer, where launches dominate small batches; not measured yet
# (``make gpu-check`` times the three against each other, bench item 2 on the GPU).
CHUNKED_BN_VARIANTS = ("per_worker", "folded", "hand_written")
# {device type: {layout of the input: variant}}; devices not named here use the CPU's
CHUNKED_BN_DEFAULT = {"cpu": {"nchw": "per_worker", "channels_last": "per_worker"},
                      "cuda": {"nchw": "folded", "channels_last": "folded"}}
_chunked_bn_choice: str | None = None  # set by use_chunked_bn; None: the device's default


@contextlib.contextmanager
def use_chunked_bn(variant: str | None) -> Iterator[None]:
    """Within the block, per-worker BN (:class:`VirtualBatchNorm2d` with several chunks) uses
    ``variant`` (one of :data:`CHUNKED_BN_VARIANTS`; None: the device's default). For the
    benchmark and the tests: the variants differ in speed, not in what they compute."""
    global _chunked_bn_choice
    if variant is not None and variant not in CHUNKED_BN_VARIANTS:
        raise NormConfigError(f"chunked BN variant {variant!r} is unknown; choose one of: "
                              f"{', '.join(CHUNKED_BN_VARIANTS)}")
    previous, _chunked_bn_choice = _chunked_bn_choice, variant
    try:
        yield
    finally:
        _chunked_bn_choice = previous


def chunked_bn_variant(x: torch.Tensor) -> str:
    """The per-worker BN implementation used now for an input like ``x`` (its device and
    memory format)."""
    if _chunked_bn_choice is not None:
        return _chunked_bn_choice
    defaults = CHUNKED_BN_DEFAULT.get(x.device.type, CHUNKED_BN_DEFAULT["cpu"])
    return defaults["channels_last" if _is_channels_last(x) else "nchw"]


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _statistics_table(workers: int, channels: int, like: torch.Tensor,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (W, C) tables for the kernel to write each chunk's mean and unbiased variance
    into (as its running statistics at momentum 1, which replaces what they held)."""
    return (torch.zeros(workers, channels, dtype=dtype, device=like.device),
            torch.ones(workers, channels, dtype=dtype, device=like.device))


def per_worker_batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float, chunk: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BN of each chunk of ``chunk`` images of ``x`` by the library kernel, one
    call per chunk. Returns the output (memory format of ``x``) and (W, C) tables of the
    chunks' means and unbiased variances (no gradient)."""
    parts = x.split(chunk)  # views; contiguous in NCHW and channels_last (N is outermost)
    mean, var = _statistics_table(len(parts), x.shape[1], x, weight.dtype)
    outs = [F.batch_norm(part, mean[w], var[w], weight, bias, True, 1.0, eps)
            for w, part in enumerate(parts)]
    return torch.cat(outs), mean, var


def folded_batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`per_worker_batch_norm`, by one call of the library kernel: the W chunks of
    (B, C, H, W) become one batch (B, W * C, H, W) whose channel w * C + c is channel c of
    chunk w."""
    n, channels, height, width = x.shape
    workers = n // chunk
    memory_format = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    folded = (x.view(workers, chunk, channels, height, width).transpose(0, 1)
              .reshape(chunk, workers * channels, height, width)
              .contiguous(memory_format=memory_format))
    mean, var = _statistics_table(workers, channels, x, weight.dtype)
    out = F.batch_norm(folded, mean.view(-1), var.view(-1), weight.repeat(workers),
                       bias.repeat(workers), True, 1.0, eps)
    out = (out.view(chunk, workers, channels, height, width).transpose(0, 1)
           .reshape(n, channels, height, width).contiguous(memory_format=memory_format))
    return out, mean, var


def hand_written_batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float, chunk: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`per_worker_batch_norm`, by :class:`ChunkBatchNorm`."""
    out, mean, var = ChunkBatchNorm.apply(x, weight, bias, eps, chunk)
    values = x[:chunk].numel() // x.shape[1]  # per chunk and channel: B * H * W
    return out, mean, var * (values / (values - 1))


_CHUNKED_BN = {"per_worker": per_worker_batch_norm, "folded": folded_batch_norm,
               "hand_written": hand_written_batch_norm}


class VirtualBatchNorm2d(BatchStatistics, nn.BatchNorm2d):
    """BatchNorm whose training statistics are taken per chunk of ``virtual_batch`` images.

    With ``virtual_batch=None`` (or a batch of exactly that size) this is ``nn.BatchNorm2d``.
    With a batch of ``W * virtual_batch`` images it computes what ``W`` data-parallel workers
    with unsynchronized BN compute: chunk ``w`` is normalized by its own mean and variance. How
    (the library's kernel once per worker, once with the workers folded into the channels, or
    hand-written passes) is chosen per device and layout: :data:`CHUNKED_BN_DEFAULT`.

    Running statistics: each chunk's moments are averaged over the ``W`` chunks and then folded
    into the moving average, i.e. ``running_mean <- (1 - m) * running_mean + m * mean_w(mu_w)``
    and the same with the unbiased chunk variances. Because the moving average is linear, this is
    exactly the average of the ``W`` running estimates that ``W`` separate workers would keep.
    """

    running_stat_names = ("running_mean", "running_var")

    def __init__(self, num_features: int, *, eps: float = EPS, momentum: float = 0.1,
                 virtual_batch: int | None = None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self._init_batch_statistics(virtual_batch)

    def values_per_statistic(self, batch: int, channels: int, height: int, width: int) -> int:
        return batch * height * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._refuse_single_values(x, self.virtual_batch or x.shape[0])
        plain_step = self.stats_mode == "update" and self.virtual_batch in (None, x.shape[0])
        if not self.training or plain_step:
            return super().forward(x)  # torch's kernel: eval mode, or one worker per process
        return self._chunked_forward(x)

    def _chunked_forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = worker_chunks(x, self.virtual_batch, type(self).__name__)  # checks the shape
        batch_norm = _CHUNKED_BN[chunked_bn_variant(x)]
        y, mean, var = batch_norm(x, self.weight, self.bias, self.eps, chunks.shape[1])
        self._absorb({"running_mean": mean, "running_var": var})
        return y

    def _count_step(self) -> None:
        self.num_batches_tracked.add_(1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch={self.virtual_batch}"


class BatchRenorm2d(BatchStatistics, nn.Module):
    """Batch Renormalization (Ioffe 2017, Algorithm 1), statistics per virtual worker.

    Training, per chunk (worker) of B images, per channel::

        mu_B = mean(x),  sigma_B = sqrt(var(x) + eps)           (biased variance, over B, H, W)
        r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
        d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
        mu <- mu + momentum * (mu_B - mu),  sigma <- sigma + momentum * (sigma_B - sigma)

    Inference: ``y = gamma * (x - mu) / sigma + beta`` (``sigma`` already holds eps). The moving
    averages take the mean over chunks, like :class:`VirtualBatchNorm2d`.

    Schedule (Ioffe 2017, section 4), in fractions of the run's training steps: plain BN
    (``r_max = 1``, ``d_max = 0``) until ``warmup_until``, then both limits relax linearly to
    ``r_max`` and ``d_max``, reached at ``r_max_reached_at`` and ``d_max_reached_at``. Fractions,
    not step counts, so that runs of the same length in epochs get the same schedule whatever
    their batch (batch 2 takes 16 times the steps of batch 32) and a short run is not plain BN
    throughout. Ioffe's ImageNet run (about 130k steps) had 5k steps of plain BN, d_max reached
    at 25k and r_max at 40k: the defaults 0.04, 0.2 and 0.3 are those fractions, rounded.

    The layer needs the run's length: :func:`set_total_steps` sets ``total_steps`` (the trainer
    calls it once, before training); a training-mode forward without it is an error. The steps
    done are the buffer ``steps`` (training-mode forwards in ``update`` mode), so they travel
    with the state dict and a resumed run continues the schedule. Defaults: ``momentum = 0.01``
    (Ioffe 2017); the limits ``r_max = 1.5``, ``d_max = 0.5`` that the GN paper used for
    ResNet-50 (Ioffe's were 3 and 5).
    """

    running_stat_names = ("running_mean", "running_std")

    def __init__(self, num_features: int, *, eps: float = EPS, momentum: float = 0.01,
                 r_max: float = 1.5, d_max: float = 0.5, warmup_until: float = 0.04,
                 r_max_reached_at: float = 0.3, d_max_reached_at: float = 0.2,
                 virtual_batch: int | None = None) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.r_max, self.d_max = r_max, d_max
        self.warmup_until = warmup_until
        self.r_max_reached_at, self.d_max_reached_at = r_max_reached_at, d_max_reached_at
        self.total_steps: int | None = None  # the run's training steps: set_total_steps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self._init_batch_statistics(virtual_batch)

    def values_per_statistic(self, batch: int, channels: int, height: int, width: int) -> int:
        return batch * height * width

    def clip_limits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_max, d_max) at the current step; tensors, so reading the step needs no sync."""
        if self.total_steps is None:
            where = f" at layer {self.layer_name}" if self.layer_name else ""
            raise NormConfigError(
                f"{type(self).__name__}{where}: the run's number of training steps is not set "
                f"(the r_max / d_max schedule is in fractions of the run); call "
                f"normbench.norms.set_total_steps(model, steps) once before training")
        done = self.steps.to(self.running_std.dtype) / self.total_steps  # fraction of the run
        return (self._relaxed(1.0, self.r_max, done, self.r_max_reached_at),
                self._relaxed(0.0, self.d_max, done, self.d_max_reached_at))

    def _relaxed(self, start: float, limit: float, done: torch.Tensor,
                 reached_at: float) -> torch.Tensor:
        """The limit when the fraction ``done`` of the run is done: ``start`` until
        ``warmup_until``, then linear up to ``limit`` at ``reached_at``, then ``limit``."""
        since_warmup = done - self.warmup_until
        if reached_at > self.warmup_until:
            progress = (since_warmup / (reached_at - self.warmup_until)).clamp(0.0, 1.0)
        else:
            progress = (since_warmup >= 0).to(done.dtype)
        return start + (limit - start) * progress

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            scale = self.weight / self.running_std
            shift = self.bias - self.running_mean * scale
            return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        self._refuse_single_values(x, self.virtual_batch or x.shape[0])
        chunks = worker_chunks(x, self.virtual_batch, type(self).__name__)
        mean, var = chunk_moments(chunks)
        std = torch.sqrt(var + self.eps)
        r, d = self._corrections(mean, std)
        self._absorb({"running_mean": per_chunk(mean), "running_std": per_chunk(std)})
        scale = channel_view(self.weight) * r / std
        shift = channel_view(self.bias) + channel_view(self.weight) * d - mean * scale
        return (chunks * scale + shift).flatten(0, 1)

    @torch.no_grad()
    def _corrections(self, mean: torch.Tensor, std: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """r and d of each chunk, clipped to the schedule's limits; no gradient flows through."""
        r_max, d_max = self.clip_limits()
        sigma, mu = channel_view(self.running_std), channel_view(self.running_mean)
        r = torch.clamp(std / sigma, min=1 / r_max, max=r_max)
        d = torch.clamp((mean - mu) / sigma, min=-d_max, max=d_max)
        return r, d

    def _count_step(self) -> None:
        self.steps.add_(1)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"r_max={self.r_max}, d_max={self.d_max}, warmup_until={self.warmup_until}, "
                f"r_max_reached_at={self.r_max_reached_at}, "
                f"d_max_reached_at={self.d_max_reached_at}, total_steps={self.total_steps}, "
                f"virtual_batch={self.virtual_batch}")


def set_total_steps(model: nn.Module, total_steps: int) -> None:
    """Give every layer of ``model`` whose training follows a schedule over the run (BRN's
    r_max / d_max relaxation, :class:`BatchRenorm2d`) the run's number of training steps. Call
    it once before training (again after changing the run's length); the steps already done are
    counted by the layers themselves, in their state dict."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} is not allowed; it must be an integer "
                         f">= 1 (the run's training steps)")
    for m in model.modules():
        if isinstance(m, BatchRenorm2d):
            m.total_steps = total_steps


def name_batch_statistics_layers(model: nn.Module) -> None:
    """Give each batch-dependent layer of ``model`` its qualified name (``layer_name``), so that
    its errors in training say which layer (e.g. a single value per statistic)."""
    for name, m in model.named_modules():
        if isinstance(m, BatchStatistics):
            m.layer_name = name


# ---- synchronized BN -------------------------------------------------------------------------
class AllGather(torch.autograd.Function):
    """Every process's tensor, stacked in rank order: (processes, *shape), differentiable.

    Every process uses the whole stack, so the gradient of a process's own tensor is the sum,
    over the processes, of the gradients that reach its row: an all-reduce of the stack's
    gradient, then this process's row. Works with gloo (CPU) and NCCL (torch's
    ``torch.distributed.nn.all_gather`` needs reduce_scatter, which gloo lacks)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[dist.get_rank()]


def distributed_world() -> bool:
    """Whether torch.distributed runs more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def merge_moments(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean and M2 (sum of squared deviations from the mean) of the union of parts,
    from each part's: ``counts`` (P,), ``means`` and ``m2s`` (P, C). Differentiable.

    Chan, Golub & LeVeque's parallel formula (1979), for P parts at once::

        n = sum_i n_i        mean = sum_i n_i mean_i / n
        M2 = sum_i M2_i + sum_i n_i (mean_i - mean)^2

    Each part's M2 comes from deviations from its own mean, so nothing cancels: the sums
    S2 / n - mean^2 lose every digit the mean has over the spread (in float32 at |mean| / std
    = 300, a variance error of a few percent; here that of torch's own BN)."""
    count = counts.sum()
    mean = (counts.unsqueeze(1) * means).sum(0) / count
    m2 = m2s.sum(0) + (counts.unsqueeze(1) * (means - mean).square()).sum(0)
    return count, mean, m2


class SyncBatchNorm2d(VirtualBatchNorm2d):
    """BN whose statistics cover every worker of the step, virtual and real.

    One process: BN over the whole batch (``batch * workers`` images); ``virtual_batch`` is
    ignored in training. Several processes (torch.distributed initialized, world size > 1): each
    process takes the count, mean and M2 (sum of squared deviations from its own mean, two
    passes) of each channel over its images; :class:`AllGather` (gloo on CPU, NCCL on GPU;
    ``torch.nn.SyncBatchNorm`` refuses CPU modules) brings every process's to every process, and
    :func:`merge_moments` (Chan et al.) gives the step's mean and biased variance ``M2 / n``,
    which normalize every process's images. The gradient flows through the gathered moments to
    every process's input. The running statistics are updated from the step's moments
    (unbiased variance ``M2 / (n - 1)``).

    The evaluation tools of :mod:`normbench.bn_eval` (``frozen`` / ``collect`` modes) take
    statistics per chunk of ``virtual_batch`` images on this process only; they set
    ``virtual_batch`` to the step's batch for the time of the evaluation.
    """

    def __init__(self, num_features: int, *, eps: float = EPS, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, virtual_batch=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.stats_mode == "update" and distributed_world():
            return self._synchronized_forward(x)
        return super().forward(x)

    def _synchronized_forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = full_precision(x)
        channels = x.shape[1]
        mean, var = moments(xf, (0, 2, 3))
        values = x.numel() // channels
        count = torch.full((1,), values, dtype=xf.dtype, device=x.device)
        local = torch.cat([count, mean.flatten(), var.flatten() * values])
        parts = AllGather.apply(local)  # (processes, 1 + 2 * channels)
        n, mean, m2 = merge_moments(parts[:, 0], parts[:, 1:channels + 1],
                                    parts[:, channels + 1:])
        self._absorb({"running_mean": mean.unsqueeze(0),
                      "running_var": (m2 / (n - 1)).unsqueeze(0)})
        scale = torch.rsqrt(m2 / n + self.eps) * self.weight
        # (x - mean) first: x * scale + (bias - mean * scale) would cancel |mean| / std digits
        return (x - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


# ---- batch-independent layers ----------------------------------------------------------------
class GroupNorm2d(nn.GroupNorm):
    """``nn.GroupNorm`` with a name that says which family it stands for (gn, ln or in)."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = EPS, kind: str = "gn"):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.kind = kind

    def values_per_statistic(self, batch: int, channels: int, height: int, width: int) -> int:
        return (channels // self.num_groups) * height * width

    def extra_repr(self) -> str:
        return f"{self.kind}: {super().extra_repr()}"


class FilterResponseNorm2d(nn.Module):
    """Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan 2019).

    Per sample and channel, over the N = H * W positions::

        nu2 = sum_i x_i^2 / N            x_hat = x / sqrt(nu2 + eps)
        y = gamma * x_hat + beta         z = max(y, tau)            (TLU, tau learned)

    No mean is subtracted; TLU's learned threshold makes up for it. ``apply_act=False`` (a unit
    with no activation, e.g. the last of a residual branch) leaves out the TLU: ``z = y``.
    ``learnable_eps`` is the paper's remedy for 1x1 maps (section 3.3), where ``nu2 = x^2`` and
    with a tiny eps ``x_hat`` collapses to sign(x), which passes no gradient: the eps becomes
    ``eps + |eps_learned|``, with ``eps_learned`` starting at 1e-4 (it must start away from 0,
    where |.| has no gradient), and ``x_hat = x / sqrt(x^2 + eps)`` is a smooth function the
    network can tune. So a layer with a learned eps may normalize a single value per statistic
    (``min_values_per_statistic = 1``); one without may not (2, like every norm).
    """

    def __init__(self, num_features: int, *, eps: float = FRN_EPS, learnable_eps: bool = False,
                 apply_act: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps, self.apply_act = num_features, eps, apply_act
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.tau = nn.Parameter(torch.zeros(num_features)) if apply_act else None
        self.eps_learned = nn.Parameter(torch.tensor(1e-4)) if learnable_eps else None
        self.min_values_per_statistic = 1 if learnable_eps else MIN_VALUES_PER_STATISTIC

    def values_per_statistic(self, batch: int, channels: int, height: int, width: int) -> int:
        return height * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps_learned is None else self.eps + self.eps_learned.abs()
        nu2 = full_precision(x).square().mean(dim=(2, 3), keepdim=True)
        y = x * torch.rsqrt(nu2 + eps) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return torch.maximum(y, self.tau.view(1, -1, 1, 1)) if self.apply_act else y

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, "
                f"learnable_eps={self.eps_learned is not None}, apply_act={self.apply_act}")


# ---- EvoNorm (Liu, Brock, Simonyan & Le 2020) ------------------------------------------------
# Both layers fuse normalization and activation. Without their nonlinearity (`apply_act=False`:
# units with no activation, such as the last of a residual branch or a projection shortcut) the
# authors' reference code (tensorflow/tpu, `evonorm(..., nonlinearity=False)`) applies the affine
# transform only, and so do these layers: such a layer has no statistics.
def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


class EvoNormS0(nn.Module):
    """EvoNorm-S0, batch-independent::

        y = x * sigmoid(v1 * x) / sqrt(s2_{c/g,h,w}(x) + eps) * gamma + beta

    ``s2_{c/g,h,w}`` is the (biased) variance of each sample's group of C/G channels, over
    (C/G, H, W), as in GN; ``v1``, ``gamma``, ``beta`` are per channel (v1 starts at 1).
    """

    def __init__(self, num_features: int, *, groups: int = 32, eps: float = EPS,
                 apply_act: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps, self.apply_act = num_features, eps, apply_act
        self.groups = groups_for(num_features, groups, None, norm="evonorm_s0") if apply_act \
            else groups
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features)) if apply_act else None

    def values_per_statistic(self, batch: int, channels: int, height: int, width: int
                             ) -> int | None:
        return (channels // self.groups) * height * width if self.apply_act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.apply_act:
            return _affine(x, self.weight, self.bias)
        n, c = x.shape[:2]
        var = moments(full_precision(x).reshape(n, self.groups, -1), (2,))[1].squeeze(2)
        std = torch.sqrt(var + self.eps).repeat_interleave(c // self.groups, dim=1)
        y = x * torch.sigmoid(self.v.view(1, -1, 1, 1) * x) / std.view(n, c, 1, 1)
        return _affine(y, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, groups={self.groups}, eps={self.eps}, "
                f"apply_act={self.apply_act}")


class EvoNormB0(BatchStatistics, nn.Module):
    """EvoNorm-B0, batch-dependent, statistics per virtual worker::

        y = x / max(sqrt(s2_{b,h,w}(x) + eps), v1 * x + sqrt(s2_{h,w}(x) + eps)) * gamma + beta

    ``s2_{b,h,w}`` is the (biased) variance of each channel over the chunk's (B, H, W) in
    training and the running variance in eval mode; ``s2_{h,w}`` the variance of each sample's
    channel over (H, W). The running variance follows the reference code: moving average of the
    biased batch variance at rate ``momentum`` (0.1, i.e. TF's decay 0.9), starting at 1.
    """

    def __init__(self, num_features: int, *, eps: float = EPS, momentum: float = 0.1,
                 virtual_batch: int | None = None, apply_act: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.apply_act = apply_act
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features)) if apply_act else None
        if apply_act:  # an affine-only layer keeps no statistics
            self.running_stat_names = ("running_var",)
            self.register_buffer("running_var", torch.ones(num_features))
        self._init_batch_statistics(virtual_batch)

    def values_per_statistic(self, batch: int, channels: int, height: int, width: int
                             ) -> int | None:
        # the per-sample variance s2_{h,w} is the smaller of the two
        return height * width if self.apply_act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.apply_act:
            return _affine(x, self.weight, self.bias)
        if self.training:
            chunks = worker_chunks(x, self.virtual_batch, type(self).__name__)
            batch_var = chunk_moments(chunks)[1]
            self._absorb({"running_var": per_chunk(batch_var)})
        else:
            chunks, batch_var = x.unsqueeze(0), channel_view(self.running_var)
        instance_var = moments(full_precision(chunks), (3, 4))[1]
        left = torch.sqrt(batch_var + self.eps)
        right = channel_view(self.v) * chunks + torch.sqrt(instance_var + self.eps)
        y = (chunks / torch.maximum(left, right)).flatten(0, 1)
        return _affine(y, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"virtual_batch={self.virtual_batch}, apply_act={self.apply_act}")


# ---- Weight Standardization --------------------------------------------------------------------
class WSConv2d(nn.Conv2d):
    """A conv whose weight is standardized in every forward (Qiao et al. 2019, section 3)::

        W_hat[i] = (W[i] - mean(W[i])) / sqrt(var(W[i]) + eps)

    per output channel i, over its in_channels * kh * kw weights (biased variance, the paper's
    formula; the authors' code divides by the unbiased std + 1e-5 instead, a difference far below
    what the following norm can see). Parameters and state dict are those of ``nn.Conv2d``.
    """

    eps = WS_EPS

    def standardized_weight(self) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), correction=0, keepdim=True)
        return (self.weight - mean) / torch.sqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


# ---- the registry ------------------------------------------------------------------------------
def groups_for(num_channels: int, groups: int | None, group_channels: int | None,
               norm: str = "gn") -> int:
    """Number of groups: from ``group_channels`` (channels per group) when it is set, else
    ``groups``. Raises, naming ``norm``, when the grouping does not divide ``num_channels``."""
    if group_channels is not None:
        if group_channels < 1 or num_channels % group_channels:
            raise NormConfigError(f"{norm}: group_channels={group_channels} does not divide "
                                  f"{num_channels} channels")
        return num_channels // group_channels
    if groups is None or groups < 1 or num_channels % groups:
        advice = ", or set group_channels" if norm == "gn" else ""
        raise NormConfigError(f"{norm}: groups={groups} does not divide {num_channels} channels "
                              f"(choose a divisor of {num_channels}{advice})")
    return groups


def _build_bn(num_channels: int, *, eps: float = EPS, momentum: float = 0.1,
              virtual_batch: int | None = None) -> nn.Module:
    return VirtualBatchNorm2d(num_channels, eps=eps, momentum=momentum, virtual_batch=virtual_batch)


def _build_brn(num_channels: int, *, eps: float = EPS, momentum: float = 0.01,
               r_max: float = 1.5, d_max: float = 0.5, warmup_until: float = 0.04,
               r_max_reached_at: float = 0.3, d_max_reached_at: float = 0.2,
               virtual_batch: int | None = None) -> nn.Module:
    for key, value in (("r_max", r_max), ("d_max", d_max), ("warmup_until", warmup_until),
                       ("r_max_reached_at", r_max_reached_at),
                       ("d_max_reached_at", d_max_reached_at)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise NormConfigError(f"brn: {key}={value!r} is not allowed; it must be a number")
    if r_max < 1 or d_max < 0:
        raise NormConfigError(f"brn: r_max={r_max}, d_max={d_max} are not allowed; r_max must "
                              f"be >= 1 and d_max >= 0")
    if not 0 <= warmup_until <= 1:
        raise NormConfigError(f"brn: warmup_until={warmup_until} is not allowed; it is a "
                              f"fraction of the run's training steps, between 0 and 1")
    for key, fraction in (("r_max_reached_at", r_max_reached_at),
                          ("d_max_reached_at", d_max_reached_at)):
        if not warmup_until <= fraction <= 1:
            raise NormConfigError(f"brn: {key}={fraction} is not allowed with warmup_until="
                                  f"{warmup_until}; it is a fraction of the run's training "
                                  f"steps, between warmup_until and 1")
    return BatchRenorm2d(num_channels, eps=eps, momentum=momentum, r_max=r_max, d_max=d_max,
                         warmup_until=warmup_until, r_max_reached_at=r_max_reached_at,
                         d_max_reached_at=d_max_reached_at, virtual_batch=virtual_batch)


def _build_syncbn(num_channels: int, *, eps: float = EPS, momentum: float = 0.1,
                  virtual_batch: int | None = None) -> nn.Module:
    # virtual_batch is ignored: the statistics cover every worker of the step
    return SyncBatchNorm2d(num_channels, eps=eps, momentum=momentum)


def _build_gn(num_channels: int, *, groups: int | None = 32, group_channels: int | None = None,
              eps: float = EPS) -> nn.Module:
    return GroupNorm2d(groups_for(num_channels, groups, group_channels), num_channels, eps=eps)


def _build_ln(num_channels: int, *, eps: float = EPS) -> nn.Module:
    return GroupNorm2d(1, num_channels, eps=eps, kind="ln")


def _build_in(num_channels: int, *, eps: float = EPS) -> nn.Module:
    return GroupNorm2d(num_channels, num_channels, eps=eps, kind="in")


def _build_frn(num_channels: int, *, eps: float = FRN_EPS, learnable_eps: bool = False,
               apply_act: bool = True) -> nn.Module:
    return FilterResponseNorm2d(num_channels, eps=eps, learnable_eps=learnable_eps,
                                apply_act=apply_act)


def _build_evonorm_b0(num_channels: int, *, eps: float = EPS, momentum: float = 0.1,
                      virtual_batch: int | None = None, apply_act: bool = True) -> nn.Module:
    return EvoNormB0(num_channels, eps=eps, momentum=momentum, virtual_batch=virtual_batch,
                     apply_act=apply_act)


def _build_evonorm_s0(num_channels: int, *, groups: int = 32, eps: float = EPS,
                      apply_act: bool = True) -> nn.Module:
    return EvoNormS0(num_channels, groups=groups, eps=eps, apply_act=apply_act)


def _build_none(num_channels: int) -> nn.Module:
    return nn.Identity()


@dataclass(frozen=True)
class NormSpec:
    """One registry entry: how to build the layer and what the rest of the code must know."""

    build: Callable[..., nn.Module]
    batch_dependent: bool  # statistics mix images of a worker's batch (BN-like)
    min_batch: int  # smallest statistics batch the layer can train with (see step_statistics)
    summary: str
    # statistics over every worker of the step (batch * workers images), not per worker
    step_statistics: bool = False
    # the layer includes its own nonlinearity and takes the place of the unit's activation;
    # its builder takes `apply_act` (False in units that have no activation)
    replaces_activation: bool = False
    # `channels_last: auto` turns the channels_last (NHWC) memory format on for this norm on
    # CUDA: its kernels (torch's BN, elementwise ops, reductions) work on NHWC tensors without
    # copies. False where they do not: torch's GroupNorm kernel is slower in NHWC (timm's
    # published figures: GN at 0.40x BN in NHWC against 0.64x in NCHW), and EvoNorm-S0's
    # grouped reshape copies an NHWC tensor. See normbench/fast_paths.py.
    channels_last: bool = True


NORMS: dict[str, NormSpec] = {
    "bn": NormSpec(_build_bn, batch_dependent=True, min_batch=2,
                   summary="BatchNorm, statistics per worker (virtual workers: per chunk)"),
    "brn": NormSpec(_build_brn, batch_dependent=True, min_batch=2,
                    summary="Batch Renormalization (Ioffe 2017), statistics per worker"),
    "syncbn": NormSpec(_build_syncbn, batch_dependent=True, min_batch=2, step_statistics=True,
                       summary="BatchNorm with statistics over every worker of the step"),
    "gn": NormSpec(_build_gn, batch_dependent=False, min_batch=1, channels_last=False,
                   summary="GroupNorm, `groups` groups or `group_channels` channels per group"),
    "ln": NormSpec(_build_ln, batch_dependent=False, min_batch=1, channels_last=False,
                   summary="LayerNorm as in the GN paper: GN with one group, per-channel affine"),
    "in": NormSpec(_build_in, batch_dependent=False, min_batch=1, channels_last=False,
                   summary="InstanceNorm as in the GN paper: GN with one group per channel, "
                           "per-channel affine"),
    "frn": NormSpec(_build_frn, batch_dependent=False, min_batch=1, replaces_activation=True,
                    summary="Filter Response Normalization with TLU (Singh & Krishnan 2019)"),
    "evonorm_b0": NormSpec(_build_evonorm_b0, batch_dependent=True, min_batch=2,
                           replaces_activation=True,
                           summary="EvoNorm-B0 (Liu et al. 2020), batch variance per worker"),
    "evonorm_s0": NormSpec(_build_evonorm_s0, batch_dependent=False, min_batch=1,
                           replaces_activation=True, channels_last=False,
                           summary="EvoNorm-S0 (Liu et al. 2020), grouped, batch-independent"),
    "none": NormSpec(_build_none, batch_dependent=False, min_batch=1, summary="no normalization"),
}

# Builder arguments that the model supplies, not the user: not options, not in the YAML.
_STRUCTURAL_ARGS = ("virtual_batch", "apply_act")


def norm_spec(name: str) -> NormSpec:
    """The registry entry for ``name``; an unknown name fails listing the known ones."""
    try:
        return NORMS[name]
    except KeyError:
        raise NormConfigError(f"unknown norm {name!r}; known norms: {', '.join(NORMS)}") from None


def norm_options(name: str) -> dict[str, Any]:
    """The options norm ``name`` takes, with the library's defaults (the papers' values)."""
    params = inspect.signature(norm_spec(name).build).parameters.values()
    return {p.name: p.default for p in params
            if p.kind is p.KEYWORD_ONLY and p.name not in _STRUCTURAL_ARGS}


def build_norm(name: str, num_channels: int, *, virtual_batch: int | None = None,
               with_activation: bool = True, **options: Any) -> nn.Module:
    """Build the norm ``name`` for ``num_channels`` channels.

    ``options`` are the norm's own settings (``groups``, ``group_channels``, ``eps``, ...; see
    :func:`norm_options` and ``conf/norm/<name>.yaml``). ``virtual_batch`` is the per-worker
    batch, used only by batch-dependent norms. ``with_activation`` matters only to norms that
    replace the activation: False builds them without their nonlinearity, for units that have
    no activation. An option the norm does not take is an error.
    """
    spec = norm_spec(name)
    unknown = sorted(set(options) - set(norm_options(name)))
    if unknown:
        raise NormConfigError(f"norm {name!r} does not take option(s) {', '.join(unknown)}; "
                              f"its options are: {', '.join(norm_options(name)) or 'none'}")
    if spec.batch_dependent:
        options["virtual_batch"] = virtual_batch
    if spec.replaces_activation:
        options["apply_act"] = with_activation
    return spec.build(num_channels, **options)


def min_values_per_statistic(layer: nn.Module) -> int:
    """The fewest values ``layer`` (a norm layer) can take a statistic over in training:
    :data:`MIN_VALUES_PER_STATISTIC`, or 1 for a layer that says it can (FRN with a learned
    eps, the case that option exists for)."""
    return getattr(layer, "min_values_per_statistic", MIN_VALUES_PER_STATISTIC)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every norm layer in ``model`` (those that define
    ``values_per_statistic``; it returns None for a layer without statistics)."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "values_per_statistic")]


# Activations by name. `act` in the config picks one; every position gets its own module so that
# activations with parameters (PReLU) are not shared across layers.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "prelu": nn.PReLU,
    "silu": lambda: nn.SiLU(inplace=True),
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def build_activation(name: str) -> nn.Module:
    """The activation ``name``; an unknown name fails listing the known ones."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise NormConfigError(f"unknown act {name!r}; known activations: "
                              f"{', '.join(ACTIVATIONS)}") from None


__all__ = ["ACTIVATIONS", "CHUNKED_BN_DEFAULT", "CHUNKED_BN_VARIANTS", "EPS", "FRN_EPS",
           "MIN_VALUES_PER_STATISTIC", "NORMS", "STATS_MODES", "WS_EPS", "AllGather",
           "BatchRenorm2d", "BatchStatistics", "ChunkBatchNorm", "EvoNormB0", "EvoNormS0",
           "FilterResponseNorm2d", "GroupNorm2d", "NormConfigError", "NormSpec", "StatisticsSum",
           "SyncBatchNorm2d", "VirtualBatchNorm2d", "WSConv2d", "build_activation", "build_norm",
           "chunk_moments", "chunked_bn_variant", "distributed_world", "folded_batch_norm",
           "groups_for", "hand_written_batch_norm", "merge_moments", "min_values_per_statistic",
           "moments", "name_batch_statistics_layers", "norm_layers", "norm_options", "norm_spec",
           "per_worker_batch_norm", "set_total_steps", "use_chunked_bn", "worker_chunks"]
