"""Checking a run's configuration before any work starts, and naming its run folder.

The configuration is a plain nested mapping (what ``OmegaConf.to_container`` gives for the Hydra
config in ``conf/``), so the library never needs Hydra. Every check fails with a
:class:`ConfigError` that names the key, its value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping

import torch

from .bn_eval import BN_EVAL_MODES, statistics_batch
from .models import (MODELS, PLACEMENTS, STEMS, build_model, check_norm_combination,
                     norm_input_shapes)
from .fast_paths import CHANNELS_LAST_SETTINGS, COMPILE_MODES
from .norms import ACTIVATIONS, NORMS, NormConfigError, min_values_per_statistic, norm_spec

PRECISIONS = ("auto", "fp32", "bf16")
WANDB_MODES = ("online", "offline", "disabled")

# Keys that do not change what a run computes: they are left out of the run folder's name and
# of the comparison made when a run folder is reused, so that e.g. turning W&B on or moving the
# data does not start the run again. The fast paths (channels_last, compile) are among them:
# like the device they change floating-point rounding, not results (normbench/fast_paths.py).
NON_RUN_KEYS = ("experiment_name", "out_root", "wandb", "progress", "device", "num_workers",
                "threads", "eval_batch", "channels_last", "compile", "compile_mode",
                "archive_dir", "archive_commit")
NON_RUN_DATASET_KEYS = ("root", "cache_dir", "download")


class ConfigError(ValueError):
    """A configuration value that cannot be run; the message names key, value and the allowed."""


def _require(cfg: Mapping[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"missing config key {key!r}")
        node = node[part]
    return node


def _check_choice(cfg: Mapping[str, Any], key: str, allowed: tuple[str, ...] | list[str]) -> None:
    value = _require(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _check_int(cfg: Mapping[str, Any], key: str, minimum: int) -> int:
    value = _require(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} is not allowed; it must be an integer >= {minimum}")
    return value


def norm_options_of(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The norm's own options: the ``norm`` node without its ``name``."""
    return {k: v for k, v in cfg["norm"].items() if k != "name"}


def build_model_from_config(cfg: Mapping[str, Any], num_classes: int) -> torch.nn.Module:
    """The model a run trains, from the config's ``model``, ``norm``, ``batch``, ... keys."""
    model = cfg["model"]
    return build_model(model["name"], num_classes=num_classes, norm=cfg["norm"]["name"],
                       norm_options=norm_options_of(cfg), batch=cfg["batch"],
                       placement=cfg["placement"], act=cfg["act"], stem=model["stem"],
                       width=model["width"], zero_init_last=model["zero_init_last"],
                       ws=cfg["ws"])


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for the first value that cannot be run."""
    from .data import DATASET_BUILDERS, check_preset  # imported here: data pulls in torchvision
    # The data set first: an image folder's preset decides model.stem, so a bad preset is
    # named as dataset.preset, not as the model.stem that follows it.
    _check_choice(cfg, "dataset.name", list(DATASET_BUILDERS))
    if cfg["dataset"]["name"] == "imagefolder":
        check_preset(_require(cfg, "dataset.preset"))
    _check_choice(cfg, "norm.name", list(NORMS))
    _check_choice(cfg, "model.name", list(MODELS))
    _check_choice(cfg, "model.stem", STEMS)
    _check_choice(cfg, "placement", PLACEMENTS)
    _check_choice(cfg, "act", list(ACTIVATIONS))
    _check_choice(cfg, "precision", PRECISIONS)
    _check_fast_paths(cfg)
    _check_choice(cfg, "wandb.mode", WANDB_MODES)
    batch = _check_int(cfg, "batch", 1)
    _check_int(cfg, "workers", 1)
    _check_int(cfg, "epochs", 1)
    _check_int(cfg, "seed", 0)
    _check_int(cfg, "eval_batch", 1)
    archive_dir = _require(cfg, "archive_dir")
    if archive_dir is not None and (not isinstance(archive_dir, str) or not archive_dir.strip()):
        raise ConfigError(f"archive_dir={archive_dir!r} is not allowed; it must be a folder path "
                          f"or null")
    if not isinstance(_require(cfg, "archive_commit"), bool):
        raise ConfigError(f"archive_commit={cfg['archive_commit']!r} is not allowed; choose one "
                          f"of: true, false")
    if _require(cfg, "threads") is not None:
        _check_int(cfg, "threads", 1)
    _check_choice(cfg, "bn_eval", BN_EVAL_MODES)
    _check_int(cfg, "precise_bn_samples", 1)
    _check_device(cfg)
    width = _require(cfg, "model.width")
    if not isinstance(width, (int, float)) or width <= 0:
        raise ConfigError(f"model.width={width!r} is not allowed; it must be a number > 0")
    _check_norm_combinations(cfg, batch)
    _check_optim(cfg)
    _check_model_builds(cfg)


def _check_norm_combinations(cfg: Mapping[str, Any], batch: int) -> None:
    """The norm against the batch, the placement and ``ws``."""
    name = cfg["norm"]["name"]
    spec = norm_spec(name)
    ws = _require(cfg, "ws")
    if not isinstance(ws, bool):
        raise ConfigError(f"ws={ws!r} is not allowed; choose one of: true, false")
    if spec.step_statistics and batch * cfg["workers"] < spec.min_batch:
        raise ConfigError(f"batch={batch} with workers={cfg['workers']} is not allowed with "
                          f"norm={name}: its statistics cover the step's batch * workers images "
                          f"and need at least {spec.min_batch} (choose batch * workers >= "
                          f"{spec.min_batch})")
    if not spec.step_statistics and batch < spec.min_batch:
        raise ConfigError(f"batch={batch} is not allowed with norm={name}: its "
                          f"statistics need at least {spec.min_batch} images per worker "
                          f"(choose batch >= {spec.min_batch}, or a batch-independent norm such "
                          f"as gn)")
    try:
        check_norm_combination(name, cfg["placement"], ws)
    except NormConfigError as error:
        raise ConfigError(str(error)) from None


def _check_fast_paths(cfg: Mapping[str, Any]) -> None:
    """``channels_last``, ``compile`` and ``compile_mode`` (see :mod:`normbench.fast_paths`)."""
    value = _require(cfg, "channels_last")
    if not (isinstance(value, bool) or value == "auto"):
        raise ConfigError(f"channels_last={value!r} is not allowed; choose one of: "
                          f"{', '.join(str(v).lower() for v in CHANNELS_LAST_SETTINGS)}")
    value = _require(cfg, "compile")
    if not isinstance(value, bool):
        raise ConfigError(f"compile={value!r} is not allowed; choose one of: true, false")
    _check_choice(cfg, "compile_mode", COMPILE_MODES)


def _check_device(cfg: Mapping[str, Any]) -> None:
    device = _require(cfg, "device")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device={device!r} is not allowed; choose auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} is not available: torch sees no CUDA device "
                          f"(choose device=auto or device=cpu)")


def _check_optim(cfg: Mapping[str, Any]) -> None:
    for key in ("optim.lr_per_256", "optim.momentum", "optim.weight_decay", "optim.lr_decay"):
        value = _require(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{key}={value!r} is not allowed; it must be a number >= 0")
    milestones = _require(cfg, "optim.milestones")
    if not isinstance(milestones, list) or not all(
            isinstance(m, (int, float)) and 0 < m < 1 for m in milestones):
        raise ConfigError(f"optim.milestones={milestones!r} is not allowed; it must be a list of "
                          f"fractions of the run between 0 and 1, e.g. [0.3, 0.6, 0.9]")
    warmup = _require(cfg, "optim.warmup_epochs")
    if not isinstance(warmup, (int, float)) or not 0 <= warmup < cfg["epochs"]:
        raise ConfigError(f"optim.warmup_epochs={warmup!r} is not allowed; it must be >= 0 and "
                          f"below epochs={cfg['epochs']}")


def _check_model_builds(cfg: Mapping[str, Any]) -> None:
    """Build the model on the meta device (free) to catch grouping errors, and check that no
    norm layer would normalize a single value (e.g. IN on ResNet-50's 1x1 last stage)."""
    image_size = _require(cfg, "dataset.image_size")
    try:
        with torch.device("meta"):
            model = build_model_from_config(cfg, num_classes=_require(cfg, "dataset.num_classes"))
    except NormConfigError as error:
        raise ConfigError(f"norm={cfg['norm']['name']} with model={cfg['model']['name']}: "
                          f"{error}") from None
    shapes = norm_input_shapes(model, image_size)
    modules = dict(model.named_modules())
    # syncbn's statistics cover the step's batch * workers images, not one worker's batch
    batch = statistics_batch(cfg["norm"]["name"], cfg["batch"], cfg["workers"])
    for layer, (channels, height, width) in shapes.items():
        values = modules[layer].values_per_statistic(batch, channels, height, width)
        # None: a layer without statistics; FRN with a learned eps may take one value
        if values is not None and values < min_values_per_statistic(modules[layer]):
            remedy = ("norm.learnable_eps=true (FRN's remedy for 1x1 maps), "
                      if cfg["norm"]["name"] == "frn" else "")
            raise ConfigError(
                f"norm={cfg['norm']['name']} at layer {layer} would normalize a single value "
                f"(input {channels}x{height}x{width}, batch={cfg['batch']}, "
                f"dataset.image_size={image_size}, model.stem={cfg['model']['stem']}); use "
                f"{remedy}a larger batch or image size, model.stem=cifar for small images, or "
                f"another norm")


def run_key(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the config that decides what a run computes (see :data:`NON_RUN_KEYS`)."""
    key = {k: v for k, v in cfg.items() if k not in NON_RUN_KEYS and k != "hydra"}
    if isinstance(key.get("dataset"), Mapping):
        key["dataset"] = {k: v for k, v in key["dataset"].items()
                          if k not in NON_RUN_DATASET_KEYS}
    return key


def config_hash(cfg: Mapping[str, Any]) -> str:
    """Eight hex digits that change whenever :func:`run_key` changes."""
    text = json.dumps(run_key(cfg), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def run_name(cfg: Mapping[str, Any]) -> str:
    """A run folder's name: the usual swept values for people, the config hash for uniqueness,
    e.g. ``gn_b2x8_before_s0_1a2b3c4d``. Relaunching the same config finds the same folder."""
    return (f"{cfg['norm']['name']}_b{cfg['batch']}x{cfg['workers']}_{cfg['placement']}"
            f"_s{cfg['seed']}_{config_hash(cfg)}")


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two configs' run keys."""
    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, Mapping):
            out: dict[str, Any] = {}
            for k, v in node.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: node}
    a, b = flat(run_key(old)), flat(run_key(new))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def flat_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Flat keys for W&B and tables: ``norm``, ``batch``, ``workers``, ... plus dotted options."""
    flat = {"norm": cfg["norm"]["name"], "model": cfg["model"]["name"],
            "dataset": cfg["dataset"]["name"]}
    for key in ("batch", "workers", "placement", "act", "epochs", "seed", "experiment_name"):
        flat[key] = cfg.get(key)
    flat["global_batch"] = cfg["batch"] * cfg["workers"]
    for section in ("norm", "model", "optim"):
        for k, v in cfg[section].items():
            if k != "name":
                flat[f"{section}.{k}"] = v
    return flat
