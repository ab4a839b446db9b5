"""The image-folder presets and their defaults: the one place they are written.

`conf/dataset/imagefolder.yaml` reads them through the `dataset_preset` resolver, e.g.
``image_size: ${dataset_preset:${.preset},image_size}``, so ``dataset.preset=imagenet`` brings
ImageNet's mean, std, image size and stem, and any of them set by the user (``dataset.image_size=
160``) replaces the preset's. The resolved values are what a run records in its config.yaml.

- ``cifar``: every image decoded once to ``image_size`` (32) and held on the device; CIFAR-10's
  mean and std (the default folder is the CIFAR-10 JPEG copy); the CIFAR stem.
- ``imagenet``: files decoded by DataLoader workers (or on the GPU), RandomResizedCrop(224);
  ImageNet's mean and std (torchvision's); the ImageNet stem (7x7 stride 2 + max-pool).
"""

from __future__ import annotations

from typing import Any

from .base import DatasetError

PRESETS: dict[str, dict[str, Any]] = {
    "cifar": {
        "image_size": 32,
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.2470, 0.2435, 0.2616],
        "stem": "cifar",
    },
    "imagenet": {
        "image_size": 224,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "stem": "imagenet",
    },
}
PRESET_NAMES = tuple(PRESETS)

# The resolver's name in the YAML: ${dataset_preset:PRESET,KEY}.
RESOLVER = "dataset_preset"


def check_preset(preset: Any) -> str:
    """`preset` if it is a known preset; else DatasetError naming dataset.preset and the presets."""
    if preset not in PRESETS:
        raise DatasetError(
            f"dataset.preset={preset!r} is not allowed; choose one of: {', '.join(PRESET_NAMES)}"
        )
    return preset


def preset_default(preset: str, key: str) -> Any:
    """The value of `key` (image_size, mean, std, stem) that `preset` brings; None for an
    unknown preset, which config validation then refuses by name (:func:`check_preset`)."""
    if preset not in PRESETS:
        # Not raised here: Hydra resolves the config while naming the run folder, before any
        # check of ours, and shows an error raised there as a 200-line traceback that points
        # at model.stem. The run never starts with it: validation names dataset.preset.
        return None
    defaults = PRESETS[preset]
    if key not in defaults:
        raise DatasetError(
            f"the dataset presets have no default for {key!r}; they have: {', '.join(defaults)}"
        )
    value = defaults[key]
    return list(value) if isinstance(value, list) else value  # a copy: callers may change it


def register_preset_resolver() -> None:
    """Teach OmegaConf ``${dataset_preset:PRESET,KEY}``; call before a config with image folders
    is resolved (the Hydra entry point does; so do the tests). OmegaConf is imported here only:
    the rest of the library does not need it."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(RESOLVER, preset_default, replace=True)
