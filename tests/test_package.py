"""The installable `normbench` command: the wheel built from this checkout, installed into a fresh
virtual environment, trains from any folder with the configs it ships; and the command's parts
from a checkout (subcommands, --config-dir, the sweep's recorded command)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, compose_config

from normbench import cli
from normbench.config import run_name
from normbench.hydra_main import typed_command

# What the wheel is built from: pyproject.toml's packages and package-dir (conf/, experiments/).
SOURCES = ("pyproject.toml", "README.md", "normbench", "conf", "experiments")
TINY_SWEEP = ["-m", "experiment=demo", "norm=bn", "batch=8", "epochs=1", "dataset.train_size=64",
              "dataset.test_size=32", "wandb.mode=disabled"]


def run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    # Without PYTHONPATH, which may point at this checkout: the installed package must be found.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result


def build_wheel(out: Path) -> Path:
    """The wheel of this checkout, built offline from a copy of its sources (a build in place
    could pick up stale files from an earlier build/ folder)."""
    source = out / "source"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", str(out / "dist"), str(source)], cwd=out)
    (wheel,) = (out / "dist").glob("normbench-*.whl")
    return wheel


def fresh_venv_with(wheel: Path, venv: Path) -> Path:
    """A new virtual environment holding only the wheel; torch, Hydra and the other dependencies
    come from this interpreter's site-packages through a .pth file (offline, and no second copy
    of torch), added after the install so that pip never sees (nor touches) them. Returns the
    environment's bin folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-index", str(wheel)], cwd=venv)
    venv_site = Path(run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                         cwd=venv).stdout.strip())
    # every site-packages folder this interpreter imports from (its own, and any it reaches
    # through a .pth file of its own)
    dependencies = [path for path in sys.path if Path(path).name == "site-packages"]
    (venv_site / "dependencies.pth").write_text("\n".join(dependencies) + "\n")
    return venv / "bin"


def test_wheel_gives_a_normbench_command_that_trains_from_any_folder(tmp_path):
    wheel = build_wheel(tmp_path / "build")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".yaml")}
    tracked = {f"normbench/{path.relative_to(ROOT).as_posix()}"
               for folder in ("conf", "experiments") for path in (ROOT / folder).rglob("*.yaml")}
    assert tracked - shipped == set(), "config files missing from the wheel (pyproject packages)"

    bin_dir = fresh_venv_with(wheel, tmp_path / "venv")
    work = tmp_path / "anywhere"
    work.mkdir()
    where = run([str(bin_dir / "python"), "-c", "import normbench.config_files as c, normbench; "
                 "print(normbench.__file__); print(c.config_dir()); print(c.checkout_dir())"],
                cwd=work).stdout.splitlines()
    assert all(line.startswith(str(tmp_path / "venv")) for line in where[:2]), where
    assert where[2] == "None"  # an installed package: no checkout

    result = run([str(bin_dir / "normbench"), "train", *TINY_SWEEP], cwd=work)
    # the experiment shipped in the wheel, the config the checkout composes (same folder name)
    folder = work / "runs" / "demo" / run_name(compose_config(TINY_SWEEP[1:]))
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed", (
        result.stdout + result.stderr)
    assert (folder / "run.log").is_file()
    assert (work / "runs" / "demo" / "command.txt").read_text() == (
        "normbench train " + " ".join(TINY_SWEEP) + "\n")

    help_text = run([str(bin_dir / "python"), "-m", "normbench", "--help"], cwd=work).stdout
    assert all(name in help_text for name in cli.SUBCOMMANDS)


def test_usage_lists_every_subcommand_and_an_unknown_one_is_named(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.SUBCOMMANDS)
    assert cli.main(["trian"]) == 2
    assert "unknown subcommand 'trian'; choose one of train, report" in capsys.readouterr().err
    assert cli.main([]) == 2  # no subcommand: the usage, on stderr


@pytest.mark.parametrize("name", ["report", "evaluate"])
def test_a_wrong_experiment_folder_is_one_line_not_a_traceback(name, tmp_path, capsys):
    missing, empty = tmp_path / "no_such_folder", tmp_path / "empty"
    empty.mkdir()
    assert cli.main([name, str(missing), "--out", str(tmp_path / "out.csv")]) == 2
    assert capsys.readouterr().err == f"error: experiment folder {str(missing)!r} does not exist\n"
    if name == "report":  # evaluate names a folder without checkpoints itself (exit 1)
        assert cli.main([name, str(empty), "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err.startswith(f"error: no runs in {str(empty)!r}")


@pytest.mark.parametrize("name", [n for n in cli.SUBCOMMANDS if n not in ("train", "bench")])
def test_every_argparse_subcommand_has_help_under_its_own_name(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: normbench {name} ")


def test_bench_subcommand_loads_the_checkouts_benchmark(capsys):
    # `normbench bench` loads scripts/bench.py by its path, so the script must find its own
    # package (scripts/benchkit) without scripts/ being on sys.path
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: normbench bench ")
    assert "--items" in out


def test_a_config_dir_of_ones_own_adds_experiments_and_options(tmp_path):
    mine = tmp_path / "my_conf"
    (mine / "experiment").mkdir(parents=True)
    (mine / "norm").mkdir()
    (mine / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: resnet8\n"
        "experiment_name: mine\nbatch: 4\n")
    (mine / "norm" / "gn4.yaml").write_text("name: gn\ngroups: 4\ngroup_channels: null\n"
                                            "eps: 1.0e-5\n")
    env_python = [sys.executable, "-m", "normbench", "train"]
    result = subprocess.run([*env_python, "--config-dir", str(mine), "experiment=mine", "norm=gn4",
                             "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    printed = result.stdout
    assert "experiment_name: mine" in printed and "groups: 4" in printed
    assert "name: resnet8" in printed  # the experiment's defaults list reached our model group


def test_the_experiments_are_the_experiment_group_without_a_symlink():
    assert not any(path.is_symlink() for path in (ROOT / "conf").rglob("*"))
    config = compose_config(["experiment=demo"])
    assert config["experiment_name"] == "demo" and config["model"]["name"] == "resnet8"


def test_a_sweep_records_the_command_as_typed():
    assert typed_command(["normbench train", "-m", "norm=bn,gn", "dataset.root=/my data"]) == (
        "normbench train -m norm=bn,gn 'dataset.root=/my data'")
    assert typed_command(["run.py", "-m", "experiment=demo"]) == "python run.py -m experiment=demo"
