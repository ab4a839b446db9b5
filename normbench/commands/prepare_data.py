"""Unpack an image-folder archive (e.g. ../shared/data/cifar10-jpeg.tar.gz) for dataset=imagefolder.

    normbench prepare-data                                  # the shared CIFAR-10 JPEGs (a checkout)
    normbench prepare-data ARCHIVE --dest DIR --max-per-class 500 --max-test-per-class 100

The archive holds train/CLASS/IMAGE and val/ or test/ alike (under any top-level folder). The
default destination is the folder conf/dataset/imagefolder.yaml reads by default
($NORMBENCH_DATA/cifar10-jpeg, else ~/.cache/normbench/data/cifar10-jpeg); other archives go
next to it, named after the archive.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from normbench.config_files import checkout_dir, config_dir
from normbench.data import DatasetError, extract_image_folder

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")


def default_archive() -> Path | None:
    """The project's shared CIFAR-10 JPEGs beside a checkout; None for an installed package."""
    checkout = checkout_dir()
    return None if checkout is None else checkout.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def default_image_folder_root() -> Path:
    """dataset.root of conf/dataset/imagefolder.yaml, resolved: the default lives in one place."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(config_dir() / "dataset" / "imagefolder.yaml")
    return Path(os.path.expanduser(str(config.root)))


def archive_stem(archive: Path) -> str:
    """cifar10-jpeg.tar.gz -> cifar10-jpeg."""
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return archive.stem


def default_dest(archive: Path) -> Path:
    root = default_image_folder_root()
    return root.parent / archive_stem(archive)


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    default = default_archive()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Unpack an image-folder tar archive (train/ and val/ or test/, one folder per "
        "class) into a cache folder for dataset=imagefolder.",
    )
    parser.add_argument(
        "archive",
        nargs="?" if default is not None else None,
        type=Path,
        default=default,
        help="tar, tar.gz, tar.bz2 or tar.xz archive"
        + (f" (default: {default})" if default is not None else ""),
    )
    parser.add_argument(
        "--dest",
        type=Path,
        default=None,
        help="folder to unpack into (default: named after the archive, next to dataset.root of "
        "conf/dataset/imagefolder.yaml; for cifar10-jpeg.tar.gz that root itself)",
    )
    parser.add_argument(
        "--max-per-class",
        type=int,
        default=None,
        metavar="K",
        help="unpack only the first K training images of each class (sorted by name)",
    )
    parser.add_argument(
        "--max-test-per-class",
        type=int,
        default=None,
        metavar="K",
        help="unpack only the first K test (or val) images of each class (sorted by name)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    dest = (args.dest or default_dest(args.archive)).expanduser()
    if (dest / "train").is_dir():
        print(f"{dest} already holds train/; nothing to do (delete it to unpack again)")
        return 0
    print(f"unpacking {args.archive} into {dest}")
    try:
        root = extract_image_folder(
            args.archive,
            dest,
            max_per_class=args.max_per_class,
            max_test_per_class=args.max_test_per_class,
        )
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"done: the image folder is {root}")
    if root != default_image_folder_root():
        print(f"use it with: dataset=imagefolder dataset.root={root}")
    return 0
