"""Normalization layers and the one registry that names them.

A norm is named by a string (``bn``, ``gn``, ``ln``, ``in``, ``none``, ...) and built by
:func:`build_norm`. Each entry of :data:`NORMS` says whether the layer's statistics depend on the
other images of the batch (``batch_dependent``): those layers take their statistics per chunk of
``virtual_batch`` images, which is how one process runs several *virtual workers* (DESIGN.md).

``ln`` and ``in`` have the GN paper's meaning: GroupNorm with one group (statistics over C, H, W
of each sample) and with one group per channel, both with a per-channel affine gamma and beta.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

EPS = 1e-5  # the paper's epsilon for every norm


class NormConfigError(ValueError):
    """A norm was asked for with a name or options it does not accept."""


class VirtualBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are taken per chunk of ``virtual_batch`` images.

    With ``virtual_batch=None`` (or a batch of exactly that size) this is ``nn.BatchNorm2d``.
    With a batch of ``W * virtual_batch`` images it computes, in one vectorized pass, what ``W``
    data-parallel workers with unsynchronized BN compute: chunk ``w`` is normalized by its own
    mean and variance.

    Running statistics: each chunk's moments are averaged over the ``W`` chunks and then folded
    into the moving average, i.e. ``running_mean <- (1 - m) * running_mean + m * mean_w(mu_w)``
    and the same with the unbiased chunk variances. Because the moving average is linear, this is
    exactly the average of the ``W`` running estimates that ``W`` separate workers would keep.
    """

    def __init__(self, num_features: int, *, eps: float = EPS, momentum: float = 0.1,
                 virtual_batch: int | None = None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.virtual_batch = virtual_batch

    def values_per_statistic(self, batch: int, channels: int, height: int, width: int) -> int:
        return batch * height * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunk = self.virtual_batch
        if not self.training or chunk is None or x.shape[0] == chunk:
            return super().forward(x)
        if x.shape[0] % chunk:
            raise ValueError(f"{type(self).__name__}: a batch of {x.shape[0]} images is not a "
                             f"multiple of the per-worker batch {chunk}")
        return self._chunked_forward(x, chunk)

    def _chunked_forward(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        n, c, h, w = x.shape
        chunks = x.view(n // chunk, chunk, c, h, w)
        var, mean = torch.var_mean(chunks, dim=(1, 3, 4), correction=0, keepdim=True)
        scale = torch.rsqrt(var + self.eps) * self.weight.view(1, 1, c, 1, 1)
        shift = self.bias.view(1, 1, c, 1, 1) - mean * scale
        if self.track_running_stats:
            self._update_running_stats(mean, var, values=chunk * h * w)
        return (chunks * scale + shift).view(n, c, h, w)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, values: int) -> None:
        chunk_means = mean.flatten(1).to(self.running_mean.dtype).mean(0)
        chunk_vars = var.flatten(1).to(self.running_var.dtype).mean(0) * (values / (values - 1))
        self.running_mean.lerp_(chunk_means, self.momentum)
        self.running_var.lerp_(chunk_vars, self.momentum)
        self.num_batches_tracked.add_(1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch={self.virtual_batch}"


class GroupNorm2d(nn.GroupNorm):
    """``nn.GroupNorm`` with a name that says which family it stands for (gn, ln or in)."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = EPS, kind: str = "gn"):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.kind = kind

    def values_per_statistic(self, batch: int, channels: int, height: int, width: int) -> int:
        return (channels // self.num_groups) * height * width

    def extra_repr(self) -> str:
        return f"{self.kind}: {super().extra_repr()}"


def groups_for(num_channels: int, groups: int | None, group_channels: int | None) -> int:
    """Number of GN groups: from ``group_channels`` (channels per group) when it is set, else
    ``groups``. Raises when the grouping does not divide ``num_channels``."""
    if group_channels is not None:
        if group_channels < 1 or num_channels % group_channels:
            raise NormConfigError(f"gn: group_channels={group_channels} does not divide "
                                  f"{num_channels} channels")
        return num_channels // group_channels
    if groups is None or groups < 1 or num_channels % groups:
        raise NormConfigError(f"gn: groups={groups} does not divide {num_channels} channels "
                              f"(choose a divisor of {num_channels}, or set group_channels)")
    return groups


def _build_bn(num_channels: int, *, eps: float = EPS, momentum: float = 0.1,
              virtual_batch: int | None = None) -> nn.Module:
    return VirtualBatchNorm2d(num_channels, eps=eps, momentum=momentum, virtual_batch=virtual_batch)


def _build_gn(num_channels: int, *, groups: int | None = 32, group_channels: int | None = None,
              eps: float = EPS) -> nn.Module:
    return GroupNorm2d(groups_for(num_channels, groups, group_channels), num_channels, eps=eps)


def _build_ln(num_channels: int, *, eps: float = EPS) -> nn.Module:
    return GroupNorm2d(1, num_channels, eps=eps, kind="ln")


def _build_in(num_channels: int, *, eps: float = EPS) -> nn.Module:
    return GroupNorm2d(num_channels, num_channels, eps=eps, kind="in")


def _build_none(num_channels: int) -> nn.Module:
    return nn.Identity()


@dataclass(frozen=True)
class NormSpec:
    """One registry entry: how to build the layer and what the rest of the code must know."""

    build: Callable[..., nn.Module]
    batch_dependent: bool  # statistics mix images of a worker's batch (BN-like)
    min_batch: int  # smallest images-per-worker the layer can train with
    summary: str


NORMS: dict[str, NormSpec] = {
    "bn": NormSpec(_build_bn, batch_dependent=True, min_batch=2,
                   summary="BatchNorm, statistics per worker (virtual workers: per chunk)"),
    "gn": NormSpec(_build_gn, batch_dependent=False, min_batch=1,
                   summary="GroupNorm, `groups` groups or `group_channels` channels per group"),
    "ln": NormSpec(_build_ln, batch_dependent=False, min_batch=1,
                   summary="LayerNorm as in the GN paper: GN with one group, per-channel affine"),
    "in": NormSpec(_build_in, batch_dependent=False, min_batch=1,
                   summary="InstanceNorm as in the GN paper: GN with one group per channel, "
                           "per-channel affine"),
    "none": NormSpec(_build_none, batch_dependent=False, min_batch=1, summary="no normalization"),
}


def norm_spec(name: str) -> NormSpec:
    """The registry entry for ``name``; an unknown name fails listing the known ones."""
    try:
        return NORMS[name]
    except KeyError:
        raise NormConfigError(f"unknown norm {name!r}; known norms: {', '.join(NORMS)}") from None


def norm_options(name: str) -> dict[str, Any]:
    """The options norm ``name`` takes, with the library's defaults (the paper's values)."""
    params = inspect.signature(norm_spec(name).build).parameters.values()
    return {p.name: p.default for p in params
            if p.kind is p.KEYWORD_ONLY and p.name != "virtual_batch"}


def build_norm(name: str, num_channels: int, *, virtual_batch: int | None = None,
               **options: Any) -> nn.Module:
    """Build the norm ``name`` for ``num_channels`` channels.

    ``options`` are the norm's own settings (``groups``, ``group_channels``, ``eps``, ...; see
    :func:`norm_options` and ``conf/norm/<name>.yaml``). ``virtual_batch`` is the per-worker
    batch, used only by batch-dependent norms. An option the norm does not take is an error.
    """
    spec = norm_spec(name)
    unknown = sorted(set(options) - set(norm_options(name)))
    if unknown:
        raise NormConfigError(f"norm {name!r} does not take option(s) {', '.join(unknown)}; "
                              f"its options are: {', '.join(norm_options(name)) or 'none'}")
    if spec.batch_dependent:
        options["virtual_batch"] = virtual_batch
    return spec.build(num_channels, **options)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every norm layer in ``model`` that has statistics."""
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


__all__ = ["ACTIVATIONS", "EPS", "NORMS", "GroupNorm2d", "NormConfigError", "NormSpec",
           "VirtualBatchNorm2d", "build_activation", "build_norm", "groups_for", "norm_layers",
           "norm_options", "norm_spec"]
