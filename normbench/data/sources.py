"""Where pixels come from: every data set as uint8 images and int64 labels, before any batch is
drawn (that is `batches.py`).

Synthetic data (`name: synthetic`) is generated in memory from `dataset.seed` (not the run seed:
all runs of a sweep see the same images) and never cached. Each class has a prototype: random
normal noise of shape 3 x `prototype_size` x `prototype_size`, bilinearly upsampled to
`image_size` and scaled to unit standard deviation (a smooth colour pattern). An image of class y
is

    0.5 + 0.15 * (c * roll(P[y]) + m * roll(P[z])) + b + noise * N(0, 1)

clipped to [0, 1] and stored as uint8, where c ~ U(0.6, 1.4) is the contrast, z a random other
class mixed in with weight m ~ U(0, mix), each prototype circularly shifted by its own random
offset of up to `shift` pixels in each direction, b ~ N(0, brightness) a per-channel brightness and
`noise` the pixel noise. The random shifts make a linear classifier useless (a CNN must learn
shift-invariant features); the mixed-in class and the noise keep it from being solved at once.
Labels are balanced (every class gets n // num_classes or one more images). Train and test use
separate generator streams of the same prototypes. Generating 10,000 images takes about 1 s on
two CPU cores. Difficulty with the defaults (10k train, prototype_size 8, noise 0.3, mix 0.8,
shift 16), CIFAR ResNet-8, batch 64, 2 busy CPU cores: BN about 45% test error after one epoch
(~25 s) and 16% after five; GN starts slower (71% after one epoch) and reaches 10% after six.

CIFAR-10 / CIFAR-100 come from torchvision's files.

Image folders (`name: imagefolder`): root/train/CLASS/* and root/val/ or root/test/ alike. With
`preset: cifar` every image is decoded once (shorter side resized to image_size, centre crop)
into a uint8 tensor cached under `cache_dir`, keyed by a hash of the root, the test folder, the
classes, the selected files with their sizes and modification times (so a file replaced by
another is decoded again), the slice sizes, image_size and skip_corrupt; written to a temporary
file and renamed, so a cache file is always whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .base import (IMAGE_EXTENSIONS, DatasetError, TensorSplits, expanded_path, int_at_least,
                   optional_count, require, require_choice, seeded_generator)

logger = logging.getLogger(__name__)

# Bump when the content of the decoded-tensor cache changes, so stale caches are not reused.
_CACHE_FORMAT = 1
# Synthetic data: range of the per-image contrast.
_SYNTHETIC_CONTRAST = (0.6, 1.4)
# Synthetic data: prototypes of unit std are scaled by this around mid-grey (0.5).
_SYNTHETIC_AMPLITUDE = 0.15


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
    prototypes: Tensor, size: int, generator: torch.Generator, noise: float, mix: float, shift: int,
    brightness: float,
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
    brightness_shift = brightness * torch.randn(3, size, 1, 1, generator=generator)
    # Built channel-first (3, N, H, W) and transposed once at the end, as uint8 (cheap).
    images = _shifted_by_channel(prototypes, labels, own_shift).mul_(contrast)
    images += _shifted_by_channel(prototypes, others, other_shift).mul_(mix_weight)
    images.mul_(_SYNTHETIC_AMPLITUDE).add_(brightness_shift + 0.5)
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
        generator=seeded_generator("synthetic-prototypes", seed),
    )
    prototypes = F.interpolate(
        grid, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    return prototypes / prototypes.std(dim=(1, 2, 3), keepdim=True)


def synthetic_splits(dataset: Mapping[str, Any]) -> TensorSplits:
    """The synthetic data set described in the module docstring, from the dataset config node."""
    num_classes = int_at_least(dataset, "num_classes", 2)
    seed = int(require(dataset, "seed"))
    prototypes = _synthetic_prototypes(
        num_classes,
        int_at_least(dataset, "prototype_size", 1),
        int_at_least(dataset, "image_size", 1),
        seed,
    )
    draw = partial(
        _synthetic_split,
        prototypes,
        noise=float(require(dataset, "noise")),
        mix=float(require(dataset, "mix")),
        shift=int_at_least(dataset, "shift", 0),
        brightness=float(require(dataset, "brightness")),
    )
    train = draw(int_at_least(dataset, "train_size", 1), seeded_generator("synthetic-train", seed))
    test = draw(int_at_least(dataset, "test_size", 1), seeded_generator("synthetic-test", seed))
    return TensorSplits(*train, *test, classes=tuple(f"class{i}" for i in range(num_classes)))


# ----------------------------------------------------------------------------- cifar10 / cifar100


def torchvision_cifar(dataset_class: type, root: Path, *, train: bool, download: bool) -> Any:
    """The torchvision CIFAR split, downloaded if allowed; else DatasetError saying what to do."""
    how_to_get_it = (
        f"download {dataset_class.url} and unpack it there"
        + ("" if download else ", set dataset.download=true")
        + ", or train on an image folder instead (dataset=imagefolder; `normbench prepare-data "
        "../shared/data/cifar10-jpeg.tar.gz` unpacks it into its default root)"
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


def cifar_tensors(split: Any) -> tuple[Tensor, Tensor]:
    images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW uint8
    return images, torch.tensor(split.targets, dtype=torch.int64)


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
        f"prepare it with: normbench prepare-data ARCHIVE --dest {root} "
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
    root = expanded_path(require(dataset, "root")).resolve()
    if root.exists() and not root.is_dir():
        raise DatasetError(
            f"dataset.root={root} is a file, not a folder; {_prepare_advice(root)} (an archive "
            "is unpacked with `normbench prepare-data`, not read in place)"
        )
    if not root.is_dir():
        raise DatasetError(f"image folder root {root} does not exist; {_prepare_advice(root)}")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetError(
            f"image folder root {root} has no train/ folder; {_prepare_advice(root)}"
        )
    test_dir = _test_dir(root, require_choice(dataset, "test_dir", ("auto", "val", "test")))
    class_list = require(dataset, "class_list")
    if class_list is None:
        classes = tuple(sorted(_class_dirs(train_dir)))
        extra = sorted(_class_dirs(test_dir) - set(classes))
        if extra:
            raise DatasetError(f"{test_dir} has classes that {train_dir} lacks: {', '.join(extra)}")
    else:
        classes = _read_class_list(expanded_path(class_list))
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


def open_rgb(path: Path) -> Image.Image:
    """The decoded RGB image; DatasetError naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() loads the pixels, so truncation shows here
    except (OSError, ValueError, SyntaxError) as error:
        raise DatasetError(
            f"cannot read image file {path}: {error}; remove it, or set dataset.skip_corrupt=true "
            "to skip unreadable files"
        ) from error


def resize_center_crop(image: Image.Image, resize_to: int, crop: int) -> Image.Image:
    """Shorter side resized to `resize_to`, then the centre crop x crop (no-op at that size)."""
    # torchvision is imported where needed: it adds ~2 s to start-up that synthetic runs skip.
    from torchvision.transforms import functional as TF

    if image.size != (crop, crop):
        image = TF.center_crop(TF.resize(image, resize_to), crop)
    return image


def _load_rgb_image(path: Path, image_size: int) -> np.ndarray:
    """(image_size, image_size, 3) uint8: shorter side resized to image_size, centre crop."""
    return np.array(resize_center_crop(open_rgb(path), image_size, image_size))  # writable copy


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
            # The file's name and the decoder's reason (PIL's message, e.g. "image file is
            # truncated", does not name the file).
            logger.warning("skipping unreadable image %s: %s", path, error.__cause__ or error)
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
    """Cache file keyed by everything that decides its content, including the files."""
    content = {
        "format": _CACHE_FORMAT,
        "root": str(layout.root),
        "train_dir": layout.train_dir.name,
        "test_dir": layout.test_dir.name,
        "classes": list(layout.classes),
        # What each file is, not only its name: a file replaced by another (a corrupt image by
        # a good one) changes its size or modification time, so it is decoded again.
        "files": [_file_identity(f, layout.root) for f in files],
        **key,
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]
    cache_dir = expanded_path(require(dataset, "cache_dir"))
    return cache_dir / f"imagefolder-{layout.root.name}-{key['image_size']}px-{digest}.pt"


def _file_identity(path: Path, root: Path) -> tuple[str, int, int]:
    """(name under root, size in bytes, modification time in ns): what the cache key knows of a
    file. Cheaper than hashing the contents (one stat per file) and changed by any rewrite."""
    stat = path.stat()
    return str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns


def _check_writable_cache_dir(folder: Path) -> None:
    """DatasetError naming ``dataset.cache_dir`` when the decoded images could not be saved
    there (a path under a file, a read-only folder)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise DatasetError(
            f"dataset.cache_dir={str(folder)!r} cannot be written ({error}); choose a writable "
            f"folder for the decoded images"
        ) from None


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
    image_size = int(require(dataset, "image_size"))
    max_train = optional_count(dataset, "max_per_class")
    max_test = optional_count(dataset, "max_test_per_class")
    skip_corrupt = bool(require(dataset, "skip_corrupt"))
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
    _check_writable_cache_dir(cache.parent)  # before minutes of decoding, not after
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


def readable_files(
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

