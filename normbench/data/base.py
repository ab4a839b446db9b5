"""What every part of the data package shares: its error, what a data set is (`DatasetInfo`,
`TensorSplits`), reading the `dataset` config node, and seeded generators.

Nothing here imports the rest of the package: sources, batches and the entry point all import
from here, never the other way.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# File name endings read as images (torchvision's ImageFolder list).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """The data set cannot be built: bad config, missing or unreadable files."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the training loop needs to know about the data set (all ranks together)."""

    name: str
    num_classes: int
    image_size: int
    num_train: int  # images in the training split (before drop_last)
    num_test: int
    classes: tuple[str, ...]
    skipped_files: int = 0  # unreadable image files skipped (imagefolder with skip_corrupt)
    num_workers: int = 0  # DataLoader worker processes used (0: none; tensors on the device)


@dataclass(frozen=True)
class TensorSplits:
    """A whole data set as uint8 image tensors (N, 3, H, W) and int64 label tensors."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: tuple[str, ...]
    skipped_files: int = 0


# ----------------------------------------------------------------------------- config helpers


def require(dataset: Mapping[str, Any], key: str) -> Any:
    if key not in dataset:
        name = dataset.get("name", "?")
        raise DatasetError(f"dataset config (name={name}) is missing the key '{key}'")
    return dataset[key]


def require_choice(dataset: Mapping[str, Any], key: str, allowed: Sequence[str]) -> str:
    value = require(dataset, key)
    if value not in allowed:
        raise DatasetError(f"dataset.{key}={value!r} is not one of {', '.join(allowed)}")
    return value


def optional_count(dataset: Mapping[str, Any], key: str) -> int | None:
    """A key that is either null (no limit) or a positive int."""
    value = require(dataset, key)
    if value is not None and (not isinstance(value, int) or value < 1):
        raise DatasetError(f"dataset.{key}={value!r} must be null or a positive integer")
    return value


def int_at_least(dataset: Mapping[str, Any], key: str, minimum: int) -> int:
    value = require(dataset, key)
    if not isinstance(value, int) or value < minimum:
        raise DatasetError(f"dataset.{key}={value!r} must be an integer >= {minimum}")
    return value


def expanded_path(value: Any) -> Path:
    return Path(os.path.expanduser(str(value)))


def mean_std(dataset: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = tuple(float(v) for v in require(dataset, "mean"))
    std = tuple(float(v) for v in require(dataset, "std"))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DatasetError(
            f"dataset.mean={list(mean)} and dataset.std={list(std)} must be 3 values, std > 0"
        )
    return mean, std


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends on every part (stable across runs and platforms)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seeded_generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))

