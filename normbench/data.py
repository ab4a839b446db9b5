"""Data sets and loaders: one call, `build_loaders`, turns the `dataset` config node into loaders.

Loaders yield `(images, labels)`: images float32 NCHW on the device, normalized by the config's
`mean` and `std`; labels int64 on the device. There are two implementations:

- `TensorTrainLoader` / `TensorEvalLoader` (synthetic, cifar10, cifar100, imagefolder with
  `preset: cifar`): the whole split is one uint8 tensor on the device and CIFAR augmentation
  (zero-pad 4, random 32x32 crop, horizontal flip) is a single batched gather, airbench style.
- `FolderLoader` (imagefolder with `preset: imagenet`): files decoded by DataLoader workers,
  RandomResizedCrop + flip for training, Resize(size * 256 / 224) + CenterCrop for evaluation.

Determinism and sharding (both paths). Every random choice is drawn from explicit
`torch.Generator`s seeded from the run seed and the epoch, never from the global RNG, so an
epoch can be replayed bit for bit after a crash. Per epoch, a permutation of the training set
orders it; global step k takes positions [k*G, (k+1)*G) of that order (G = global_batch) and
rank r takes the r-th contiguous piece of G // world_size images. The last partial global batch
is dropped. Augmentation is tied to the image's position in the epoch (tensor path: crop offsets
and flips drawn for the whole epoch from the epoch generator) or to (seed, epoch, image index)
(folder path: one small generator per image), so one process and N processes see exactly the
same augmented images, whatever the number of DataLoader workers.
Evaluation keeps every test image in file order; with world_size > 1 rank r takes the contiguous
slice [r*N // world_size, (r+1)*N // world_size) of the test set, so the shards never overlap
and together cover it.

Synthetic data (`name: synthetic`) is generated in memory from `dataset.seed` (not the run seed:
all runs of a sweep see the same images) and never cached. Each class has a prototype: random
normal noise of shape 3 x `prototype_size` x `prototype_size`, bilinearly upsampled to
`image_size` and scaled to unit standard deviation (a smooth colour pattern). An image of class y
is

    0.5 + 0.15 * (c * roll(P[y]) + m * roll(P[z])) + b + noise * N(0, 1)

clipped to [0, 1] and stored as uint8, where c ~ U(0.6, 1.4) is the contrast, z a random other
class mixed in with weight m ~ U(0, mix), each prototype circularly shifted by its own random
offset of up to `shift` pixels in each direction, b ~ N(0, 0.05) a per-channel brightness and
`noise` the pixel noise. The random shifts make a linear classifier useless (a CNN must learn
shift-invariant features); the mixed-in class and the noise keep it from being solved at once.
Labels are balanced (every class gets n // num_classes or one more images). Train and test use
separate generator streams of the same prototypes. Generating 10,000 images takes about 1 s on
two CPU cores. Difficulty with the defaults (10k train, prototype_size 8, noise 0.3, mix 0.8,
shift 16), CIFAR ResNet-8, batch 64, 2 busy CPU cores: BN about 45% test error after one epoch
(~25 s) and 16% after five; GN starts slower (71% after one epoch) and reaches 10% after six.

Image folders (`name: imagefolder`): root/train/CLASS/* and root/val/ or root/test/ alike. With
`preset: cifar` every image is decoded once (shorter side resized to image_size, centre crop)
into a uint8 tensor cached under `cache_dir`, keyed by a hash of the root, the test folder, the
classes, the selected file names, the slice sizes, image_size and skip_corrupt; written to a
temporary file and renamed, so a cache file is always whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

logger = logging.getLogger(__name__)

# CIFAR augmentation: zero padding on each side before the random crop back to the image size.
CIFAR_CROP_PADDING = 4
# File name endings read as images (torchvision's ImageFolder list).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Bump when the content of the decoded-tensor cache changes, so stale caches are not reused.
_CACHE_FORMAT = 1
# Synthetic data: range of the per-image contrast and std of the per-channel brightness shift.
_SYNTHETIC_CONTRAST = (0.6, 1.4)
_SYNTHETIC_BRIGHTNESS_STD = 0.05
# Synthetic data: prototypes of unit std are scaled by this around mid-grey (0.5).
_SYNTHETIC_AMPLITUDE = 0.15


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


class EvalLoader(Protocol):
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...


class TrainLoader(EvalLoader, Protocol):
    def set_epoch(self, epoch: int) -> None: ...


Loaders = tuple[TrainLoader, EvalLoader, DatasetInfo]


@dataclass(frozen=True)
class LoaderOptions:
    """The run-level arguments of `build_loaders` (everything that is not the dataset node)."""

    global_batch: int
    eval_batch: int
    seed: int
    device: torch.device
    rank: int
    world_size: int
    num_workers: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.global_batch < 1 or self.global_batch % self.world_size:
            raise ValueError(
                f"global_batch={self.global_batch} must be a positive multiple of "
                f"world_size={self.world_size}"
            )
        if self.eval_batch < 1:
            raise ValueError(f"eval_batch={self.eval_batch} must be positive")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0")

    @property
    def rank_batch(self) -> int:
        return self.global_batch // self.world_size


# A data set's builder: (dataset config node, options) -> loaders; see DATASET_BUILDERS.
Builder = Callable[[Mapping[str, Any], LoaderOptions], Loaders]


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


def _require(dataset: Mapping[str, Any], key: str) -> Any:
    if key not in dataset:
        name = dataset.get("name", "?")
        raise DatasetError(f"dataset config (name={name}) is missing the key '{key}'")
    return dataset[key]


def _require_choice(dataset: Mapping[str, Any], key: str, allowed: Sequence[str]) -> str:
    value = _require(dataset, key)
    if value not in allowed:
        raise DatasetError(f"dataset.{key}={value!r} is not one of {', '.join(allowed)}")
    return value


def _optional_count(dataset: Mapping[str, Any], key: str) -> int | None:
    """A key that is either null (no limit) or a positive int."""
    value = _require(dataset, key)
    if value is not None and (not isinstance(value, int) or value < 1):
        raise DatasetError(f"dataset.{key}={value!r} must be null or a positive integer")
    return value


def _int_at_least(dataset: Mapping[str, Any], key: str, minimum: int) -> int:
    value = _require(dataset, key)
    if not isinstance(value, int) or value < minimum:
        raise DatasetError(f"dataset.{key}={value!r} must be an integer >= {minimum}")
    return value


def _expanded_path(value: Any) -> Path:
    return Path(os.path.expanduser(str(value)))


def _mean_std(dataset: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = tuple(float(v) for v in _require(dataset, "mean"))
    std = tuple(float(v) for v in _require(dataset, "std"))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DatasetError(
            f"dataset.mean={list(mean)} and dataset.std={list(std)} must be 3 values, std > 0"
        )
    return mean, std


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends on every part (stable across runs and platforms)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def epoch_order(num_samples: int, seed: int, epoch: int) -> tuple[torch.Generator, Tensor]:
    """The epoch's permutation and the generator it came from (its later draws are augmentation)."""
    generator = _generator("epoch", seed, epoch)
    return generator, torch.randperm(num_samples, generator=generator)


def eval_shard(num_samples: int, rank: int, world_size: int) -> range:
    """The contiguous slice of the evaluation order (:func:`eval_order`) that `rank` evaluates."""
    return range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)


def eval_order(num_samples: int) -> Tensor:
    """The order in which the test set is evaluated: one fixed permutation, the same for every
    run, seed, epoch and process.

    Evaluation with running statistics does not depend on the order. Evaluation with batch
    statistics does (``train_mode_test_error``, ``bn_eval=batch``: chunks of ``batch``
    consecutive test images): an image folder lists its test images class by class, and a chunk
    of one class is not the kind of batch the model normalizes over in training, where batches
    are shuffled. In this order every chunk is a random draw of the test set, as in training.
    """
    return torch.randperm(num_samples, generator=_generator("evaluation order"))


def eval_indices(num_samples: int, rank: int, world_size: int) -> Tensor:
    """The test-set indices `rank` evaluates, in evaluation order."""
    shard = eval_shard(num_samples, rank, world_size)
    return eval_order(num_samples)[shard.start : shard.stop]


# ----------------------------------------------------------------------------- tensor path


def _channel_stats(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[Tensor, Tensor]:
    """mean and std as (1, 3, 1, 1) tensors on the device, for `normalize`."""
    return (
        torch.tensor(mean, device=device).view(1, 3, 1, 1),
        torch.tensor(std, device=device).view(1, 3, 1, 1),
    )


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 NCHW in [0, 255] -> float32 (x / 255 - mean) / std; mean, std of shape (1, 3, 1, 1)."""
    return images.to(torch.float32).div_(255).sub_(mean).div_(std)


def gather_windows(images: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """out[n, c, i, j] = images[n, c, rows[n, i], cols[n, j]]: a per-image window (crop, shift,
    mirror) for the whole batch as one gather over the flattened pixels (several times faster
    on CPU than 4-D advanced indexing)."""
    n, c, height, width = images.shape
    h, w = rows.shape[1], cols.shape[1]
    pixel = (rows[:, :, None] * width + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return images.reshape(n, c, height * width).gather(2, pixel).view(n, c, h, w)


def crop_and_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Zero-pad `images` (N, C, H, W) by `padding`, crop H x W at `offsets` (N, 2: top, left) and
    mirror the crops where `flips` (N, bool) is set."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device).expand(n, w)
    cols = torch.where(flips[:, None], w - 1 - cols, cols)  # a mirrored crop reads right to left
    return gather_windows(padded, rows, cols + offsets[:, 1, None])


@dataclass(frozen=True)
class EpochPlan:
    """What one training epoch does, by position in the epoch: which image, crop offset, flip."""

    order: Tensor  # (N,) int64 image indices
    offsets: Tensor | None  # (N, 2) int64 crop (top, left) in the padded image; None: no augment
    flips: Tensor | None  # (N,) bool: mirror the crop


class TensorTrainLoader:
    """Shuffled, augmented, sharded training batches from a uint8 tensor held on the device."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool,
        options: LoaderOptions,
    ) -> None:
        self.images = images.to(options.device)
        self.labels = labels.to(options.device)
        self.augment = augment
        self.options = options
        self._mean, self._std = _channel_stats(mean, std, options.device)
        self._epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __len__(self) -> int:
        return len(self.images) // self.options.global_batch

    def epoch_plan(self, epoch: int) -> EpochPlan:
        # Drawn on the CPU so the numbers do not depend on the device type.
        generator, order = epoch_order(len(self.images), self.options.seed, epoch)
        if not self.augment:
            return EpochPlan(order, None, None)
        offsets = torch.randint(0, 2 * CIFAR_CROP_PADDING + 1, (len(order), 2), generator=generator)
        flips = torch.randint(0, 2, (len(order),), generator=generator).bool()
        return EpochPlan(order, offsets, flips)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._epoch is None:
            raise RuntimeError("call train_loader.set_epoch(epoch) before iterating")
        device, batch = self.options.device, self.options.rank_batch
        plan = self.epoch_plan(self._epoch)
        order = plan.order.to(device)
        offsets = plan.offsets.to(device) if plan.offsets is not None else None
        flips = plan.flips.to(device) if plan.flips is not None else None
        for step in range(len(self)):
            start = step * self.options.global_batch + self.options.rank * batch
            positions = slice(start, start + batch)
            index = order[positions]
            images = self.images[index]
            if offsets is not None and flips is not None:
                images = crop_and_flip(
                    images, offsets[positions], flips[positions], CIFAR_CROP_PADDING
                )
            yield normalize(images, self._mean, self._std), self.labels[index]


class TensorEvalLoader:
    """This rank's shard of the test set in evaluation order (:func:`eval_order`), in batches of
    `eval_batch`; no augmentation."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        options: LoaderOptions,
    ) -> None:
        indices = eval_indices(len(images), options.rank, options.world_size)
        self.images = images[indices].to(options.device)
        self.labels = labels[indices].to(options.device)
        self.batch = options.eval_batch
        self._mean, self._std = _channel_stats(mean, std, options.device)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do; present so that train and eval loaders can be driven alike."""

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.images), self.batch):
            images = self.images[start : start + self.batch]
            yield normalize(images, self._mean, self._std), self.labels[start : start + self.batch]


def _tensor_loaders(
    dataset: Mapping[str, Any], splits: TensorSplits, options: LoaderOptions
) -> tuple[TensorTrainLoader, TensorEvalLoader, DatasetInfo]:
    num_train, num_test = len(splits.train_images), len(splits.test_images)
    info = _dataset_info(dataset, splits.classes, num_train, num_test, splits.skipped_files)
    _check_train_size(info.num_train, options)
    size = splits.train_images.shape[-1]
    if size != info.image_size:
        raise DatasetError(f"dataset.image_size={info.image_size}: {info.name} is {size}x{size}")
    mean, std = _mean_std(dataset)
    augment = bool(_require(dataset, "augment"))
    train = TensorTrainLoader(
        splits.train_images,
        splits.train_labels,
        mean=mean,
        std=std,
        augment=augment,
        options=options,
    )
    test = TensorEvalLoader(
        splits.test_images, splits.test_labels, mean=mean, std=std, options=options
    )
    return train, test, info


def _dataset_info(
    dataset: Mapping[str, Any],
    classes: tuple[str, ...],
    num_train: int,
    num_test: int,
    skipped: int,
) -> DatasetInfo:
    """DatasetInfo after checking the config's class count against the data found."""
    name = _require(dataset, "name")
    num_classes = int(_require(dataset, "num_classes"))
    if num_classes != len(classes):
        raise DatasetError(
            f"dataset.num_classes={num_classes} but the {name} data has {len(classes)} classes "
            f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}); "
            f"set dataset.num_classes={len(classes)} or select classes with dataset.class_list"
        )
    return DatasetInfo(
        name=name,
        num_classes=num_classes,
        image_size=int(_require(dataset, "image_size")),
        num_train=num_train,
        num_test=num_test,
        classes=classes,
        skipped_files=skipped,
    )


def _check_train_size(num_train: int, options: LoaderOptions) -> None:
    if num_train < options.global_batch:
        raise DatasetError(
            f"global batch {options.global_batch} is larger than the {num_train} training images"
        )


# ----------------------------------------------------------------------------- synthetic


def _shifted_by_channel(prototypes: Tensor, labels: Tensor, shifts: Tensor) -> Tensor:
    """prototypes[labels], each circularly shifted by its own (dy, dx) in `shifts` (N, 2), in
    channel-first layout (3, N, H, W): one index_select of flat pixels, the fastest way on CPU."""
    classes, channels, size, _ = prototypes.shape
    rows = (torch.arange(size) + shifts[:, 0, None]) % size
    cols = (torch.arange(size) + shifts[:, 1, None]) % size
    row_start = labels[:, None] * size * size + rows * size  # small (N, H): one full-size add below
    pixel = row_start[:, :, None] + cols[:, None, :]
    by_channel = prototypes.transpose(0, 1).reshape(channels, classes * size * size)
    return by_channel.index_select(1, pixel.view(-1)).view(channels, len(labels), size, size)


def _synthetic_split(
    prototypes: Tensor, size: int, generator: torch.Generator, noise: float, mix: float, shift: int
) -> tuple[Tensor, Tensor]:
    """`size` balanced images of the prototypes' classes, as the module docstring describes."""
    num_classes = len(prototypes)
    labels = (torch.arange(size) % num_classes)[torch.randperm(size, generator=generator)]
    others = (labels + torch.randint(1, num_classes, (size,), generator=generator)) % num_classes
    low, high = _SYNTHETIC_CONTRAST
    contrast = low + (high - low) * torch.rand(1, size, 1, 1, generator=generator)
    mix_weight = mix * torch.rand(1, size, 1, 1, generator=generator)
    own_shift = torch.randint(-shift, shift + 1, (size, 2), generator=generator)
    other_shift = torch.randint(-shift, shift + 1, (size, 2), generator=generator)
    brightness = _SYNTHETIC_BRIGHTNESS_STD * torch.randn(3, size, 1, 1, generator=generator)
    # Built channel-first (3, N, H, W) and transposed once at the end, as uint8 (cheap).
    images = _shifted_by_channel(prototypes, labels, own_shift).mul_(contrast)
    images += _shifted_by_channel(prototypes, others, other_shift).mul_(mix_weight)
    images.mul_(_SYNTHETIC_AMPLITUDE).add_(brightness + 0.5)
    images += noise * torch.randn(images.shape, generator=generator)
    images = images.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    return images.transpose(0, 1).contiguous(), labels


def _synthetic_prototypes(
    num_classes: int, prototype_size: int, image_size: int, seed: int
) -> Tensor:
    """(num_classes, 3, image_size, image_size): smooth random colour patterns of unit std."""
    grid = torch.randn(
        num_classes,
        3,
        prototype_size,
        prototype_size,
        generator=_generator("synthetic-prototypes", seed),
    )
    prototypes = F.interpolate(
        grid, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    return prototypes / prototypes.std(dim=(1, 2, 3), keepdim=True)


def synthetic_splits(dataset: Mapping[str, Any]) -> TensorSplits:
    """The synthetic data set described in the module docstring, from the dataset config node."""
    num_classes = _int_at_least(dataset, "num_classes", 2)
    seed = int(_require(dataset, "seed"))
    prototypes = _synthetic_prototypes(
        num_classes,
        _int_at_least(dataset, "prototype_size", 1),
        _int_at_least(dataset, "image_size", 1),
        seed,
    )
    draw = partial(
        _synthetic_split,
        prototypes,
        noise=float(_require(dataset, "noise")),
        mix=float(_require(dataset, "mix")),
        shift=_int_at_least(dataset, "shift", 0),
    )
    train = draw(_int_at_least(dataset, "train_size", 1), _generator("synthetic-train", seed))
    test = draw(_int_at_least(dataset, "test_size", 1), _generator("synthetic-test", seed))
    return TensorSplits(*train, *test, classes=tuple(f"class{i}" for i in range(num_classes)))


def _build_synthetic(dataset: Mapping[str, Any], options: LoaderOptions) -> Loaders:
    return _tensor_loaders(dataset, synthetic_splits(dataset), options)


# ----------------------------------------------------------------------------- cifar10 / cifar100


def _torchvision_cifar(dataset_class: type, root: Path, *, train: bool, download: bool) -> Any:
    """The torchvision CIFAR split, downloaded if allowed; else DatasetError saying what to do."""
    how_to_get_it = (
        f"download {dataset_class.url} and unpack it there"
        + ("" if download else ", set dataset.download=true")
        + ", or train on an image folder instead (dataset=imagefolder; python "
        "scripts/prepare_data.py unpacks ../shared/data/cifar10-jpeg.tar.gz into its default root)"
    )
    expected = root / dataset_class.base_folder
    missing = f"{dataset_class.__name__} files not found under {root} (expected {expected})"
    try:
        return dataset_class(str(root), train=train, download=False)
    except RuntimeError as error:
        if not download:
            raise DatasetError(f"{missing}; {how_to_get_it}") from error
    try:
        return dataset_class(str(root), train=train, download=True)
    except Exception as failure:  # no network, proxy, checksum: all end in the same advice
        raise DatasetError(
            f"{missing} and the download failed ({failure}); {how_to_get_it}"
        ) from failure


def _cifar_tensors(split: Any) -> tuple[Tensor, Tensor]:
    images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW uint8
    return images, torch.tensor(split.targets, dtype=torch.int64)


def _cifar_builder(dataset_class_name: str) -> Builder:
    def build(dataset: Mapping[str, Any], options: LoaderOptions) -> Loaders:
        import torchvision.datasets  # lazy, as in _resize_center_crop

        dataset_class = getattr(torchvision.datasets, dataset_class_name)
        root = _expanded_path(_require(dataset, "root"))
        download = bool(_require(dataset, "download"))
        train = _torchvision_cifar(dataset_class, root, train=True, download=download)
        test = _torchvision_cifar(dataset_class, root, train=False, download=download)
        splits = TensorSplits(
            *_cifar_tensors(train), *_cifar_tensors(test), classes=tuple(train.classes)
        )
        return _tensor_loaders(dataset, splits, options)

    return build


# ----------------------------------------------------------------------------- image folders


@dataclass(frozen=True)
class ImageFolderLayout:
    """Where an image folder's splits are and which classes (in label order) are used."""

    root: Path
    train_dir: Path
    test_dir: Path
    classes: tuple[str, ...]


def _prepare_advice(root: Path) -> str:
    return (
        f"prepare it with: python scripts/prepare_data.py ARCHIVE --dest {root} "
        "(e.g. ARCHIVE = ../shared/data/cifar10-jpeg.tar.gz), or point dataset.root at a folder "
        "holding train/ and val/ or test/, each with one sub-folder per class"
    )


def _class_dirs(split_dir: Path) -> set[str]:
    return {entry.name for entry in os.scandir(split_dir) if entry.is_dir()}


def _read_class_list(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise DatasetError(f"dataset.class_list file {path} does not exist")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if not names or duplicates:
        raise DatasetError(
            f"class list {path} is empty or repeats classes: {', '.join(duplicates)}"
        )
    return names


def _check_classes_present(split_dir: Path, classes: Sequence[str]) -> None:
    missing = [name for name in classes if not (split_dir / name).is_dir()]
    if missing:
        raise DatasetError(f"classes missing from {split_dir}: {', '.join(missing)}")


def _test_dir(root: Path, choice: str) -> Path:
    if choice != "auto":
        path = root / choice
        if not path.is_dir():
            raise DatasetError(f"dataset.test_dir={choice} but {path} does not exist")
        return path
    present = [root / name for name in ("val", "test") if (root / name).is_dir()]
    if len(present) != 1:
        found = "both val/ and test/" if present else "neither val/ nor test/"
        raise DatasetError(f"image folder {root} has {found}; set dataset.test_dir to val or test")
    return present[0]


def image_folder_layout(dataset: Mapping[str, Any]) -> ImageFolderLayout:
    """Check the folder structure and choose the classes (class_list order, else sorted)."""
    root = _expanded_path(_require(dataset, "root")).resolve()
    if not root.is_dir():
        raise DatasetError(f"image folder root {root} does not exist; {_prepare_advice(root)}")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetError(
            f"image folder root {root} has no train/ folder; {_prepare_advice(root)}"
        )
    test_dir = _test_dir(root, _require_choice(dataset, "test_dir", ("auto", "val", "test")))
    class_list = _require(dataset, "class_list")
    if class_list is None:
        classes = tuple(sorted(_class_dirs(train_dir)))
        extra = sorted(_class_dirs(test_dir) - set(classes))
        if extra:
            raise DatasetError(f"{test_dir} has classes that {train_dir} lacks: {', '.join(extra)}")
    else:
        classes = _read_class_list(_expanded_path(class_list))
    if not classes:
        raise DatasetError(f"{train_dir} has no class folders; {_prepare_advice(root)}")
    _check_classes_present(train_dir, classes)
    _check_classes_present(test_dir, classes)
    return ImageFolderLayout(root, train_dir, test_dir, classes)


def list_image_files(
    split_dir: Path, classes: Sequence[str], max_per_class: int | None
) -> tuple[list[Path], list[int]]:
    """Image files and labels of a split: per class the first `max_per_class` names, sorted."""
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        names = sorted(
            e.name
            for e in os.scandir(class_dir)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not names:
            raise DatasetError(
                f"class folder {class_dir} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
            )
        names = names[:max_per_class]
        files += [class_dir / n for n in names]
        labels += [label] * len(names)
    return files, labels


def _open_rgb(path: Path) -> Image.Image:
    """The decoded RGB image; DatasetError naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() loads the pixels, so truncation shows here
    except (OSError, ValueError, SyntaxError) as error:
        raise DatasetError(
            f"cannot read image file {path}: {error}; remove it, or set dataset.skip_corrupt=true "
            "to skip unreadable files"
        ) from error


def _resize_center_crop(image: Image.Image, resize_to: int, crop: int) -> Image.Image:
    """Shorter side resized to `resize_to`, then the centre crop x crop (no-op at that size)."""
    # torchvision is imported where needed: it adds ~2 s to start-up that synthetic runs skip.
    from torchvision.transforms import functional as TF

    if image.size != (crop, crop):
        image = TF.center_crop(TF.resize(image, resize_to), crop)
    return image


def _load_rgb_image(path: Path, image_size: int) -> np.ndarray:
    """(image_size, image_size, 3) uint8: shorter side resized to image_size, centre crop."""
    return np.array(_resize_center_crop(_open_rgb(path), image_size, image_size))  # writable copy


def _decode_to_tensor(
    files: Sequence[Path], labels: Sequence[int], image_size: int, skip_corrupt: bool
) -> tuple[Tensor, Tensor, int]:
    """All files decoded into one uint8 tensor; unreadable files raise or, if allowed, are
    skipped and counted."""
    images = torch.empty((len(files), 3, image_size, image_size), dtype=torch.uint8)
    kept: list[int] = []
    skipped = 0
    for i, (path, label) in enumerate(zip(files, labels, strict=True)):
        try:
            array = _load_rgb_image(path, image_size)
        except DatasetError as error:
            if not skip_corrupt:
                raise
            logger.warning("skipping unreadable image: %s", error.__cause__ or error)
            skipped += 1
            continue
        images[len(kept)] = torch.from_numpy(array).permute(2, 0, 1)
        kept.append(label)
        if (i + 1) % 10000 == 0:
            logger.info("decoded %d / %d images", i + 1, len(files))
    return images[: len(kept)].clone(), torch.tensor(kept, dtype=torch.int64), skipped


def _cache_path(
    dataset: Mapping[str, Any],
    layout: ImageFolderLayout,
    files: Sequence[Path],
    key: Mapping[str, Any],
) -> Path:
    """Cache file keyed by everything that decides its content, including the file names."""
    content = {
        "format": _CACHE_FORMAT,
        "root": str(layout.root),
        "train_dir": layout.train_dir.name,
        "test_dir": layout.test_dir.name,
        "classes": list(layout.classes),
        "files": [str(f.relative_to(layout.root)) for f in files],
        **key,
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]
    cache_dir = _expanded_path(_require(dataset, "cache_dir"))
    return cache_dir / f"imagefolder-{layout.root.name}-{key['image_size']}px-{digest}.pt"


def _save_atomically(payload: Mapping[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(dict(payload), temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def image_folder_tensors(dataset: Mapping[str, Any]) -> TensorSplits:
    """An image folder decoded once into uint8 tensors at `image_size`, cached under `cache_dir`."""
    layout = image_folder_layout(dataset)
    image_size = int(_require(dataset, "image_size"))
    max_train = _optional_count(dataset, "max_per_class")
    max_test = _optional_count(dataset, "max_test_per_class")
    skip_corrupt = bool(_require(dataset, "skip_corrupt"))
    train_files, train_labels = list_image_files(layout.train_dir, layout.classes, max_train)
    test_files, test_labels = list_image_files(layout.test_dir, layout.classes, max_test)
    key = {
        "image_size": image_size,
        "max_per_class": max_train,
        "max_test_per_class": max_test,
        "skip_corrupt": skip_corrupt,
    }
    cache = _cache_path(dataset, layout, train_files + test_files, key)
    if cache.is_file():
        logger.info("loading the decoded image folder %s from %s", layout.root, cache)
        return _load_cached_splits(cache)
    logger.info(
        "decoding %d images from %s (once; cached in %s)",
        len(train_files) + len(test_files),
        layout.root,
        cache,
    )
    train = _decode_to_tensor(train_files, train_labels, image_size, skip_corrupt)
    test = _decode_to_tensor(test_files, test_labels, image_size, skip_corrupt)
    splits = TensorSplits(*train[:2], *test[:2], layout.classes, skipped_files=train[2] + test[2])
    _save_atomically(_splits_payload(splits), cache)
    return splits


def _splits_payload(splits: TensorSplits) -> dict[str, Any]:
    """A dict torch.load(weights_only=True) can read back: tensors, a list of str, an int."""
    payload = {name: getattr(splits, name) for name in TensorSplits.__dataclass_fields__}
    payload["classes"] = list(splits.classes)
    return payload


def _load_cached_splits(cache: Path) -> TensorSplits:
    try:
        payload = torch.load(cache, weights_only=True)
    except Exception as error:
        raise DatasetError(
            f"cannot read cache file {cache} ({error}); delete it to decode again"
        ) from error
    return TensorSplits(**{**payload, "classes": tuple(payload["classes"])})


def _readable_files(
    files: Sequence[Path], labels: Sequence[int]
) -> tuple[list[Path], list[int], int]:
    """Files whose header PIL can parse and verify (a cheap check, no full decode)."""
    kept_files: list[Path] = []
    kept_labels: list[int] = []
    for path, label in zip(files, labels, strict=True):
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, ValueError, SyntaxError) as error:
            logger.warning("skipping unreadable image %s: %s", path, error)
            continue
        kept_files.append(path)
        kept_labels.append(label)
    return kept_files, kept_labels, len(files) - len(kept_files)


def random_resized_crop_box(
    width: int, height: int, generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3)
    picks it, but drawn from `generator` instead of the global RNG."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target_area = area * (0.08 + 0.92 * torch.rand(1, generator=generator).item())
        ratio = math.exp(
            log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=generator).item()
        )
        crop_w = round(math.sqrt(target_area * ratio))
        crop_h = round(math.sqrt(target_area / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
            return top, left, crop_h, crop_w
    # Fallback as in torchvision: the whole image, clamped to the ratio range.
    in_ratio = width / height
    if in_ratio < 3 / 4:
        crop_w, crop_h = width, round(width / (3 / 4))
    elif in_ratio > 4 / 3:
        crop_h, crop_w = height, round(height * (4 / 3))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


class ImageFileDataset(torch.utils.data.Dataset):
    """Decodes one file per item. Items are (index, epoch): training augmentation is drawn from a
    generator seeded by (seed, epoch, index), so it does not depend on which worker decodes it.

    Not torchvision's ImageFolder: that finds its own files (no class_list, no slices) and its
    transforms draw from each worker's global RNG, which would tie augmentation to the workers."""

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        *,
        image_size: int,
        train_augment: bool,
        seed: int,
    ) -> None:
        self.files = list(files)
        self.labels = list(labels)
        self.image_size = image_size
        self.train_augment = train_augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int]:
        from torchvision.transforms import functional as TF  # lazy: see _resize_center_crop

        index, epoch = item
        image = _open_rgb(self.files[index])
        size = self.image_size
        if self.train_augment:
            generator = _generator("image", self.seed, epoch, index)
            top, left, height, width = random_resized_crop_box(image.width, image.height, generator)
            image = TF.resized_crop(image, top, left, height, width, [size, size], antialias=True)
            if torch.rand(1, generator=generator).item() < 0.5:
                image = TF.hflip(image)
        else:
            image = _resize_center_crop(image, int(size * 256 / 224), size)
        return TF.pil_to_tensor(image), self.labels[index]


class ShardedTrainBatchSampler:
    """This rank's share of each global batch, as (index, epoch) items (see module docstring)."""

    def __init__(self, num_samples: int, options: LoaderOptions) -> None:
        self.num_samples = num_samples
        self.options = options
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.options.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.epoch is None:
            raise RuntimeError("call train_loader.set_epoch(epoch) before iterating")
        _, order = epoch_order(self.num_samples, self.options.seed, self.epoch)
        batch = self.options.rank_batch
        for step in range(len(self)):
            start = step * self.options.global_batch + self.options.rank * batch
            yield [(index, self.epoch) for index in order[start : start + batch].tolist()]


class EvalBatchSampler:
    """This rank's shard of the test set in evaluation order (:func:`eval_order`), in batches
    of `eval_batch`."""

    def __init__(self, num_samples: int, options: LoaderOptions) -> None:
        self.indices = eval_indices(num_samples, options.rank, options.world_size).tolist()
        self.batch = options.eval_batch

    def set_epoch(self, epoch: int) -> None:
        """Evaluation does not depend on the epoch."""

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for start in range(0, len(self.indices), self.batch):
            yield [(i, 0) for i in self.indices[start : start + self.batch]]


class FolderLoader:
    """DataLoader over image files (uint8 batches), moved to the device and normalized there."""

    def __init__(
        self,
        dataset: ImageFileDataset,
        batch_sampler: ShardedTrainBatchSampler | EvalBatchSampler,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        options: LoaderOptions,
    ) -> None:
        self.batch_sampler = batch_sampler
        self.device = options.device
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=options.num_workers,
            pin_memory=options.device.type == "cuda",
            persistent_workers=options.num_workers > 0,
        )
        self._mean, self._std = _channel_stats(mean, std, options.device)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            yield (
                normalize(images, self._mean, self._std),
                labels.to(self.device, non_blocking=True),
            )


def _image_folder_file_loaders(dataset: Mapping[str, Any], options: LoaderOptions) -> Loaders:
    layout = image_folder_layout(dataset)
    image_size = int(_require(dataset, "image_size"))
    train_files, train_labels = list_image_files(
        layout.train_dir, layout.classes, _optional_count(dataset, "max_per_class")
    )
    test_files, test_labels = list_image_files(
        layout.test_dir, layout.classes, _optional_count(dataset, "max_test_per_class")
    )
    skipped = 0
    if _require(dataset, "skip_corrupt"):
        # Only header-level damage is found here; a file that fails later still raises, naming it.
        train_files, train_labels, train_skipped = _readable_files(train_files, train_labels)
        test_files, test_labels, test_skipped = _readable_files(test_files, test_labels)
        skipped = train_skipped + test_skipped
    info = _dataset_info(dataset, layout.classes, len(train_files), len(test_files), skipped)
    _check_train_size(info.num_train, options)
    mean, std = _mean_std(dataset)
    augment = bool(_require(dataset, "augment"))
    train_set = ImageFileDataset(
        train_files, train_labels, image_size=image_size, train_augment=augment, seed=options.seed
    )
    test_set = ImageFileDataset(
        test_files, test_labels, image_size=image_size, train_augment=False, seed=options.seed
    )
    train = FolderLoader(
        train_set,
        ShardedTrainBatchSampler(len(train_set), options),
        mean=mean,
        std=std,
        options=options,
    )
    test = FolderLoader(
        test_set, EvalBatchSampler(len(test_set), options), mean=mean, std=std, options=options
    )
    return train, test, info


def _build_image_folder(dataset: Mapping[str, Any], options: LoaderOptions) -> Loaders:
    preset = _require_choice(dataset, "preset", ("cifar", "imagenet"))
    if preset == "imagenet":
        return _image_folder_file_loaders(dataset, options)
    return _tensor_loaders(dataset, image_folder_tensors(dataset), options)


# ----------------------------------------------------------------------------- archives


def _image_member_key(member: tarfile.TarInfo) -> tuple[str, str, str] | None:
    """(prefix, split, class) for an image file at PREFIX/{train,val,test}/CLASS/FILE, else None."""
    parts = PurePosixPath(member.name).parts
    parts = tuple(p for p in parts if p != ".")
    if not member.isfile() or len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
        return None
    if parts[-3] not in ("train", "val", "test"):
        return None
    return "/".join(parts[:-3]), parts[-3], parts[-2]


def _select_members(
    members: Sequence[tarfile.TarInfo], max_per_class: int | None, max_test_per_class: int | None
) -> tuple[str, list[tarfile.TarInfo]]:
    """The archive's image members (first K names per class and split), in archive order."""
    groups: dict[tuple[str, str, str], list[tarfile.TarInfo]] = {}
    for member in members:
        key = _image_member_key(member)
        if key is not None:
            groups.setdefault(key, []).append(member)
    prefixes = {prefix for prefix, split, _ in groups if split == "train"}
    if len(prefixes) != 1:
        found = ", ".join(sorted(p or "." for p in prefixes)) or "none"
        raise DatasetError(f"expected one train/CLASS/IMAGE tree in the archive, found {found}")
    prefix = prefixes.pop()
    chosen: set[str] = set()
    for (group_prefix, split, _), group in groups.items():
        if group_prefix == prefix:
            limit = max_per_class if split == "train" else max_test_per_class
            chosen.update(m.name for m in sorted(group, key=lambda m: m.name)[:limit])
    return prefix, [m for m in members if m.name in chosen]


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12: refuses unsafe members
        tar.extract(member, dest, filter="data")
        return
    if member.name.startswith("/") or ".." in PurePosixPath(member.name).parts:
        raise DatasetError(f"refusing to extract {member.name!r}: it points outside {dest}")
    tar.extract(member, dest)


def extract_image_folder(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    max_per_class: int | None = None,
    max_test_per_class: int | None = None,
) -> Path:
    """Unpack an image-folder tar archive (train/ and val/ or test/, one folder per class, under
    any top-level folder) into `dest`; return the folder that holds train/.

    Only image files are extracted; with `max_per_class` / `max_test_per_class` only the first K
    names per class (sorted) of the train / test (or val) split. The files go to `dest.partial`
    first and are renamed to `dest` at the end, so an interrupted run leaves no half folder.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DatasetError(f"archive {archive} does not exist")
    if dest.exists() and any(dest.iterdir()):
        raise DatasetError(f"{dest} already exists and is not empty; delete it to extract again")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left over from an interrupted extraction
    try:
        with tarfile.open(archive) as tar:
            logger.info("reading the member list of %s", archive)
            prefix, members = _select_members(tar.getmembers(), max_per_class, max_test_per_class)
            for count, member in enumerate(members, 1):
                # Members in archive order: a compressed stream is read once, front to back.
                _extract_member(tar, member, partial)
                if count % 10000 == 0 or count == len(members):
                    logger.info("extracted %d / %d images", count, len(members))
    except tarfile.TarError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise DatasetError(
            f"cannot read archive {archive}: {error} (tar, tar.gz, tar.bz2, tar.xz are supported)"
        ) from error
    if dest.exists():
        dest.rmdir()  # empty, checked above
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(dest)
    return dest / prefix if prefix else dest


# ----------------------------------------------------------------------------- entry point

DATASET_BUILDERS: dict[str, Builder] = {
    "synthetic": _build_synthetic,
    "cifar10": _cifar_builder("CIFAR10"),
    "cifar100": _cifar_builder("CIFAR100"),
    "imagefolder": _build_image_folder,
}


def build_loaders(
    dataset: Mapping[str, Any],
    *,
    global_batch: int,
    eval_batch: int,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
) -> Loaders:
    """Training and evaluation loaders for this rank, and what the data set is.

    `dataset` is the config's dataset node; `global_batch` the images of one SGD step over all
    ranks (each rank yields global_batch // world_size per step); `seed` the run seed, which
    drives shuffling and augmentation (call `train_loader.set_epoch(epoch)` before each epoch).
    """
    options = LoaderOptions(
        global_batch=global_batch,
        eval_batch=eval_batch,
        seed=seed,
        device=torch.device(device),
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
    )
    name = _require(dataset, "name")
    if name not in DATASET_BUILDERS:
        raise DatasetError(
            f"unknown dataset name {name!r}; known: {', '.join(sorted(DATASET_BUILDERS))}"
        )
    return DATASET_BUILDERS[name](dataset, options)
