"""JPEG decoding on the GPU, a batch at a time, for image folders with ``preset: imagenet``.

On a CUDA run whose image files are all JPEGs (by name), DataLoader workers only read each
file's bytes; the main process decodes the whole batch with one call to
``torchvision.io.decode_jpeg(..., device="cuda")`` (nvjpeg) and crops, resizes and flips on the
GPU. The CPU path (PIL in the workers, `batches.ImageFileDataset`) is unchanged and is what
every other run uses.

The augmentation is the CPU path's: the same crop box and flip from the generator seeded by
(seed, epoch, image index), so a step sees the same crops of the same images whichever path
decodes them; pixels differ by the decoders' and resamplers' rounding (a few levels of 255).

A file nvjpeg refuses (a CMYK JPEG, a PNG named .jpg) is decoded by PIL on the CPU, with a
warning naming it once; a file nothing can decode raises DatasetError naming it, as on the CPU
path.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .base import DatasetError, seeded_generator
from .batches import (EvalBatchSampler, LoaderOptions, ShardedTrainBatchSampler, channel_stats,
                      normalize, random_resized_crop_box)
from .sources import open_rgb

logger = logging.getLogger(__name__)

JPEG_EXTENSIONS = (".jpg", ".jpeg")


def all_jpeg(files: Sequence[Path]) -> bool:
    """Whether every file is named as a JPEG (what decides the GPU path)."""
    return all(path.name.lower().endswith(JPEG_EXTENSIONS) for path in files)


def decode_jpegs(encoded: list[Tensor], device: torch.device) -> list[Tensor]:
    """RGB uint8 (3, H, W) images on `device` from JPEG bytes: one batched decode_jpeg call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec, which is not a
        # dependency; decode_jpeg is still there and is what #13 asks for.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


class EncodedImageDataset(torch.utils.data.Dataset):
    """One file's bytes per item (index, epoch); the decoding happens later, on the device."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int]) -> None:
        self.files = list(files)
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int, int, int]:
        index, epoch = item
        try:
            encoded = self.files[index].read_bytes()
        except OSError as error:
            raise DatasetError(f"cannot read image file {self.files[index]}: {error}") from error
        data = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
        return data, self.labels[index], index, epoch


def _collate(
    items: list[tuple[Tensor, int, int, int]],
) -> tuple[list[Tensor], Tensor, list[int], list[int]]:
    """A batch of byte strings of different lengths stays a list (no stacking)."""
    encoded, labels, indices, epochs = zip(*items, strict=True)
    return list(encoded), torch.tensor(labels, dtype=torch.int64), list(indices), list(epochs)


class DeviceJpegLoader:
    """Batches of JPEGs decoded and augmented on the loader's device (CUDA in practice; any
    device works, which lets the tests run it on the CPU). Same interface as FolderLoader."""

    def __init__(
        self,
        dataset: EncodedImageDataset,
        batch_sampler: ShardedTrainBatchSampler | EvalBatchSampler,
        *,
        image_size: int,
        train_augment: bool,
        mean: Sequence[float],
        std: Sequence[float],
        options: LoaderOptions,
    ) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.device = options.device
        self.image_size = image_size
        self.train_augment = train_augment
        self.seed = options.seed
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=options.num_workers,
            collate_fn=_collate,
            persistent_workers=options.num_workers > 0,
        )
        self._mean, self._std = channel_stats(mean, std, options.device)
        self._decoded_on_cpu: set[Path] = set()  # files nvjpeg refused (warned about once)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for encoded, labels, indices, epochs in self.loader:
            images = self._decode(encoded, indices)
            images = torch.stack(
                [self._transform(image, index, epoch)
                 for image, index, epoch in zip(images, indices, epochs, strict=True)]
            )
            yield normalize(images, self._mean, self._std), labels.to(self.device)

    def _decode(self, encoded: list[Tensor], indices: list[int]) -> list[Tensor]:
        try:
            return decode_jpegs(encoded, self.device)
        except RuntimeError:
            # One file spoiled the batch (the call returns nothing then): decode one by one.
            return [self._decode_one(data, index) for data, index in zip(encoded, indices)]

    def _decode_one(self, encoded: Tensor, index: int) -> Tensor:
        try:
            return decode_jpegs([encoded], self.device)[0]
        except RuntimeError as error:
            path = self.dataset.files[index]
            image = open_rgb(path)  # DatasetError naming the file if PIL cannot read it either
            if path not in self._decoded_on_cpu:
                self._decoded_on_cpu.add(path)
                logger.warning("decoding %s on the CPU: the GPU decoder refused it (%s)", path,
                               str(error).splitlines()[-1])
            from torchvision.transforms import functional as TF

            return TF.pil_to_tensor(image).to(self.device)

    def _transform(self, image: Tensor, index: int, epoch: int) -> Tensor:
        """The CPU path's transforms (ImageFileDataset) on a (3, H, W) uint8 tensor."""
        from torchvision.transforms import functional as TF

        size = self.image_size
        height, width = image.shape[-2:]
        if self.train_augment:
            generator = seeded_generator("image", self.seed, epoch, index)
            top, left, crop_h, crop_w = random_resized_crop_box(width, height, generator)
            image = TF.resized_crop(image, top, left, crop_h, crop_w, [size, size], antialias=True)
            if torch.rand(1, generator=generator).item() < 0.5:
                image = image.flip(-1)
            return image
        if (height, width) != (size, size):
            image = TF.center_crop(TF.resize(image, int(size * 256 / 224), antialias=True), size)
        return image


def device_jpeg_loaders(
    train_files: Sequence[Path],
    train_labels: Sequence[int],
    test_files: Sequence[Path],
    test_labels: Sequence[int],
    *,
    image_size: int,
    augment: bool,
    mean: Sequence[float],
    std: Sequence[float],
    options: LoaderOptions,
) -> tuple[DeviceJpegLoader, DeviceJpegLoader]:
    """Training and evaluation loaders that decode on `options.device`."""
    train_set = EncodedImageDataset(train_files, train_labels)
    test_set = EncodedImageDataset(test_files, test_labels)
    common = {"image_size": image_size, "mean": mean, "std": std, "options": options}
    train = DeviceJpegLoader(
        train_set, ShardedTrainBatchSampler(len(train_set), options), train_augment=augment,
        **common,
    )
    test = DeviceJpegLoader(
        test_set, EvalBatchSampler(len(test_set), options), train_augment=False, **common
    )
    return train, test
