"""Data sets and loaders: one call, `build_loaders`, turns the `dataset` config node into loaders.

Loaders yield `(images, labels)`: images float32 NCHW on the device, normalized by the config's
`mean` and `std`; labels int64 on the device. There are two implementations:

- `TensorTrainLoader` / `TensorEvalLoader` (synthetic, cifar10, cifar100, imagefolder with
  `preset: cifar`): the whole split is one uint8 tensor on the device and CIFAR augmentation
  (zero-pad 4, random 32x32 crop, horizontal flip) is a single batched gather, airbench style.
- `FolderLoader` (imagefolder with `preset: imagenet`): files decoded by DataLoader workers,
  RandomResizedCrop + flip for training, Resize(size * 256 / 224) + CenterCrop for evaluation;
  `DeviceJpegLoader` instead on CUDA when every file is a JPEG: workers read the bytes and each
  batch is decoded and cropped on the GPU (`gpu_jpeg.py`).

The package is split along the seam between where pixels come from (`sources.py`) and how
batches are drawn (`batches.py`). Imports go one way, down this list:

- `__init__` (this file): `build_loaders`, the builder of each data set name.
- `gpu_jpeg.py`: batched JPEG decoding on the device for the folder loader.
- `batches.py`: shuffling, sharding, augmentation, normalization; the loaders.
- `sources.py`: synthetic data, torchvision's CIFAR, image folders and their decoded cache.
- `archives.py`: unpacking an image-folder archive (scripts/prepare_data.py).
- `presets.py`: the image-folder presets' defaults (image size, mean, std, stem).
- `workers.py`: how many DataLoader workers `num_workers: auto` means here.
- `base.py`: the error, `DatasetInfo`, `TensorSplits`, reading the config node, seeds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .archives import extract_image_folder
from .base import (IMAGE_EXTENSIONS, DatasetError, DatasetInfo, TensorSplits, derive_seed,
                   expanded_path, mean_std, optional_count, require)
from .batches import (CIFAR_CROP_PADDING, EpochPlan, EvalBatchSampler, EvalLoader, FolderLoader,
                      ImageFileDataset, LoaderOptions, Loaders, ShardedTrainBatchSampler,
                      TensorEvalLoader, TensorTrainLoader, TrainLoader, crop_and_flip,
                      epoch_order, eval_indices, eval_order, eval_shard, gather_windows,
                      normalize, random_resized_crop_box)
from .gpu_jpeg import DeviceJpegLoader, all_jpeg, device_jpeg_loaders
from .presets import (PRESET_NAMES, PRESETS, check_preset, preset_default,
                      register_preset_resolver)
from .sources import (ImageFolderLayout, cifar_tensors, image_folder_layout, image_folder_tensors,
                      list_image_files, readable_files, synthetic_splits, torchvision_cifar)
from .workers import auto_num_workers, available_cpus, resolve_num_workers

logger = logging.getLogger(__name__)

# A data set's builder: (dataset config node, options) -> loaders; see DATASET_BUILDERS.
Builder = Callable[[Mapping[str, Any], LoaderOptions], Loaders]


def _tensor_loaders(
    dataset: Mapping[str, Any], splits: TensorSplits, options: LoaderOptions
) -> tuple[TensorTrainLoader, TensorEvalLoader, DatasetInfo]:
    num_train, num_test = len(splits.train_images), len(splits.test_images)
    info = _dataset_info(dataset, splits.classes, num_train, num_test, splits.skipped_files)
    _check_train_size(info.num_train, options)
    size = splits.train_images.shape[-1]
    if size != info.image_size:
        raise DatasetError(f"dataset.image_size={info.image_size}: {info.name} is {size}x{size}")
    mean, std = mean_std(dataset)
    augment = bool(require(dataset, "augment"))
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
    num_workers: int = 0,
) -> DatasetInfo:
    """DatasetInfo after checking the config's class count against the data found."""
    name = require(dataset, "name")
    num_classes = int(require(dataset, "num_classes"))
    if num_classes != len(classes):
        raise DatasetError(
            f"dataset.num_classes={num_classes} but the {name} data has {len(classes)} classes "
            f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}); "
            f"set dataset.num_classes={len(classes)} or select classes with dataset.class_list"
        )
    return DatasetInfo(
        name=name,
        num_classes=num_classes,
        image_size=int(require(dataset, "image_size")),
        num_train=num_train,
        num_test=num_test,
        classes=classes,
        skipped_files=skipped,
        num_workers=num_workers,
    )


def _check_train_size(num_train: int, options: LoaderOptions) -> None:
    if num_train < options.global_batch:
        raise DatasetError(
            f"global batch {options.global_batch} is larger than the {num_train} training images"
        )


def _build_synthetic(dataset: Mapping[str, Any], options: LoaderOptions) -> Loaders:
    return _tensor_loaders(dataset, synthetic_splits(dataset), options)


def _cifar_builder(dataset_class_name: str) -> Builder:
    def build(dataset: Mapping[str, Any], options: LoaderOptions) -> Loaders:
        import torchvision.datasets  # lazy, as in resize_center_crop

        dataset_class = getattr(torchvision.datasets, dataset_class_name)
        root = expanded_path(require(dataset, "root"))
        download = bool(require(dataset, "download"))
        train = torchvision_cifar(dataset_class, root, train=True, download=download)
        test = torchvision_cifar(dataset_class, root, train=False, download=download)
        splits = TensorSplits(
            *cifar_tensors(train), *cifar_tensors(test), classes=tuple(train.classes)
        )
        return _tensor_loaders(dataset, splits, options)

    return build


def _image_folder_file_loaders(dataset: Mapping[str, Any], options: LoaderOptions) -> Loaders:
    layout = image_folder_layout(dataset)
    image_size = int(require(dataset, "image_size"))
    train_files, train_labels = list_image_files(
        layout.train_dir, layout.classes, optional_count(dataset, "max_per_class")
    )
    test_files, test_labels = list_image_files(
        layout.test_dir, layout.classes, optional_count(dataset, "max_test_per_class")
    )
    skipped = 0
    if require(dataset, "skip_corrupt"):
        # Only header-level damage is found here; a file that fails later still raises, naming it.
        train_files, train_labels, train_skipped = readable_files(train_files, train_labels)
        test_files, test_labels, test_skipped = readable_files(test_files, test_labels)
        skipped = train_skipped + test_skipped
    info = _dataset_info(
        dataset, layout.classes, len(train_files), len(test_files), skipped, options.num_workers
    )
    _check_train_size(info.num_train, options)
    mean, std = mean_std(dataset)
    augment = bool(require(dataset, "augment"))
    if options.device.type == "cuda":
        if all_jpeg(train_files + test_files):
            logger.info("decoding the JPEGs on %s, a batch at a time", options.device)
            train, test = device_jpeg_loaders(
                train_files, train_labels, test_files, test_labels, image_size=image_size,
                augment=augment, mean=mean, std=std, options=options,
            )
            return train, test, info
        logger.info("decoding images on the CPU (DataLoader workers): not every file is a JPEG")
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
    preset = check_preset(require(dataset, "preset"))
    if preset == "imagenet":
        return _image_folder_file_loaders(dataset, options)
    return _tensor_loaders(dataset, image_folder_tensors(dataset), options)


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
    num_workers: int | str,
) -> Loaders:
    """Training and evaluation loaders for this rank, and what the data set is.

    `dataset` is the config's dataset node; `global_batch` the images of one SGD step over all
    ranks (each rank yields global_batch // world_size per step); `seed` the run seed, which
    drives shuffling and augmentation (call `train_loader.set_epoch(epoch)` before each epoch);
    `num_workers` the DataLoader processes of the file loader, or "auto" (`workers.py`); the
    DatasetInfo says how many were used.
    """
    options = LoaderOptions(
        global_batch=global_batch,
        eval_batch=eval_batch,
        seed=seed,
        device=torch.device(device),
        rank=rank,
        world_size=world_size,
        num_workers=resolve_num_workers(num_workers),
    )
    name = require(dataset, "name")
    if name not in DATASET_BUILDERS:
        raise DatasetError(
            f"unknown dataset name {name!r}; known: {', '.join(sorted(DATASET_BUILDERS))}"
        )
    return DATASET_BUILDERS[name](dataset, options)


# The names other modules, scripts and tests import from `normbench.data`.
__all__ = [
    "CIFAR_CROP_PADDING", "DATASET_BUILDERS", "DatasetError", "DatasetInfo", "DeviceJpegLoader",
    "EpochPlan", "EvalBatchSampler", "EvalLoader", "FolderLoader", "IMAGE_EXTENSIONS",
    "ImageFileDataset", "ImageFolderLayout", "LoaderOptions", "Loaders", "PRESETS", "PRESET_NAMES",
    "ShardedTrainBatchSampler", "TensorEvalLoader", "TensorSplits", "TensorTrainLoader",
    "TrainLoader", "auto_num_workers", "available_cpus", "build_loaders", "check_preset",
    "crop_and_flip", "derive_seed", "device_jpeg_loaders", "epoch_order", "eval_indices",
    "eval_order", "eval_shard",
    "extract_image_folder", "gather_windows", "image_folder_layout", "image_folder_tensors",
    "list_image_files", "normalize", "preset_default", "random_resized_crop_box",
    "register_preset_resolver", "resolve_num_workers", "synthetic_splits",
]
