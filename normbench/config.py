"""The run config: parsed and checked once, before any work starts, and the run folder's name.

:func:`parse_config` turns the plain nested mapping Hydra composes from ``conf/`` (what
``OmegaConf.to_container`` gives) into a frozen :class:`RunConfig` that every part of the library
reads by attribute (``cfg.norm.name``, ``cfg.optim.lr_per_256``). It checks every value first:
booleans are booleans (Hydra passes ``optim.nesterov=no`` as the string ``"no"``), numbers are
finite and in range, integers are integers, names that become folders stay inside ``out_root``,
and the model builds. A bad value raises :class:`ConfigError`, one line naming the key, its value
and what is allowed. The library never needs Hydra: no hydra or omegaconf import here.

The values themselves live in the YAML files under ``conf/`` (the one source of defaults); the
dataclasses only say what each key is. :meth:`RunConfig.to_dict` gives back exactly the mapping
that was parsed (same keys, same values and types), which is what ``config.yaml`` records and
what the run folder's name hashes, so configs parsed today keep the names their runs had.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .bn_eval import BN_EVAL_MODES, statistics_batch
from .models import (MODELS, PLACEMENTS, STEMS, build_model, check_norm_combination,
                     norm_input_shapes)
from .fast_paths import CHANNELS_LAST_SETTINGS, COMPILE_MODES
from .norms import (ACTIVATIONS, NORMS, NormConfigError, min_values_per_statistic, norm_options,
                    norm_spec)
from .records import differing_keys

PRECISIONS = ("auto", "fp32", "bf16")
WANDB_MODES = ("online", "offline", "disabled")
OPTIMIZERS = ("sgd",)

# Keys that do not change what a run computes: they are left out of the run folder's name and
# of the comparison made when a run folder is reused, so that e.g. turning W&B on or moving the
# data does not start the run again. The fast paths (channels_last, compile) are among them:
# like the device they change floating-point rounding, not results (normbench/fast_paths.py).
NON_RUN_KEYS = ("experiment_name", "out_root", "wandb", "progress", "device", "num_workers",
                "threads", "eval_batch", "channels_last", "compile", "compile_mode",
                "archive_dir", "archive_commit")
NON_RUN_DATASET_KEYS = ("root", "cache_dir", "download")
# Data-set keys added after runs were recorded, with the value every earlier run had: a config
# without the key (an older config.yaml, a library user's dict) gets that value, and at that
# value the key is left out of the run key, so earlier runs keep their names and a relaunch
# still finds their records.
ADDED_DATASET_KEYS: dict[str, dict[str, Any]] = {"synthetic": {"brightness": 0.05}}


class ConfigError(ValueError):
    """A configuration value that cannot be run; the message names key, value and the allowed."""


# ---- what a value may be ----------------------------------------------------------------------
# A check takes the dotted key and the value and returns the value unchanged (never converted:
# an int stays an int, so that config.yaml and the run's hash stay as they were), or raises
# ConfigError naming the key, the value and what is allowed.
Check = Callable[[str, Any], Any]


def _refuse(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed; {allowed}")


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _refuse(key, value, "choose one of: true, false")
    return value


def integer(minimum: int) -> Check:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _refuse(key, value, f"it must be an integer >= {minimum}")
        return value
    return check


def number(minimum: float = -math.inf, maximum: float = math.inf, *,
           above: float | None = None) -> Check:
    """A finite int or float in [minimum, maximum], or above ``above`` (exclusive)."""
    if above is not None:
        allowed = f"it must be a finite number > {above:g}"
    elif maximum < math.inf:
        allowed = f"it must be a number between {minimum:g} and {maximum:g}"
    else:
        allowed = f"it must be a finite number >= {minimum:g}"

    def check(key: str, value: Any) -> float:
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or not minimum <= value <= maximum
                or (above is not None and value <= above)):
            raise _refuse(key, value, allowed)
        return value
    return check


def choice(allowed: tuple[Any, ...] | list[Any]) -> Check:
    def check(key: str, value: Any) -> Any:
        # `in` alone would let True stand for 1 and 1.0 for 1
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise _refuse(key, value, f"choose one of: {', '.join(_spelled(a) for a in allowed)}")
        return value
    return check


def _spelled(value: Any) -> str:
    """A value as it is typed on the command line (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def optional(check: Check) -> Check:
    """``check``, or null."""
    def optional_check(key: str, value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(key, value)
        except ConfigError as error:
            raise ConfigError(f"{error} (or null)") from None
    return optional_check


def text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _refuse(key, value, "it must be a non-empty string")
    return value


def folder_name(key: str, value: Any) -> str:
    """A name that becomes one folder of a run's path: it must stay one folder, inside its
    parent (``experiment_name=../../x`` would put runs outside ``out_root``)."""
    if (not isinstance(value, str) or value.strip() in ("", ".", "..")
            or any(c in value for c in "/\\\0")):
        raise _refuse(key, value, "it names a folder: choose a plain name, not empty, without "
                                  "'/' or '\\', and not '.' or '..'")
    return value


def folder_path(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _refuse(key, value, "it must be a folder path, e.g. runs")
    return value


def numbers(count: int, check: Check) -> Check:
    """A list of ``count`` values, each passing ``check``."""
    def check_list(key: str, value: Any) -> list:
        if not isinstance(value, list) or len(value) != count:
            raise _refuse(key, value, f"it must be a list of {count} numbers")
        for index, item in enumerate(value):
            check(f"{key}[{index}]", item)
        return value
    return check_list


def fractions_of_the_run(key: str, value: Any) -> list:
    if not isinstance(value, list) or not all(
            not isinstance(m, bool) and isinstance(m, (int, float)) and 0 < m < 1 for m in value):
        raise _refuse(key, value, "it must be a list of fractions of the run between 0 and 1, "
                                  "e.g. [0.3, 0.6, 0.9]")
    return value


def device_name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise _refuse(key, value, "choose auto, cpu, cuda or cuda:N")
    return value


def auto_or(check: Check) -> Check:
    def check_auto(key: str, value: Any) -> Any:
        if value == "auto":
            return value
        try:
            return check(key, value)
        except ConfigError as error:
            raise ConfigError(f"{error} (or auto)") from None
    return check_auto


def preset(key: str, value: Any) -> str:
    from .data import PRESET_NAMES  # imported here: data pulls in torchvision
    return choice(PRESET_NAMES)(key, value)


# The norms' options by name (an option means the same in every norm that takes it); which norm
# takes which comes from the norm registry (normbench.norms.norm_options, the builders'
# keywords), and conf/norm/<name>.yaml gives the values.
NORM_OPTIONS: dict[str, Check] = {
    "eps": number(above=0),
    "momentum": number(0, 1),  # running-statistics update rate
    "groups": optional(integer(1)),  # null where gn's group_channels decides
    "group_channels": optional(integer(1)),
    "learnable_eps": boolean,
    "r_max": number(1),
    "d_max": number(0),
    "warmup_until": number(0, 1),  # fractions of the run's training steps
    "r_max_reached_at": number(0, 1),
    "d_max_reached_at": number(0, 1),
}

# The keys every data set has (DatasetConfig's fields), then each data set's own options, as in
# conf/dataset/<name>.yaml (a test checks that these tables and those files name the same keys).
DATASET_FIELDS: dict[str, Check] = {
    "num_classes": integer(1),
    "image_size": integer(1),
    "stem": choice(STEMS),
    "augment": boolean,
    "mean": numbers(3, number(0, 1)),
    "std": numbers(3, number(above=0)),
}
_CIFAR_OPTIONS: dict[str, Check] = {"root": folder_path, "download": boolean}
DATASET_OPTIONS: dict[str, dict[str, Check]] = {
    "synthetic": {"train_size": integer(1), "test_size": integer(1), "seed": integer(0),
                  "prototype_size": integer(1), "noise": number(0), "mix": number(0),
                  "shift": integer(0), "brightness": number(0)},
    "cifar10": _CIFAR_OPTIONS,
    "cifar100": _CIFAR_OPTIONS,
    "imagefolder": {"preset": preset, "root": folder_path,
                    "test_dir": choice(("auto", "val", "test")),
                    "class_list": optional(text), "max_per_class": optional(integer(1)),
                    "max_test_per_class": optional(integer(1)), "skip_corrupt": boolean,
                    "cache_dir": folder_path},
}


# ---- the typed config -------------------------------------------------------------------------
@dataclass(frozen=True)
class NormConfig:
    name: str  # a key of normbench.norms.NORMS
    options: dict[str, Any]  # the norm's own options (conf/norm/<name>.yaml), as NORM_OPTIONS

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}


@dataclass(frozen=True)
class ModelConfig:
    name: str  # a key of normbench.models.MODELS
    stem: str
    width: float  # multiplies every stage's width
    zero_init_last: bool


@dataclass(frozen=True)
class DatasetConfig:
    name: str  # a key of normbench.data.DATASET_BUILDERS
    num_classes: int
    image_size: int
    stem: str
    augment: bool
    mean: list[float]
    std: list[float]
    options: dict[str, Any]  # the data set's own keys (DATASET_OPTIONS[name])

    def to_dict(self) -> dict[str, Any]:
        """The ``dataset`` node, as the data package reads it (:func:`normbench.data.build_loaders`)."""
        return {"name": self.name, **{key: getattr(self, key) for key in DATASET_FIELDS},
                **self.options}


@dataclass(frozen=True)
class OptimConfig:
    name: str
    lr_per_256: float  # lr = lr_per_256 * batch * workers / 256
    momentum: float
    nesterov: bool
    weight_decay: float
    norm_weight_decay: bool
    milestones: list[float]  # fractions of the run
    lr_decay: float
    warmup_epochs: float


@dataclass(frozen=True)
class WandbConfig:
    mode: str
    project: str
    entity: str | None
    group: str | None


@dataclass(frozen=True)
class RunConfig:
    """One run, as conf/config.yaml and its groups describe it (comments there)."""

    norm: NormConfig
    model: ModelConfig
    dataset: DatasetConfig
    optim: OptimConfig
    experiment_name: str
    batch: int
    workers: int
    placement: str
    act: str
    epochs: int
    seed: int
    deterministic: bool
    device: str
    precision: str
    channels_last: bool | str
    compile: bool
    compile_mode: str
    eval_batch: int
    num_workers: int | str
    threads: int | None
    progress: bool
    ws: bool
    bn_eval: str
    precise_bn_samples: int
    out_root: str
    archive_dir: str | None
    archive_commit: bool
    wandb: WandbConfig

    @property
    def global_batch(self) -> int:
        return self.batch * self.workers

    def to_dict(self) -> dict[str, Any]:
        """The plain nested mapping this config was parsed from: the same keys, values and
        types (what config.yaml records, what W&B shows, what the run's name hashes)."""
        out: dict[str, Any] = {}
        for key in TOP_LEVEL_KEYS:
            value = getattr(self, key)
            if isinstance(value, (NormConfig, DatasetConfig)):
                value = value.to_dict()
            elif isinstance(value, (ModelConfig, OptimConfig, WandbConfig)):
                value = dict(vars(value))
            out[key] = value
        return out


# The top-level keys in conf/config.yaml's order (config.yaml files keep it).
TOP_LEVEL_KEYS = ("norm", "model", "dataset", "optim", "experiment_name", "batch", "workers",
                  "placement", "act", "epochs", "seed", "deterministic", "device", "precision",
                  "channels_last", "compile", "compile_mode", "eval_batch", "num_workers",
                  "threads", "progress", "ws", "bn_eval", "precise_bn_samples", "out_root",
                  "archive_dir", "archive_commit", "wandb")

# Each top-level value's check; the four sections are parsed by their own functions below.
TOP_LEVEL_CHECKS: dict[str, Check] = {
    "experiment_name": folder_name,
    "batch": integer(1),
    "workers": integer(1),
    "placement": choice(PLACEMENTS),
    "act": choice(list(ACTIVATIONS)),
    "epochs": integer(1),
    "seed": integer(0),
    "deterministic": boolean,
    "device": device_name,
    "precision": choice(PRECISIONS),
    "channels_last": choice(CHANNELS_LAST_SETTINGS),
    "compile": boolean,
    "compile_mode": choice(COMPILE_MODES),
    "eval_batch": integer(1),
    "num_workers": auto_or(integer(0)),
    "threads": optional(integer(1)),
    "progress": boolean,
    "ws": boolean,
    "bn_eval": choice(BN_EVAL_MODES),
    "precise_bn_samples": integer(1),
    "out_root": folder_path,
    "archive_dir": optional(folder_path),
    "archive_commit": boolean,
}
MODEL_CHECKS: dict[str, Check] = {"name": choice(list(MODELS)), "stem": choice(STEMS),
                                  "width": number(above=0), "zero_init_last": boolean}
OPTIM_CHECKS: dict[str, Check] = {
    "name": choice(OPTIMIZERS), "lr_per_256": number(0), "momentum": number(0),
    "nesterov": boolean, "weight_decay": number(0), "norm_weight_decay": boolean,
    "milestones": fractions_of_the_run, "lr_decay": number(0), "warmup_epochs": number(0)}
WANDB_CHECKS: dict[str, Check] = {"mode": choice(WANDB_MODES), "project": text,
                                  "entity": optional(text), "group": optional(text)}


def _section(cfg: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    node = _require(cfg, key)
    if not isinstance(node, Mapping):
        raise _refuse(key, node, "it must be a mapping of its options")
    return node


def _require(cfg: Mapping[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"missing config key {key!r}")
        node = node[part]
    return node


def _checked(node: Mapping[str, Any], prefix: str, checks: Mapping[str, Check],
             what: str) -> dict[str, Any]:
    """Every key of ``checks`` from ``node``, checked; a key ``node`` has beyond them is
    refused (``what`` says whose keys they are)."""
    unknown = [key for key in node if key not in checks]
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]} is not a key of {what}; its keys are: "
                          f"{', '.join(checks)}")
    return {key: check(f"{prefix}{key}", _require(node, key)) for key, check in checks.items()}


def _parse_dataset(cfg: Mapping[str, Any]) -> DatasetConfig:
    node = _section(cfg, "dataset")
    name = choice(list(DATASET_OPTIONS))("dataset.name", _require(node, "name"))
    own = DATASET_OPTIONS[name]
    # an image folder's preset decides image_size, mean, std and stem (the YAML reads them from
    # it): a bad preset is named as dataset.preset, not as the values that follow from it
    if "preset" in own:
        own["preset"]("dataset.preset", _require(node, "preset"))
    node = {**ADDED_DATASET_KEYS.get(name, {}), **node}
    values = _checked({k: v for k, v in node.items() if k != "name"}, "dataset.",
                      {**DATASET_FIELDS, **own}, f"dataset={name}")
    return DatasetConfig(name=name, **{key: values[key] for key in DATASET_FIELDS},
                         options={key: values[key] for key in node if key in own})


def _parse_norm(cfg: Mapping[str, Any]) -> NormConfig:
    node = _section(cfg, "norm")
    name = choice(list(NORMS))("norm.name", _require(node, "name"))
    takes = norm_options(name)
    options = {key: value for key, value in node.items() if key != "name"}
    for key, value in options.items():
        if key not in takes:
            raise ConfigError(f"norm.{key} is not an option of norm={name}; its options are: "
                              f"{', '.join(takes) or 'none'}")
        NORM_OPTIONS[key](f"norm.{key}", value)
    # An option left out takes the library's default (normbench.norms): configs built by hand
    # may name only what they change.
    return NormConfig(name=name, options=options)


def parse_config(cfg: Mapping[str, Any] | RunConfig) -> RunConfig:
    """The :class:`RunConfig` of a plain nested mapping (a RunConfig is returned as it is);
    raises :class:`ConfigError` for the first value that cannot be run. Nothing is written."""
    if isinstance(cfg, RunConfig):
        return cfg
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"a run config must be a mapping of config keys, not "
                          f"{type(cfg).__name__}")
    # The data set first: an image folder's preset decides model.stem, so a bad preset is
    # named as dataset.preset, not as the model.stem that follows it.
    dataset = _parse_dataset(cfg)
    norm = _parse_norm(cfg)
    model = ModelConfig(**_checked(_section(cfg, "model"), "model.", MODEL_CHECKS, "model"))
    top = {key: value for key, value in cfg.items()
           if key not in ("norm", "model", "dataset", "optim", "wandb", "hydra")}
    values = _checked(top, "", TOP_LEVEL_CHECKS, "the run config")
    optim = OptimConfig(**_checked(_section(cfg, "optim"), "optim.", OPTIM_CHECKS, "optim"))
    wandb = WandbConfig(**_checked(_section(cfg, "wandb"), "wandb.", WANDB_CHECKS, "wandb"))
    run = RunConfig(norm=norm, model=model, dataset=dataset, optim=optim, wandb=wandb, **values)
    _check_combinations(run)
    return run


# ---- checks across keys -----------------------------------------------------------------------
def _check_combinations(cfg: RunConfig) -> None:
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} is not available: torch sees no CUDA device "
                          f"(choose device=auto or device=cpu)")
    if not cfg.optim.warmup_epochs < cfg.epochs:
        raise ConfigError(f"optim.warmup_epochs={cfg.optim.warmup_epochs!r} is not allowed; it "
                          f"must be >= 0 and below epochs={cfg.epochs}")
    _check_norm_combinations(cfg)
    _check_model_builds(cfg)


def _check_norm_combinations(cfg: RunConfig) -> None:
    """The norm against the batch, the placement and ``ws``."""
    name, batch = cfg.norm.name, cfg.batch
    spec = norm_spec(name)
    if spec.step_statistics and batch * cfg.workers < spec.min_batch:
        raise ConfigError(f"batch={batch} with workers={cfg.workers} is not allowed with "
                          f"norm={name}: its statistics cover the step's batch * workers images "
                          f"and need at least {spec.min_batch} (choose batch * workers >= "
                          f"{spec.min_batch})")
    if not spec.step_statistics and batch < spec.min_batch:
        raise ConfigError(f"batch={batch} is not allowed with norm={name}: its "
                          f"statistics need at least {spec.min_batch} images per worker "
                          f"(choose batch >= {spec.min_batch}, or a batch-independent norm such "
                          f"as gn)")
    try:
        check_norm_combination(name, cfg.placement, cfg.ws)
    except NormConfigError as error:
        raise ConfigError(str(error)) from None


def build_model_from_config(cfg: RunConfig, num_classes: int) -> torch.nn.Module:
    """The model a run trains, from the config's ``model``, ``norm``, ``batch``, ... keys."""
    model = cfg.model
    return build_model(model.name, num_classes=num_classes, norm=cfg.norm.name,
                       norm_options=dict(cfg.norm.options), batch=cfg.batch,
                       placement=cfg.placement, act=cfg.act, stem=model.stem,
                       width=model.width, zero_init_last=model.zero_init_last, ws=cfg.ws)


def _check_model_builds(cfg: RunConfig) -> None:
    """Build the model on the meta device (free) to catch grouping errors, and check that no
    norm layer would normalize a single value (e.g. IN on ResNet-50's 1x1 last stage)."""
    image_size, name = cfg.dataset.image_size, cfg.norm.name
    try:
        with torch.device("meta"):
            model = build_model_from_config(cfg, num_classes=cfg.dataset.num_classes)
    except NormConfigError as error:
        raise ConfigError(f"norm={name} with model={cfg.model.name}: {error}") from None
    shapes = norm_input_shapes(model, image_size)
    modules = dict(model.named_modules())
    # syncbn's statistics cover the step's batch * workers images, not one worker's batch
    batch = statistics_batch(name, cfg.batch, cfg.workers)
    for layer, (channels, height, width) in shapes.items():
        values = modules[layer].values_per_statistic(batch, channels, height, width)
        # None: a layer without statistics; FRN with a learned eps may take one value
        if values is not None and values < min_values_per_statistic(modules[layer]):
            remedy = "norm.learnable_eps=true (FRN's remedy for 1x1 maps), " if name == "frn" else ""
            raise ConfigError(
                f"norm={name} at layer {layer} would normalize a single value "
                f"(input {channels}x{height}x{width}, batch={cfg.batch}, "
                f"dataset.image_size={image_size}, model.stem={cfg.model.stem}); use "
                f"{remedy}a larger batch or image size, model.stem=cifar for small images, or "
                f"another norm")


def validate_config(cfg: Mapping[str, Any] | RunConfig) -> None:
    """Raise :class:`ConfigError` for the first value that cannot be run (:func:`parse_config`
    without keeping its result)."""
    parse_config(cfg)


# ---- the run folder's name --------------------------------------------------------------------
def _plain(cfg: Mapping[str, Any] | RunConfig) -> Mapping[str, Any]:
    return cfg.to_dict() if isinstance(cfg, RunConfig) else cfg


def run_key(cfg: Mapping[str, Any] | RunConfig) -> dict[str, Any]:
    """The part of the config that decides what a run computes (see :data:`NON_RUN_KEYS`)."""
    key = {k: v for k, v in _plain(cfg).items() if k not in NON_RUN_KEYS and k != "hydra"}
    if isinstance(key.get("dataset"), Mapping):
        added = ADDED_DATASET_KEYS.get(key["dataset"].get("name"), {})
        key["dataset"] = {k: v for k, v in key["dataset"].items()
                          if k not in NON_RUN_DATASET_KEYS
                          and not (k in added and v == added[k])}
    return key


def config_hash(cfg: Mapping[str, Any] | RunConfig) -> str:
    """Eight hex digits that change whenever :func:`run_key` changes."""
    text = json.dumps(run_key(cfg), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


# The values a run folder's path is made of: <out_root>/<experiment_name>/<run_name>.
RUN_NAME_KEYS = ("norm.name", "batch", "workers", "placement", "seed")


def check_folder_names(cfg: Mapping[str, Any]) -> None:
    """Refuse values that would put a run folder outside ``out_root`` (``..``, ``/``) or at the
    filesystem's root (an empty ``out_root``). For the Hydra entry, which names the folder
    before the config is parsed; :func:`parse_config` refuses all of these too."""
    folder_path("out_root", _require(cfg, "out_root"))
    folder_name("experiment_name", _require(cfg, "experiment_name"))
    for key in RUN_NAME_KEYS:
        value = _require(cfg, key)
        if not isinstance(value, bool) and isinstance(value, int):
            continue
        folder_name(key, value)


def run_name(cfg: Mapping[str, Any] | RunConfig) -> str:
    """A run folder's name: the usual swept values for people, the config hash for uniqueness,
    e.g. ``gn_b2x8_before_s0_1a2b3c4d``. Relaunching the same config finds the same folder."""
    plain = _plain(cfg)
    return (f"{plain['norm']['name']}_b{plain['batch']}x{plain['workers']}_{plain['placement']}"
            f"_s{plain['seed']}_{config_hash(plain)}")


def config_differences(old: Mapping[str, Any] | RunConfig,
                       new: Mapping[str, Any] | RunConfig) -> list[str]:
    """Dotted keys whose values differ between two configs' run keys."""
    return differing_keys(run_key(old), run_key(new))
