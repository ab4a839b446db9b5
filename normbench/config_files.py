"""Where normbench's YAML files are: ``conf/`` (the Hydra config groups) and ``experiments/``
(the named sweeps), at the top of a checkout or inside an installed package.

Git holds one copy of each file, at the top of the checkout, where users read and edit them.
pyproject.toml ships them in the wheel as ``normbench/conf`` and ``normbench/experiments``. A
checkout, installed editable or not installed at all, reads the checkout's own folders, so what
a user edits there is what runs. No Hydra here: the library reads its shipped defaults too (e.g.
scripts/prepare_data.py reads dataset.root of conf/dataset/imagefolder.yaml).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# The checkout this package lies in, if it lies in one (its parent folder holds pyproject.toml):
# in an installed wheel the parent is site-packages.
CHECKOUT_DIR = PACKAGE_DIR.parent
SHIPPED_FOLDERS = ("conf", "experiments")


def shipped_dir(name: str) -> Path:
    """The folder ``conf`` or ``experiments``: the installed package's copy (only a wheel has
    one), else the checkout's. Fails, naming both places, when neither exists."""
    if name not in SHIPPED_FOLDERS:
        raise ValueError(f"shipped folder {name!r}: expected one of {', '.join(SHIPPED_FOLDERS)}")
    installed = PACKAGE_DIR / name
    checkout = CHECKOUT_DIR / name
    for folder in (installed, checkout):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"normbench's {name}/ folder is missing: neither {installed} (an installed package) nor "
        f"{checkout} (a checkout) exists; reinstall normbench (`pip install .` in a checkout)")


def config_dir() -> Path:
    """The Hydra config folder (config.yaml and the groups norm/, model/, dataset/, ...)."""
    return shipped_dir("conf")


def experiments_dir() -> Path:
    """The named sweeps: experiments/NAME.yaml is the option NAME of the group `experiment`."""
    return shipped_dir("experiments")


def checkout_dir() -> Path | None:
    """The checkout normbench runs from, or None for an installed package: tools that are not
    shipped (the benchmark) and paths beside the checkout (../shared/data) need one."""
    return CHECKOUT_DIR if (CHECKOUT_DIR / "pyproject.toml").is_file() else None
