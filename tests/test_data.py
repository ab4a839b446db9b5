"""Tests of normbench.data: synthetic data, determinism, sharding, augmentation, image folders."""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import re
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor

from conftest import compose_config
from normbench import data
from normbench.data import DatasetError, build_loaders

REPO = Path(__file__).parents[1]
CIFAR_JPEG = REPO / "../shared/data/cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CPU = torch.device("cpu")


def dataset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """conf/dataset/NAME.yaml, resolved, with overrides: tests use the shipped defaults."""
    config = OmegaConf.merge(OmegaConf.load(REPO / "conf/dataset" / f"{name}.yaml"), overrides)
    return OmegaConf.to_container(config, resolve=True)


def small_synthetic(**overrides: Any) -> dict[str, Any]:
    return dataset_config("synthetic", **{"train_size": 200, "test_size": 70, **overrides})


def loaders(dataset: dict[str, Any], **kwargs: Any) -> tuple[Any, Any, data.DatasetInfo]:
    arguments = {"global_batch": 32, "eval_batch": 30, "seed": 1, "device": CPU, "num_workers": 0}
    return build_loaders(dataset, **{**arguments, **kwargs})


def epoch_batches(loader: Any, epoch: int) -> list[tuple[Tensor, Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def to_uint8(images: Tensor, dataset: dict[str, Any]) -> Tensor:
    """Undo the loader's normalization: back to the exact uint8 pixels."""
    mean = torch.tensor(dataset["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(dataset["std"]).view(1, 3, 1, 1)
    return (images * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


def assert_same_batches(
    a: Iterable[tuple[Tensor, Tensor]], b: Iterable[tuple[Tensor, Tensor]]
) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for (images_a, labels_a), (images_b, labels_b) in zip(a, b, strict=True):
        assert torch.equal(images_a, images_b)
        assert torch.equal(labels_a, labels_b)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["synthetic", "cifar10", "cifar100", "imagefolder"])
def test_dataset_yaml_has_common_keys(name: str) -> None:
    config = dataset_config(name)
    assert config["name"] == name
    for key in ("num_classes", "image_size", "stem", "mean", "std", "augment"):
        assert key in config, key
    assert len(config["mean"]) == len(config["std"]) == 3


def test_imagefolder_stem_follows_preset() -> None:
    assert dataset_config("imagefolder")["stem"] == "cifar"
    assert dataset_config("imagefolder", preset="imagenet")["stem"] == "imagenet"


def test_imagenet_preset_brings_imagenet_defaults_unless_overridden() -> None:
    from normbench.data.presets import PRESETS

    cifar = compose_config(["dataset=imagefolder"])
    assert cifar["dataset"]["image_size"] == 32 and cifar["model"]["stem"] == "cifar"
    assert cifar["dataset"]["mean"] == [0.4914, 0.4822, 0.4465]  # run hashes stay as they were
    imagenet = compose_config(["dataset=imagefolder", "dataset.preset=imagenet"])["dataset"]
    assert (imagenet["image_size"], imagenet["stem"]) == (224, "imagenet")
    assert imagenet["mean"] == [0.485, 0.456, 0.406] and imagenet["std"] == [0.229, 0.224, 0.225]
    assert {k: imagenet[k] for k in PRESETS["imagenet"]} == PRESETS["imagenet"]
    mine = compose_config(["dataset=imagefolder", "dataset.preset=imagenet",
                           "dataset.image_size=160", "dataset.mean=[0.5,0.5,0.5]"])["dataset"]
    assert (mine["image_size"], mine["mean"], mine["std"]) == (160, [0.5] * 3, imagenet["std"])


def test_preset_defaults_are_written_once() -> None:
    # The preset's values live in normbench/data/presets.py; the YAML only points at them.
    text = (REPO / "conf/dataset/imagefolder.yaml").read_text()
    for key in ("image_size", "mean", "std", "stem"):
        assert f"{key}: ${{dataset_preset:${{.preset}},{key}}}" in text
    assert "0.485" not in text and "0.4914" not in text


def test_bad_preset_is_named_as_dataset_preset() -> None:
    from normbench.config import ConfigError, validate_config

    config = compose_config(["dataset=imagefolder", "dataset.preset=bogus"])
    with pytest.raises((DatasetError, ConfigError), match=r"dataset\.preset='bogus'") as error:
        validate_config(config)
    assert "cifar, imagenet" in str(error.value) and "model.stem" not in str(error.value)
    with pytest.raises(DatasetError, match=r"dataset\.preset='bogus'.*cifar, imagenet"):
        loaders({**dataset_config("imagefolder"), "preset": "bogus"})


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(DatasetError, match="cifar10, cifar100, imagefolder, synthetic"):
        loaders({"name": "mnist"})


def test_missing_key_is_named() -> None:
    config = small_synthetic()
    del config["noise"]
    with pytest.raises(DatasetError, match="'noise'"):
        loaders(config)


def test_bad_choice_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset\.preset='tiny'"):
        loaders(dataset_config("imagefolder", root=str(tmp_path), preset="tiny"))


def test_global_batch_must_split_evenly_over_ranks() -> None:
    with pytest.raises(ValueError, match="multiple of world_size=3"):
        loaders(small_synthetic(), global_batch=32, world_size=3)


def test_global_batch_larger_than_train_set_fails() -> None:
    with pytest.raises(DatasetError, match="larger than the 200 training images"):
        loaders(small_synthetic(), global_batch=256)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_in_its_own_seed() -> None:
    first, again = (
        data.synthetic_splits(small_synthetic()),
        data.synthetic_splits(small_synthetic()),
    )
    other = data.synthetic_splits(small_synthetic(seed=1))
    assert torch.equal(first.train_images, again.train_images)
    assert torch.equal(first.test_labels, again.test_labels)
    assert not torch.equal(first.train_images, other.train_images)


def test_synthetic_does_not_depend_on_run_seed() -> None:
    _, test_a, _ = loaders(small_synthetic(), seed=1)
    _, test_b, _ = loaders(small_synthetic(), seed=2)
    assert_same_batches(test_a, test_b)


def test_synthetic_train_and_test_are_separate_draws() -> None:
    splits = data.synthetic_splits(small_synthetic(test_size=200))
    assert not torch.equal(splits.train_images, splits.test_images)
    train = {bytes(image.numpy()) for image in splits.train_images}
    assert not any(bytes(image.numpy()) in train for image in splits.test_images)


def test_synthetic_brightness_is_the_spread_of_each_images_mean_colour() -> None:
    # b ~ N(0, brightness) per image and channel: the channel means of the images spread by
    # about that much (the patterns add 0.03; clipping to [0, 1] takes some of a large spread
    # off), while each image's own spatial contrast stays about as it was
    def spread(brightness: float) -> tuple[float, float]:
        images = data.synthetic_splits(small_synthetic(brightness=brightness)).train_images
        pixels = images.double() / 255
        channel_means = pixels.mean(dim=(2, 3))
        return channel_means.std().item(), pixels.std(dim=(2, 3)).mean().item()

    (low_between, low_within), (high_between, high_within) = spread(0.05), spread(0.2)
    assert 0.04 < low_between < 0.07 and 0.13 < high_between < 0.2
    assert abs(high_within - low_within) < 0.03


def test_synthetic_default_brightness_draws_the_images_drawn_before_it_was_a_key() -> None:
    # The value every run before the key had (normbench.config.ADDED_DATASET_KEYS): the images,
    # and so the results of those runs, are the same
    from normbench.config import ADDED_DATASET_KEYS

    assert dataset_config("synthetic")["brightness"] == ADDED_DATASET_KEYS["synthetic"]["brightness"]
    splits = data.synthetic_splits(small_synthetic())
    # pixel sums of the same data set computed with the code before the key existed
    assert int(splits.train_images.long().sum()) == 78507773
    assert int(splits.test_images.long().sum()) == 27572262


def test_synthetic_shapes_dtypes_and_balance() -> None:
    splits = data.synthetic_splits(small_synthetic(train_size=203))
    assert splits.train_images.shape == (203, 3, 32, 32)
    assert splits.train_images.dtype == torch.uint8
    assert splits.train_labels.dtype == torch.int64
    counts = torch.bincount(splits.train_labels, minlength=10)
    assert counts.min() == 20 and counts.max() == 21
    assert splits.test_images.shape == (70, 3, 32, 32)
    assert splits.train_images.float().std() > 20  # uses the pixel range, not a flat grey


def test_synthetic_mean_std_in_yaml_match_the_data() -> None:
    config = dataset_config("synthetic")
    images = data.synthetic_splits({**config, "train_size": 2000, "test_size": 10}).train_images
    pixels = images.float().div(255).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(pixels.mean(dim=1), torch.tensor(config["mean"]), atol=0.01)
    assert torch.allclose(pixels.std(dim=1), torch.tensor(config["std"]), atol=0.01)


def test_synthetic_generation_is_fast() -> None:
    config = dataset_config("synthetic", train_size=10_000, test_size=10)
    data.synthetic_splits({**config, "train_size": 100})  # warm-up
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of one thread: robust to other jobs and to core counts
    try:
        start = time.process_time()
        data.synthetic_splits(config)
        seconds = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    assert seconds < 2.0  # about 0.8 s here; the budget is 2 s for 10k images


def test_loader_yields_normalized_float_images_and_int64_labels() -> None:
    config = small_synthetic()
    train, test, info = loaders(config)
    assert info == data.DatasetInfo(
        "synthetic", 10, 32, 200, 70, tuple(f"class{i}" for i in range(10))
    )
    images, labels = next(iter(epoch_batches(train, 0)))
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (32,) and labels.dtype == torch.int64
    test_images, _ = next(iter(test))
    assert abs(test_images.mean().item()) < 0.3 and 0.7 < test_images.std().item() < 1.3


# ----------------------------------------------------------------------------- epochs and ranks


def test_set_epoch_is_required() -> None:
    train, _, _ = loaders(small_synthetic())
    with pytest.raises(RuntimeError, match="set_epoch"):
        next(iter(train))


def test_an_epoch_replays_exactly_and_epochs_differ() -> None:
    train, _, _ = loaders(small_synthetic())
    resumed, _, _ = loaders(small_synthetic())  # a fresh process resuming at epoch 3
    epoch3 = epoch_batches(train, 3)
    assert_same_batches(epoch3, epoch_batches(train, 3))
    assert_same_batches(epoch3, epoch_batches(resumed, 3))
    assert not torch.equal(epoch3[0][0], epoch_batches(train, 4)[0][0])
    other_seed, _, _ = loaders(small_synthetic(), seed=2)
    assert not torch.equal(epoch3[0][0], epoch_batches(other_seed, 3)[0][0])


def test_loaders_leave_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    train, test, _ = loaders(small_synthetic())
    epoch_batches(train, 0)
    list(test)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_together_see_the_single_process_batches(world_size: int) -> None:
    config = small_synthetic()
    single, _, _ = loaders(config, global_batch=32)
    ranks = [
        loaders(config, global_batch=32, rank=r, world_size=world_size)[0]
        for r in range(world_size)
    ]
    whole = epoch_batches(single, 5)
    parts = [epoch_batches(rank, 5) for rank in ranks]
    assert all(len(p) == len(whole) for p in parts)
    for step, (images, labels) in enumerate(whole):
        assert all(len(p[step][0]) == 32 // world_size for p in parts)
        assert torch.equal(images, torch.cat([p[step][0] for p in parts]))  # augmentation included
        assert torch.equal(labels, torch.cat([p[step][1] for p in parts]))


def test_train_drops_the_partial_batch_and_visits_images_once() -> None:
    config = small_synthetic(augment=False)
    train, _, _ = loaders(config, global_batch=64)
    batches = epoch_batches(train, 0)
    assert len(train) == len(batches) == 3  # 200 // 64
    assert all(len(images) == 64 for images, _ in batches)
    splits = data.synthetic_splits(config)
    index_of = {bytes(image.numpy()): i for i, image in enumerate(splits.train_images)}
    seen = [
        index_of[bytes(image.numpy())]
        for images, _ in batches
        for image in to_uint8(images, config)
    ]
    assert len(set(seen)) == 192
    labels = torch.cat([labels for _, labels in batches])
    assert torch.equal(labels, splits.train_labels[seen])


def test_eval_keeps_every_test_image_in_the_fixed_evaluation_order() -> None:
    config = small_synthetic()
    splits = data.synthetic_splits(config)
    _, test, info = loaders(config, eval_batch=30)
    batches = list(test)
    assert info.num_test == 70 and len(test) == 3
    assert [len(labels) for _, labels in batches] == [30, 30, 10]
    order = data.eval_order(70)
    assert sorted(order.tolist()) == list(range(70)) and not torch.equal(order, torch.arange(70))
    assert torch.equal(torch.cat([to_uint8(x, config) for x, _ in batches]), splits.test_images[order])
    assert torch.equal(torch.cat([y for _, y in batches]), splits.test_labels[order])
    # the same order for every run seed and every epoch
    _, other_seed, _ = loaders(config, eval_batch=30, seed=7)
    other_seed.set_epoch(3)
    assert torch.equal(torch.cat([y for _, y in other_seed]), splits.test_labels[order])


@pytest.mark.parametrize("preset", ["cifar", "imagenet"])
def test_batch_statistics_chunks_of_a_class_sorted_test_set_mix_classes(tmp_path: Path, preset: str) -> None:
    # An image folder lists its test images class by class. Evaluated in that order, every
    # chunk of `batch` consecutive images (what train_mode_test_error and bn_eval=batch
    # normalize over) held one class, and BN's "train-mode" error measured single-class
    # batches: 85% at batch 32 on CIFAR-10 while the model scored 38%.
    root = tmp_path / "sorted"
    for name in ("a", "b", "c", "d"):
        for split in ("train", "test"):
            (root / split / name).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(pattern(i)).save(root / split / name / f"{i:02d}.png")
    config = folder_config(root, num_classes=4, preset=preset, image_size=16)
    _, test, _ = loaders(config, global_batch=8, eval_batch=32)
    labels = torch.cat([y for _, y in test])
    assert torch.equal(torch.bincount(labels), torch.full((4,), 8))  # every image, once
    chunks = labels.view(-1, 8)  # chunks of a batch of 8
    assert all(len(set(chunk.tolist())) > 1 for chunk in chunks)


def test_eval_shards_cover_the_test_set_without_overlap() -> None:
    config = small_synthetic()
    splits = data.synthetic_splits(config)
    shards = [
        loaders(config, global_batch=30, eval_batch=8, rank=r, world_size=3)[1] for r in range(3)
    ]
    labels = [torch.cat([y for _, y in shard]) for shard in shards]
    assert [len(y) for y in labels] == [23, 23, 24]
    assert sum(len(shard) for shard in shards) == 3 + 3 + 3
    order = data.eval_order(70)
    assert torch.equal(torch.cat(labels), splits.test_labels[order])
    images = torch.cat([to_uint8(x, config) for shard in shards for x, _ in shard])
    assert torch.equal(images, splits.test_images[order])


# ----------------------------------------------------------------------------- augmentation


def reference_crop_and_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """The per-image loop that the vectorized augmentation must equal."""
    h, w = images.shape[-2:]
    out = []
    for image, (top, left), flip in zip(images, offsets.tolist(), flips.tolist(), strict=True):
        crop = F.pad(image, (padding,) * 4)[:, top : top + h, left : left + w]
        out.append(torch.flip(crop, dims=[-1]) if flip else crop)
    return torch.stack(out)


def test_crop_and_flip_equals_the_per_image_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=generator)
    offsets = torch.randint(0, 9, (64, 2), generator=generator)
    flips = torch.rand(64, generator=generator) < 0.5
    result = data.crop_and_flip(images, offsets, flips, 4)
    assert torch.equal(result, reference_crop_and_flip(images, offsets, flips, 4))
    centred = torch.full((64, 2), 4)
    assert torch.equal(
        data.crop_and_flip(images, centred, flips, 4)[flips], torch.flip(images[flips], dims=[-1])
    )
    assert torch.equal(data.crop_and_flip(images, centred, ~flips, 4)[flips], images[flips])


def test_training_batches_are_flipped_crops_of_padded_images() -> None:
    config = small_synthetic()
    splits = data.synthetic_splits(config)
    train, _, _ = loaders(config, global_batch=64)
    plan = train.epoch_plan(2)
    images = torch.cat([to_uint8(x, config) for x, _ in epoch_batches(train, 2)])
    order = plan.order[:192]
    expected = reference_crop_and_flip(
        splits.train_images[order], plan.offsets[:192], plan.flips[:192], 4
    )
    assert torch.equal(images, expected)
    changed = (images != splits.train_images[order]).flatten(1).any(dim=1)
    assert changed.float().mean() > 0.9  # offset (4, 4) without a flip is the only identity
    assert 0.3 < plan.flips.float().mean() < 0.7
    assert set(plan.offsets.flatten().tolist()) == set(range(9))


def test_augment_false_yields_the_stored_images() -> None:
    config = small_synthetic(augment=False)
    train, _, _ = loaders(config)
    images, _ = epoch_batches(train, 0)[0]
    order = train.epoch_plan(0).order[:32]
    assert torch.equal(to_uint8(images, config), data.synthetic_splits(config).train_images[order])


# ----------------------------------------------------------------------------- image folders


def pattern(seed: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """A random (H, W, 3) uint8 image, distinct for each seed."""
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """root/{train,test}/{cat,dog,frog}/NN.png: 4 train and 2 test images per class (lossless PNG,
    pixel content = pattern(seed)); dog's last training image is a 40x48 JPEG."""
    root = tmp_path / "pets"
    seed = 0
    for split, count in (("train", 4), ("test", 2)):
        for name in ("cat", "dog", "frog"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(pattern(seed)).save(root / split / name / f"{i:02d}.png")
                seed += 1
    (root / "train/dog/03.png").unlink()
    Image.fromarray(pattern(99, (40, 48))).save(root / "train/dog/03.jpg", quality=95)
    (root / "train/cat/notes.txt").write_text("not an image, ignored")
    return root


def folder_config(root: Path, **overrides: Any) -> dict[str, Any]:
    options = {"root": str(root), "cache_dir": str(root.parent / "cache"), "num_classes": 3}
    return dataset_config("imagefolder", **{**options, **overrides})


def test_image_folder_classes_labels_and_pixels(folder: Path) -> None:
    config = folder_config(folder, augment=False)
    train, test, info = loaders(config, global_batch=6, eval_batch=4)
    assert info.classes == ("cat", "dog", "frog")
    assert (info.num_train, info.num_test, info.skipped_files) == (12, 6, 0)
    test_images = torch.cat([to_uint8(x, config) for x, _ in test])
    test_labels = torch.cat([y for _, y in test])
    # the folder lists test images class by class; they are evaluated in the fixed shuffled order
    order = data.eval_order(6)
    assert test_labels.tolist() == torch.tensor([0, 0, 1, 1, 2, 2])[order].tolist()
    first = 12 + int(order[0])  # test/cat/00 is pattern(12), then cat/01, dog/00, ...
    assert torch.equal(test_images[0], torch.from_numpy(pattern(first)).permute(2, 0, 1))
    batch, _ = epoch_batches(train, 0)[0]
    assert batch.shape == (6, 3, 32, 32)


def test_class_list_selects_and_orders_classes(folder: Path, tmp_path: Path) -> None:
    class_list = tmp_path / "classes.txt"
    class_list.write_text("frog\ncat\n")
    config = folder_config(folder, class_list=str(class_list), num_classes=2)
    _, test, info = loaders(config, global_batch=4)
    assert info.classes == ("frog", "cat") and info.num_train == 8
    labels = torch.cat([y for _, y in test]).tolist()
    images = torch.cat([to_uint8(x, config) for x, _ in test])
    order = data.eval_order(4)
    assert labels == torch.tensor([0, 0, 1, 1])[order].tolist()
    # label 0 is frog (test/frog/00, 01: patterns 16, 17), label 1 cat (test/cat/00, 01: 12, 13)
    first = (16, 17, 12, 13)[int(order[0])]
    assert torch.equal(images[0], torch.from_numpy(pattern(first)).permute(2, 0, 1))


def test_class_list_names_missing_classes_and_folder(folder: Path, tmp_path: Path) -> None:
    class_list = tmp_path / "classes.txt"
    class_list.write_text("cat\nzebra\nyak\n")
    with pytest.raises(DatasetError, match=r"zebra, yak") as error:
        loaders(folder_config(folder, class_list=str(class_list)))
    assert str(folder / "train") in str(error.value)


def test_num_classes_must_match_the_folder(folder: Path) -> None:
    with pytest.raises(
        DatasetError, match=r"num_classes=10 but the imagefolder data has 3 classes"
    ):
        loaders(folder_config(folder, num_classes=10), global_batch=4)


def test_max_per_class_takes_the_first_files_by_name(folder: Path) -> None:
    config = folder_config(folder, max_per_class=2, max_test_per_class=1, augment=False)
    train, _, info = loaders(config, global_batch=6)
    assert (info.num_train, info.num_test) == (6, 3)
    batch, labels = epoch_batches(train, 0)[0]
    order = train.epoch_plan(0).order
    first_two = [0, 1, 4, 5, 8, 9]  # pattern seeds of train/{cat,dog,frog}/0{0,1}.png
    expected = torch.stack(
        [torch.from_numpy(pattern(first_two[i])).permute(2, 0, 1) for i in order]
    )
    assert torch.equal(to_uint8(batch, config), expected)
    assert labels.tolist() == [i // 2 for i in order.tolist()]


def test_decoded_folder_is_cached_and_reused(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = folder_config(folder)
    _, test, _ = loaders(config, global_batch=4)
    cache_files = list((folder.parent / "cache").glob("*.pt"))
    assert len(cache_files) == 1

    def no_decoding(path: Path, image_size: int) -> np.ndarray:
        raise AssertionError(f"decoded {path} although it is cached")

    monkeypatch.setattr(data.sources, "_load_rgb_image", no_decoding)
    _, cached_test, info = loaders(config, global_batch=4)
    assert_same_batches(test, cached_test)
    assert info.classes == ("cat", "dog", "frog")
    with pytest.raises(AssertionError, match="although it is cached"):
        loaders(
            folder_config(folder, max_per_class=3), global_batch=4
        )  # another slice: another cache file


def test_corrupt_image_is_named_or_skipped_and_counted(folder: Path) -> None:
    bad = folder / "train/frog/02.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DatasetError, match=re.escape(str(bad))):
        loaders(folder_config(folder), global_batch=4)
    train, _, info = loaders(folder_config(folder, skip_corrupt=True), global_batch=11)
    assert (info.num_train, info.skipped_files) == (11, 1)
    assert len(epoch_batches(train, 0)) == 1


def test_replaced_corrupt_image_is_decoded_again(folder: Path) -> None:
    # The decoded cache is keyed by what the files are, not only their names: a corrupt image
    # skipped once and then replaced by a good one must be decoded, not skipped from the cache.
    bad = folder / "train/frog/02.png"
    good = bad.read_bytes()
    bad.write_bytes(b"this is not a png")
    config = folder_config(folder, skip_corrupt=True)
    assert loaders(config, global_batch=4)[2].skipped_files == 1
    bad.write_bytes(good)
    info = loaders(config, global_batch=4)[2]
    assert (info.num_train, info.skipped_files) == (12, 0)


def test_skipped_truncated_jpeg_is_named_in_the_warning(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    jpeg = folder / "train/dog/03.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:400])  # a header and part of the scan: PIL says "truncated"
    with caplog.at_level(logging.WARNING, logger="normbench.data"):
        info = loaders(folder_config(folder, skip_corrupt=True), global_batch=4)[2]
    assert info.skipped_files == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(jpeg) in warnings[0] and "truncated" in warnings[0]


def test_root_that_is_a_file_is_called_a_file(tmp_path: Path) -> None:
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    archive.write_bytes(b"not a folder")
    with pytest.raises(DatasetError, match="is a file, not a folder") as error:
        loaders(folder_config(archive))
    assert "does not exist" not in str(error.value) and str(archive) in str(error.value)


def test_missing_root_or_train_folder_says_how_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"normbench prepare-data ARCHIVE --dest") as error:
        loaders(folder_config(tmp_path / "absent"))
    assert str(tmp_path / "absent") in str(error.value)
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no train/ folder"):
        loaders(folder_config(tmp_path / "empty"))


def test_test_dir_auto_refuses_to_guess(folder: Path) -> None:
    (folder / "test").rename(folder / "val")
    assert loaders(folder_config(folder), global_batch=4)[2].num_test == 6  # val/ alone is found
    (folder / "test").mkdir()
    with pytest.raises(DatasetError, match="both val/ and test/"):
        loaders(folder_config(folder), global_batch=4)
    assert loaders(folder_config(folder, test_dir="val"), global_batch=4)[2].num_test == 6


def imagenet_config(folder: Path, **overrides: Any) -> dict[str, Any]:
    return folder_config(folder, preset="imagenet", image_size=24, **overrides)


def test_imagenet_preset_shapes_and_determinism(folder: Path) -> None:
    config = imagenet_config(folder)
    train, test, info = loaders(config, global_batch=4, eval_batch=4)
    assert (info.num_train, info.num_test, len(train), len(test)) == (12, 6, 3, 2)
    batches = epoch_batches(train, 1)
    images, labels = batches[0]
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert_same_batches(batches, epoch_batches(train, 1))
    assert not torch.equal(images, epoch_batches(train, 2)[0][0])
    test_batches = list(test)
    assert [x.shape for x, _ in test_batches] == [(4, 3, 24, 24), (2, 3, 24, 24)]
    assert torch.cat([y for _, y in test_batches]).tolist() == torch.tensor(
        [0, 0, 1, 1, 2, 2])[data.eval_order(6)].tolist()


def test_imagenet_augmentation_depends_on_seed_epoch_and_image(folder: Path) -> None:
    files, labels = data.list_image_files(folder / "train", ["cat", "dog"], None)
    dataset = data.ImageFileDataset(files, labels, image_size=24, train_augment=True, seed=0)
    image, label = dataset[(7, 1)]
    assert image.shape == (3, 24, 24) and image.dtype == torch.uint8 and label == 1
    assert torch.equal(image, dataset[(7, 1)][0])
    assert not torch.equal(image, dataset[(7, 2)][0])
    other_seed = data.ImageFileDataset(files, labels, image_size=24, train_augment=True, seed=1)
    assert not torch.equal(image, other_seed[(7, 1)][0])


def test_imagenet_preset_is_identical_across_ranks_and_workers(folder: Path) -> None:
    config = imagenet_config(folder)
    whole = epoch_batches(loaders(config, global_batch=4)[0], 0)
    with_workers = epoch_batches(loaders(config, global_batch=4, num_workers=2)[0], 0)
    assert_same_batches(whole, with_workers)
    halves = [
        epoch_batches(loaders(config, global_batch=4, rank=r, world_size=2)[0], 0) for r in range(2)
    ]
    for step, (images, labels) in enumerate(whole):
        assert torch.equal(images, torch.cat([halves[0][step][0], halves[1][step][0]]))
        assert torch.equal(labels, torch.cat([halves[0][step][1], halves[1][step][1]]))


def test_imagenet_preset_corrupt_image(folder: Path) -> None:
    bad = folder / "test/dog/01.png"
    bad.write_bytes(b"garbage")
    _, test, _ = loaders(imagenet_config(folder), global_batch=4)
    with pytest.raises(DatasetError, match=re.escape(str(bad))):
        list(test)
    _, test, info = loaders(imagenet_config(folder, skip_corrupt=True), global_batch=4)
    assert (info.num_test, info.skipped_files) == (5, 1)
    assert sum(len(y) for _, y in test) == 5


# ----------------------------------------------------------------------------- JPEGs on the GPU


def smooth_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth random colour image (JPEG-friendly: decoders and resamplers differ little)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.BILINEAR)


@pytest.fixture
def jpeg_folder(tmp_path: Path) -> Path:
    """root/{train,test}/{cat,dog}/NN.jpg of assorted sizes, one of them greyscale."""
    root = tmp_path / "jpegs"
    seed = 0
    for split, count in (("train", 4), ("test", 2)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                size = (40 + 4 * (seed % 3), 36 + 6 * (seed % 4))
                smooth_image(seed, size).save(root / split / name / f"{i:02d}.jpg", quality=95)
                seed += 1
    smooth_image(99, (44, 40)).convert("L").save(root / "train/dog/03.jpg", quality=95)
    return root


def jpeg_config(root: Path, **overrides: Any) -> dict[str, Any]:
    options = {"preset": "imagenet", "image_size": 24, "num_classes": 2}
    return folder_config(root, **{**options, **overrides})


def device_loaders(root: Path, device: torch.device) -> tuple[Any, Any]:
    """The GPU path's loaders, on `device` (the CPU runs the same code, for the tests)."""
    config = jpeg_config(root)
    options = data.LoaderOptions(global_batch=4, eval_batch=3, seed=1, device=device, rank=0,
                                 world_size=1, num_workers=0)
    layout = data.image_folder_layout(config)
    train = data.list_image_files(layout.train_dir, layout.classes, None)
    test = data.list_image_files(layout.test_dir, layout.classes, None)
    return data.device_jpeg_loaders(*train, *test, image_size=24, augment=True,
                                    mean=config["mean"], std=config["std"], options=options)


def assert_close_to_the_cpu_path(root: Path, train: Any, test: Any) -> None:
    """Same images, crops, flips and labels as the PIL path; pixels within decoder rounding."""
    cpu_train, cpu_test, _ = loaders(jpeg_config(root), global_batch=4, eval_batch=3)
    config = jpeg_config(root)
    for epoch in (0, 1):
        pairs = list(zip(epoch_batches(cpu_train, epoch), epoch_batches(train, epoch), strict=True))
        for (cpu_images, cpu_labels), (images, labels) in pairs:
            assert torch.equal(labels.cpu(), cpu_labels)
            difference = (to_uint8(images.cpu(), config).float()
                          - to_uint8(cpu_images, config).float()).abs()
            assert difference.mean() < 2.0, difference.mean()  # levels of 255
    for (cpu_images, cpu_labels), (images, labels) in zip(cpu_test, test, strict=True):
        assert torch.equal(labels.cpu(), cpu_labels) and images.shape == cpu_images.shape
        difference = (to_uint8(images.cpu(), config).float()
                      - to_uint8(cpu_images, config).float()).abs()
        assert difference.mean() < 2.0, difference.mean()


def test_device_jpeg_loader_matches_the_pil_path(jpeg_folder: Path) -> None:
    train, test = device_loaders(jpeg_folder, CPU)
    assert_close_to_the_cpu_path(jpeg_folder, train, test)


def test_device_jpeg_loader_names_a_bad_file_and_decodes_a_png_named_jpeg(
    jpeg_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    png = jpeg_folder / "test/cat/01.jpg"
    smooth_image(7, (30, 30)).save(png, format="PNG")
    with caplog.at_level(logging.WARNING, logger="normbench.data"):
        _, test = device_loaders(jpeg_folder, CPU)
        assert sum(len(labels) for _, labels in test) == 4
    assert any(str(png) in r.getMessage() for r in caplog.records)
    bad = jpeg_folder / "test/dog/00.jpg"
    bad.write_bytes(b"garbage")
    _, test = device_loaders(jpeg_folder, CPU)
    with pytest.raises(DatasetError, match=re.escape(str(bad))):
        list(test)


def test_cpu_runs_and_non_jpeg_folders_keep_the_pil_path(jpeg_folder: Path, folder: Path) -> None:
    assert isinstance(loaders(jpeg_config(jpeg_folder), global_batch=4)[0], data.FolderLoader)
    assert not data.gpu_jpeg.all_jpeg(data.list_image_files(folder / "train", ["cat"], None)[0])


@pytest.mark.cuda
def test_cuda_run_decodes_jpegs_on_the_gpu_in_batches(jpeg_folder: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cuda = torch.device("cuda")
    train, test, _ = loaders(jpeg_config(jpeg_folder), global_batch=4, eval_batch=3, device=cuda)
    assert isinstance(train, data.DeviceJpegLoader) and isinstance(test, data.DeviceJpegLoader)
    images, labels = epoch_batches(train, 0)[0]
    assert images.device.type == "cuda" and labels.device.type == "cuda"
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32
    assert_close_to_the_cpu_path(jpeg_folder, train, test)


# ----------------------------------------------------------------------------- DataLoader workers


@pytest.mark.parametrize(
    "cpus,environ,expected",
    [
        (16, {}, 15),  # one process: every CPU but the main process's
        (16, {"LOCAL_WORLD_SIZE": "4"}, 3),  # torchrun: 4 processes share the 16 CPUs
        (64, {"SLURM_CPUS_PER_TASK": "6"}, 5),  # a SLURM task's own CPUs, not the node's
        (64, {"SLURM_CPUS_PER_TASK": "16", "LOCAL_WORLD_SIZE": "8"}, 1),  # torchrun in a task
        (1, {}, 0),
        (4, {"LOCAL_WORLD_SIZE": "8"}, 0),  # never below 0
    ],
)
def test_auto_num_workers_follows_the_cpus_of_this_process(
    monkeypatch: pytest.MonkeyPatch, cpus: int, environ: dict[str, str], expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert data.auto_num_workers(environ) == expected
    assert data.resolve_num_workers("auto", environ) == expected
    assert data.resolve_num_workers(3, environ) == 3


@pytest.mark.parametrize("value", ["many", -1, 2.5, True])
def test_bad_num_workers_names_the_key_and_the_choices(value: Any) -> None:
    with pytest.raises(DatasetError, match=r"num_workers=.*auto.*integer >= 0"):
        data.resolve_num_workers(value)


def test_num_workers_defaults_to_auto_and_the_summary_records_the_number_used(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from normbench.train import Trainer

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(3)), raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    run = ["model=resnet8", "batch=2", "workers=2", "wandb.mode=disabled", "progress=false",
           "device=cpu", "dataset=imagefolder", f"dataset.root={folder}", "dataset.num_classes=3"]
    files = compose_config(run + ["dataset.preset=imagenet", "dataset.image_size=32"])
    assert files["num_workers"] == "auto"
    assert Trainer(files, folder=None).summary("failed")["num_workers"] == 2
    cached = compose_config(run + [f"dataset.cache_dir={folder.parent / 'cache'}"])
    assert Trainer(cached, folder=None).summary("failed")["num_workers"] == 0  # on the device


def test_random_resized_crop_box_stays_inside_the_image() -> None:
    generator = torch.Generator().manual_seed(0)
    for width, height in [(40, 48), (300, 20), (7, 7)]:
        for _ in range(50):
            top, left, h, w = data.random_resized_crop_box(width, height, generator)
            assert 0 <= top and top + h <= height and h > 0
            assert 0 <= left and left + w <= width and w > 0


# ----------------------------------------------------------------------------- archives and CIFAR


def add_file(tar: tarfile.TarFile, name: str, content: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(content)
    tar.addfile(member, io.BytesIO(content))


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pattern(seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_extract_image_folder_slices_and_finds_the_top_folder(tmp_path: Path) -> None:
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in (3, 1, 2, 0):  # archive order is not name order
            add_file(tar, f"pets/train/cat/{i}.png", png_bytes(i))
            add_file(tar, f"pets/train/dog/{i}.png", png_bytes(10 + i))
            add_file(tar, f"pets/val/cat/{i}.png", png_bytes(20 + i))
            add_file(tar, f"pets/val/dog/{i}.png", png_bytes(30 + i))
        add_file(tar, "pets/README.txt", b"not extracted")
    root = data.extract_image_folder(
        archive, tmp_path / "out", max_per_class=2, max_test_per_class=1
    )
    assert root == tmp_path / "out" / "pets"
    assert sorted(p.name for p in (root / "train/cat").iterdir()) == ["0.png", "1.png"]
    assert sorted(p.name for p in (root / "val/dog").iterdir()) == ["0.png"]
    assert not (root / "README.txt").exists()
    config = folder_config(root, num_classes=2)
    assert loaders(config, global_batch=4)[2].num_test == 2
    with pytest.raises(DatasetError, match="not empty"):
        data.extract_image_folder(archive, tmp_path / "out")


def test_prepare_data_script_unpacks_a_slice(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    archive = tmp_path / "pets.tar"
    with tarfile.open(archive, "w") as tar:
        for i in range(3):
            add_file(tar, f"train/cat/{i}.png", png_bytes(i))
            add_file(tar, f"test/cat/{i}.png", png_bytes(10 + i))
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "scripts/prepare_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    dest = tmp_path / "pets"
    assert script.main([str(archive), "--dest", str(dest), "--max-per-class", "2"]) == 0
    assert len(list((dest / "train/cat").iterdir())) == 2
    assert len(list((dest / "test/cat").iterdir())) == 3
    assert f"the image folder is {dest}" in capsys.readouterr().out
    assert script.main([str(archive), "--dest", str(dest)]) == 0  # already there: nothing to do
    assert "nothing to do" in capsys.readouterr().out


def test_prepare_data_defaults_put_the_shared_archive_where_imagefolder_reads(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # `make cifar10` runs `normbench prepare-data` with no arguments: the archive beside the
    # checkout, unpacked into dataset.root of conf/dataset/imagefolder.yaml
    from normbench.commands import prepare_data

    assert prepare_data.default_archive() == REPO.parent / "shared/data/cifar10-jpeg.tar.gz"
    root = prepare_data.default_image_folder_root()
    assert root.name == "cifar10-jpeg" and "~" not in str(root)
    assert prepare_data.default_dest(Path("anywhere/cifar10-jpeg.tar.gz")) == root
    assert prepare_data.default_dest(Path("pets.tgz")) == root.parent / "pets"
    for name in ("x.tar.gz", "x.tgz", "x.tar.bz2", "x.tar.xz", "x.tar"):
        assert prepare_data.archive_stem(Path(name)) == "x"
    # an archive that is not one: one line, exit 1, nothing unpacked
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"not a tar archive")
    assert prepare_data.main([str(bad), "--dest", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err
    assert not (tmp_path / "out" / "train").exists()


@pytest.mark.skipif(
    not CIFAR_JPEG.is_file(), reason=f"shared CIFAR-10 JPEG archive not found at {CIFAR_JPEG}"
)
def test_real_cifar10_jpeg_archive(tmp_path: Path) -> None:
    root = data.extract_image_folder(
        CIFAR_JPEG, tmp_path / "cifar", max_per_class=20, max_test_per_class=10
    )
    assert root == tmp_path / "cifar"
    config = dataset_config("imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"))
    train, test, info = loaders(config, global_batch=50, eval_batch=64)
    assert info.classes == CIFAR10_CLASSES
    assert (info.num_train, info.num_test, info.image_size) == (200, 100, 32)
    images, labels = epoch_batches(train, 0)[0]
    assert images.shape == (50, 3, 32, 32) and labels.max() < 10
    test_labels = torch.cat([y for _, y in test])
    assert torch.equal(torch.bincount(test_labels), torch.full((10,), 10))
    x = torch.cat([x for x, _ in test])
    assert abs(x.mean().item()) < 0.5 and 0.5 < x.std().item() < 1.5  # CIFAR mean/std fit


def write_torchvision_cifar10(root: Path, per_batch: int, test_size: int) -> np.ndarray:
    """CIFAR-10 in torchvision's python format (data_batch_1..5, test_batch, batches.meta: rows
    of 3,072 bytes, channel-major), random pixels; returns the test images as (N, 3, 32, 32)."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        count = test_size if name == "test_batch" else per_batch
        pixels = rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8)
        entry = {"data": pixels, "labels": [int(i % 10) for i in range(count)]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CIFAR10_CLASSES)}))
    return pixels.reshape(-1, 3, 32, 32)


def test_torchvision_cifar10_files_become_the_tensors_the_loaders_serve(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # dataset=cifar10 reads torchvision's files (HWC after torchvision) into CHW uint8 tensors;
    # the files written here are not the real ones, so torchvision's checksums are waived
    import torchvision.datasets.cifar

    test_images = write_torchvision_cifar10(tmp_path / "cifar", per_batch=8, test_size=30)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    config = dataset_config("cifar10", root=str(tmp_path / "cifar"), download=False)
    train, test, info = loaders(config, global_batch=8, eval_batch=30)
    assert (info.num_train, info.num_test, info.num_classes) == (40, 30, 10)
    assert info.classes == CIFAR10_CLASSES
    (images, labels), = list(test)
    order = data.batches.eval_order(30)  # the test set's fixed evaluation order
    assert labels.tolist() == [int(i) % 10 for i in order]
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    pixels = torch.from_numpy(test_images).float()[order] / 255
    torch.testing.assert_close(images, (pixels - mean) / std)


def test_a_failed_cifar10_download_says_what_to_do(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import torchvision.datasets

    def offline(self):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    root = tmp_path / "no-cifar"
    with pytest.raises(DatasetError, match="and the download failed") as error:
        loaders(dataset_config("cifar10", root=str(root), download=True))
    message = str(error.value)
    assert "no network" in message and str(root) in message and "prepare-data" in message


def test_cifar10_without_files_names_the_path(tmp_path: Path) -> None:
    root = tmp_path / "no-cifar"
    with pytest.raises(DatasetError, match="cifar-10-batches-py") as error:
        loaders(dataset_config("cifar10", root=str(root), download=False))
    message = str(error.value)
    assert str(root) in message and "https://" in message and "imagefolder" in message


def test_real_cifar10_jpegs_decode_alike_on_both_paths(shared_cifar: Path, tmp_path: Path) -> None:
    # The batched decode_jpeg path (here on the CPU; on CUDA in a GPU run) against PIL on real
    # JPEGs, with the imagenet preset's transforms at 32 pixels.
    root = data.extract_image_folder(shared_cifar, tmp_path / "cifar", max_per_class=4,
                                     max_test_per_class=2)
    config = jpeg_config(root, image_size=32, num_classes=10)
    options = data.LoaderOptions(global_batch=8, eval_batch=7, seed=3, device=CPU, rank=0,
                                 world_size=1, num_workers=0)
    layout = data.image_folder_layout(config)
    train, test = data.device_jpeg_loaders(
        *data.list_image_files(layout.train_dir, layout.classes, None),
        *data.list_image_files(layout.test_dir, layout.classes, None),
        image_size=32, augment=True, mean=config["mean"], std=config["std"], options=options)
    cpu_train, cpu_test, _ = loaders(config, global_batch=8, eval_batch=7, seed=3)
    for (a, labels_a), (b, labels_b) in zip(epoch_batches(cpu_train, 2), epoch_batches(train, 2),
                                            strict=True):
        assert torch.equal(labels_a, labels_b)
        assert (to_uint8(a, config).float() - to_uint8(b, config).float()).abs().mean() < 2.0
    for (a, labels_a), (b, labels_b) in zip(cpu_test, test, strict=True):
        assert torch.equal(labels_a, labels_b)
        assert torch.equal(to_uint8(a, config), to_uint8(b, config))  # 32x32: no resize at all


def test_data_package_imports_go_one_way() -> None:
    # Each module imports only modules below it in this order (normbench/data/__init__.py).
    import ast

    order = ["__init__", "gpu_jpeg", "batches", "sources", "archives", "presets", "workers",
             "base"]
    package = REPO / "normbench" / "data"
    assert sorted(p.stem for p in package.glob("*.py")) == sorted(order)
    for module in order:
        tree = ast.parse((package / f"{module}.py").read_text())
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.level == 1}
        below = set(order[order.index(module) + 1:])
        assert imported <= below, (module, imported - below)
