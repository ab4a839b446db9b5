"""Unpacking an image-folder tar archive (what scripts/prepare_data.py runs)."""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from .base import IMAGE_EXTENSIONS, DatasetError

logger = logging.getLogger(__name__)


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

