"""ResNets with an injected norm, activation and placement, and the one registry that names them.

Read top to bottom like torchvision's ``models/resnet.py``: a :class:`ConvNormAct` unit, the two
residual blocks, the network, then the registry. The norm is a callable ``make_norm(channels)``;
``placement`` is data (the order of the unit's modules), not a second copy of the model:

- ``before``: conv -> norm -> act (the original BN paper and torchvision);
- ``after``:  conv -> act -> norm.

The last conv of a residual branch has no activation before the addition, so it is conv -> norm
in both placements, and no norm ever sits on the identity path after the addition.

Norms that carry their own nonlinearity (``frn``'s TLU, ``evonorm_b0``, ``evonorm_s0``: their
registry entry says ``replaces_activation``) take the place of the unit's activation: the unit is
conv -> norm, the norm built with its nonlinearity where the unit would have an activation and
without it where it would not (last conv of a branch, projection shortcut). ``placement=after``
has no meaning for them and is refused. The config's ``act`` is then used only where no norm
provides the nonlinearity: after the residual addition (as in the EvoNorm authors' ResNet).

Weight Standardization (``ws=True``) makes every conv followed by a norm a
:class:`~normbench.norms.WSConv2d`: in these ResNets that is every conv.

Stems: ``imagenet`` is torchvision's (7x7 stride-2 conv, 3x3 stride-2 max-pool); ``cifar`` is a
3x3 stride-1 conv without max-pool, which 32x32 inputs need (an ImageNet stem leaves ResNet-50's
last stage a 1x1 map).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from .norms import (NormConfigError, WSConv2d, build_activation, build_norm,
                    name_batch_statistics_layers, norm_spec)

PLACEMENTS = ("before", "after")
STEMS = ("imagenet", "cifar")

NormFactory = Callable[[int], nn.Module]
ActFactory = Callable[[], nn.Module]


class ConvNormAct(nn.Sequential):
    """A conv followed by its norm and (optionally) its activation, in the placement's order."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module, act: nn.Module | None,
                 placement: str) -> None:
        if placement not in PLACEMENTS:
            raise NormConfigError(f"placement={placement!r} is not allowed; choose one of: "
                                  f"{', '.join(PLACEMENTS)}")
        parts = [("conv", conv), ("norm", norm), ("act", act)]
        if placement == "after":
            parts = [("conv", conv), ("act", act), ("norm", norm)]
        super().__init__(OrderedDict((name, m) for name, m in parts if m is not None))


def conv3x3(in_channels: int, out_channels: int, stride: int = 1,
            conv_type: type[nn.Conv2d] = nn.Conv2d) -> nn.Conv2d:
    return conv_type(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1,
            conv_type: type[nn.Conv2d] = nn.Conv2d) -> nn.Conv2d:
    return conv_type(in_channels, out_channels, 1, stride=stride, bias=False)


@dataclass(frozen=True)
class Layers:
    """What a block needs to build its units: the conv type, the norm, the activation and the
    placement."""

    # (channels, qualified layer name, whether the unit has an activation) -> norm
    make_norm: Callable[[int, str, bool], nn.Module]
    make_act: ActFactory
    placement: str
    norm_is_activation: bool = False  # the norm carries the unit's nonlinearity (frn, evonorm)
    conv_type: type[nn.Conv2d] = nn.Conv2d  # WSConv2d with weight standardization

    def conv3x3(self, in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
        return conv3x3(in_channels, out_channels, stride, self.conv_type)

    def conv1x1(self, in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
        return conv1x1(in_channels, out_channels, stride, self.conv_type)

    def unit(self, conv: nn.Conv2d, where: str, act: bool = True) -> ConvNormAct:
        norm = self.make_norm(conv.out_channels, where, act)
        if self.norm_is_activation:  # the norm's own nonlinearity is the unit's activation
            return ConvNormAct(conv, norm, None, self.placement)
        return ConvNormAct(conv, norm, self.make_act() if act else None, self.placement)


def _shortcut(layers: Layers, in_channels: int, out_channels: int, stride: int,
              where: str) -> nn.Module:
    """Identity, or a 1x1 projection with its norm (torchvision's 'downsample') when the shape
    changes. Never an activation: the shortcut is part of the identity path."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return layers.unit(layers.conv1x1(in_channels, out_channels, stride), f"{where}.shortcut",
                       act=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR ResNets)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, layers: Layers,
                 where: str) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = layers.unit(layers.conv3x3(in_channels, width, stride), f"{where}.conv1")
        self.conv2 = layers.unit(layers.conv3x3(width, out_channels), f"{where}.conv2", act=False)
        self.shortcut = _shortcut(layers, in_channels, out_channels, stride, where)
        self.act = layers.make_act()

    @property
    def last_norm(self) -> nn.Module:
        return self.conv2.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1, stride on the 3x3 conv like torchvision's ResNet-50 ("ResNet v1.5")."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, layers: Layers,
                 where: str) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = layers.unit(layers.conv1x1(in_channels, width), f"{where}.conv1")
        self.conv2 = layers.unit(layers.conv3x3(width, width, stride), f"{where}.conv2")
        self.conv3 = layers.unit(layers.conv1x1(width, out_channels), f"{where}.conv3", act=False)
        self.shortcut = _shortcut(layers, in_channels, out_channels, stride, where)
        self.act = layers.make_act()

    @property
    def last_norm(self) -> nn.Module:
        return self.conv3.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: the block, blocks per stage and the stage widths (at width 1)."""

    block: type[BasicBlock] | type[Bottleneck]
    blocks_per_stage: tuple[int, ...]
    widths: tuple[int, ...]
    summary: str


def _cifar_resnet(depth: int) -> ModelSpec:
    # He et al. 2016, section 4.2: depth = 6n + 2, three stages of n basic blocks, 16/32/64 wide.
    n = (depth - 2) // 6
    return ModelSpec(BasicBlock, (n, n, n), (16, 32, 64),
                     f"CIFAR ResNet-{depth} (He et al. 2016): 3 stages x {n} basic blocks")


MODELS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), "ResNet-18"),
    "resnet34": ModelSpec(BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), "ResNet-34"),
    "resnet50": ModelSpec(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512),
                          "ResNet-50 (bottleneck, stride on the 3x3 conv)"),
    **{f"resnet{d}": _cifar_resnet(d) for d in (8, 20, 32, 44, 56, 110)},
}


class ResNet(nn.Module):
    def __init__(self, spec: ModelSpec, *, num_classes: int, layers: Layers, stem: str,
                 width: float, zero_init_last: bool) -> None:
        super().__init__()
        if stem not in STEMS:
            raise NormConfigError(f"model.stem={stem!r} is not allowed; choose one of: "
                                  f"{', '.join(STEMS)}")
        widths = [max(1, round(w * width)) for w in spec.widths]
        self.stem = self._stem(stem, widths[0], layers)
        in_channels = widths[0]
        stages = []
        for index, (blocks, stage_width) in enumerate(zip(spec.blocks_per_stage, widths)):
            stride = 1 if index == 0 else 2
            stage = []
            for b in range(blocks):
                where = f"stages.{index}.{b}"
                stage.append(spec.block(in_channels, stage_width, stride if b == 0 else 1,
                                        layers, where))
                in_channels = stage_width * spec.block.expansion
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights(zero_init_last)

    @staticmethod
    def _stem(stem: str, channels: int, layers: Layers) -> nn.Sequential:
        if stem == "cifar":
            return nn.Sequential(layers.unit(layers.conv3x3(3, channels), "stem"))
        conv = layers.conv_type(3, channels, 7, stride=2, padding=3, bias=False)
        return nn.Sequential(layers.unit(conv, "stem"),
                             nn.MaxPool2d(kernel_size=3, stride=2, padding=1))

    def _init_weights(self, zero_init_last: bool) -> None:
        # torchvision's initialization; gamma = 1, beta = 0 in every norm, except gamma = 0 in the
        # last norm of each residual branch (the GN paper's protocol) when zero_init_last is set,
        # so every block starts as the identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif getattr(m, "weight", None) is not None and hasattr(m, "values_per_statistic"):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)) and getattr(m.last_norm, "weight",
                                                                       None) is not None:
                    nn.init.zeros_(m.last_norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; an unknown name fails listing the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise NormConfigError(f"unknown model {name!r}; known models: "
                              f"{', '.join(MODELS)}") from None


def _norm_factory(norm: str, norm_options: dict[str, Any], virtual_batch: int | None):
    def make_norm(channels: int, where: str, with_activation: bool) -> nn.Module:
        try:
            return build_norm(norm, channels, virtual_batch=virtual_batch,
                              with_activation=with_activation, **norm_options)
        except NormConfigError as error:
            raise NormConfigError(f"at layer {where}: {error}") from None
    return make_norm


def check_norm_combination(norm: str, placement: str, ws: bool) -> None:
    """Refuse, naming the key, its value and the allowed values, the combinations that have no
    meaning: a norm that is its unit's activation placed after the activation, and weight
    standardization without a norm after the conv."""
    spec = norm_spec(norm)
    if placement not in PLACEMENTS:
        raise NormConfigError(f"placement={placement!r} is not allowed; choose one of: "
                              f"{', '.join(PLACEMENTS)}")
    if spec.replaces_activation and placement != "before":
        raise NormConfigError(
            f"placement={placement!r} is not allowed with norm={norm}: {norm} includes its own "
            f"nonlinearity and replaces the unit's activation, so there is no activation to "
            f"put it after; allowed with norm={norm}: placement=before")
    if ws and norm == "none":
        raise NormConfigError(
            "ws=True is not allowed with norm=none: standardized weights have unit variance, "
            "which multiplies each conv's output variance by its fan-in, so weight "
            "standardization needs a norm after the conv; allowed with norm=none: ws=False")


def build_model(name: str, *, num_classes: int, norm: str = "bn",
                norm_options: dict[str, Any] | None = None, batch: int | None = None,
                placement: str = "before", act: str = "relu", stem: str = "imagenet",
                width: float = 1.0, zero_init_last: bool = True, ws: bool = False) -> ResNet:
    """Build the ResNet ``name`` with norm ``norm`` everywhere.

    ``batch`` is the images per worker: batch-dependent norms take their training statistics
    per chunk of that many images (virtual workers); ``None`` means the whole batch is one
    worker. ``norm_options`` go to :func:`normbench.norms.build_norm`. ``ws`` standardizes the
    weight of every conv followed by a norm (Weight Standardization).
    """
    spec = model_spec(name)
    build_activation(act)  # fail early, naming the allowed activations
    check_norm_combination(norm, placement, ws)
    layers = Layers(_norm_factory(norm, dict(norm_options or {}), batch),
                    partial(build_activation, act), placement,
                    norm_is_activation=norm_spec(norm).replaces_activation,
                    conv_type=WSConv2d if ws else nn.Conv2d)
    model = ResNet(spec, num_classes=num_classes, layers=layers, stem=stem, width=width,
                   zero_init_last=zero_init_last)
    name_batch_statistics_layers(model)  # their training errors name the layer
    return model


def norm_input_shapes(model: nn.Module, image_size: int) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of the input of every norm layer for square images of ``image_size``.

    Meant for a model built on the meta device (no memory, no compute: cheap for ResNet-50).
    Two images, because some layers refuse a single value per channel even in eval mode.
    """
    shapes: dict[str, tuple[int, int, int]] = {}
    hooks = [m.register_forward_pre_hook(
                 lambda _m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape[1:])))
             for name, m in model.named_modules() if hasattr(m, "values_per_statistic")]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.empty(2, 3, image_size, image_size, device=next(model.parameters()).device))
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes
