"""How batches are drawn: shuffling, sharding over ranks, augmentation and normalization, for
tensors held on the device (`TensorTrainLoader`, `TensorEvalLoader`) and for image files decoded
by DataLoader workers (`FolderLoader`).

Determinism and sharding (both paths). Every random choice is drawn from explicit
`torch.Generator`s seeded from the run seed and the epoch, never from the global RNG, so an
epoch can be replayed bit for bit after a crash. Per epoch, a permutation of the training set
orders it; global step k takes positions [k*G, (k+1)*G) of that order (G = global_batch) and
rank r takes the r-th contiguous piece of G // world_size images. The last partial global batch
is dropped. Augmentation is tied to the image's position in the epoch (tensor path: crop offsets
and flips drawn for the whole epoch from the epoch generator) or to (seed, epoch, image index)
(folder path: one small generator per image), so one process and N processes see exactly the
same augmented images, whatever the number of DataLoader workers.
Evaluation takes the test set in one fixed shuffled order (:func:`eval_order`); with
world_size > 1 rank r takes the contiguous slice [r*N // world_size, (r+1)*N // world_size) of
that order, so the shards never overlap and together cover it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DatasetInfo, seeded_generator
from .sources import open_rgb, resize_center_crop

# CIFAR augmentation: zero padding on each side before the random crop back to the image size.
CIFAR_CROP_PADDING = 4


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



def epoch_order(num_samples: int, seed: int, epoch: int) -> tuple[torch.Generator, Tensor]:
    """The epoch's permutation and the generator it came from (its later draws are augmentation)."""
    generator = seeded_generator("epoch", seed, epoch)
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
    return torch.randperm(num_samples, generator=seeded_generator("evaluation order"))


def eval_indices(num_samples: int, rank: int, world_size: int) -> Tensor:
    """The test-set indices `rank` evaluates, in evaluation order."""
    shard = eval_shard(num_samples, rank, world_size)
    return eval_order(num_samples)[shard.start : shard.stop]


# ----------------------------------------------------------------------------- tensor path


def channel_stats(
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
        self._mean, self._std = channel_stats(mean, std, options.device)
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
        self._mean, self._std = channel_stats(mean, std, options.device)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do; present so that train and eval loaders can be driven alike."""

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.images), self.batch):
            images = self.images[start : start + self.batch]
            yield normalize(images, self._mean, self._std), self.labels[start : start + self.batch]


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
        from torchvision.transforms import functional as TF  # lazy: see resize_center_crop

        index, epoch = item
        image = open_rgb(self.files[index])
        size = self.image_size
        if self.train_augment:
            generator = seeded_generator("image", self.seed, epoch, index)
            top, left, height, width = random_resized_crop_box(image.width, image.height, generator)
            image = TF.resized_crop(image, top, left, height, width, [size, size], antialias=True)
            if torch.rand(1, generator=generator).item() < 0.5:
                image = TF.hflip(image)
        else:
            image = resize_center_crop(image, int(size * 256 / 224), size)
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
        self._mean, self._std = channel_stats(mean, std, options.device)

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

