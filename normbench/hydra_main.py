"""The Hydra entry point: one run, or a sweep with -m. Hydra stays here, at the edge of the library.

    normbench train norm=gn batch=2                 # one run (from a checkout: python run.py ...)
    normbench train -m norm=bn,gn batch=32,8,2      # a sweep
    normbench train -m experiment=demo              # a named sweep from experiments/

The run folder is runs/<experiment>/<norm>_b<batch>x<workers>_<placement>_s<seed>_<hash>, the hash
being of the config, so relaunching the same command finds its folders: finished runs are skipped
and interrupted ones resume from their checkpoints.

Several processes (one per GPU) train one run with DistributedDataParallel:

    torchrun --nproc_per_node=4 -m normbench train norm=gn batch=2  # 4 processes x 2 workers
    normbench train -m hydra/launcher=slurm hydra.launcher.gpus_per_node=4 norm=bn,gn  # SLURM
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.plugins.config_source import ConfigSource
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from normbench import distributed
from normbench.config_files import config_dir, experiments_dir
from normbench.config import ConfigError, check_folder_names, run_name
from normbench.data import DatasetError, register_preset_resolver
from normbench.hydra_callbacks import if_run_folder_held
from normbench.norms import NormConfigError
from normbench.records import RecordsError, Terminated
from normbench.train import run

log = logging.getLogger("normbench")


def job_config(root: DictConfig) -> dict[str, Any]:
    # the job's config without the hydra node (which holds the interpolations resolved here)
    job = OmegaConf.masked_copy(root, [k for k in root if k != "hydra"])
    return OmegaConf.to_container(job, resolve=True)


def _refuse_folder_names(job: dict[str, Any]) -> None:
    """Exit 2 with one line when a value would name a folder outside ``out_root`` (or at the
    filesystem's root): Hydra makes the folder as soon as its name is resolved, before
    normbench's own checks, so this cannot wait for them. Raising here would not do: Hydra
    would print a traceback of its own and exit 1."""
    try:
        check_folder_names(job)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def _experiment_folder_resolver(*, _root_: DictConfig) -> str:
    # hydra.sweep.dir, and hydra.run.dir's start: <out_root>/<experiment_name>
    job = job_config(_root_)
    _refuse_folder_names(job)
    return f"{job['out_root']}/{job['experiment_name']}"


def _run_name_resolver(*, _root_: DictConfig) -> str:
    # Resolved for hydra.run.dir / hydra.sweep.subdir: hash the job's config.
    job = job_config(_root_)
    _refuse_folder_names(job)
    return run_name(job)


def _first_process_only(value: Any, otherwise: Any = None) -> Any:
    # For Hydra's own output (conf/config.yaml: .hydra/, run.log, log level): `value` in the
    # first process of a multi-process launch (or the only process), `otherwise` in the others,
    # so that they leave nothing in the run folder. The rank comes from the environment: Hydra
    # resolves this before the process group exists, also inside SLURM jobs.
    return value if distributed.launch_rank() == 0 else otherwise


OmegaConf.register_new_resolver("run_name", _run_name_resolver, replace=True)
OmegaConf.register_new_resolver("experiment_folder", _experiment_folder_resolver, replace=True)
OmegaConf.register_new_resolver("first_process_only", _first_process_only, replace=True)
OmegaConf.register_new_resolver("if_run_folder_held", if_run_folder_held, replace=True)
register_preset_resolver()  # ${dataset_preset:...} in conf/dataset/imagefolder.yaml


def register_experiments(folder: Path) -> list[str]:
    """Make every folder/NAME.yaml the option NAME of the config group `experiment`, with the
    package its `# @package` header names, and return the names.

    The experiments have their own top-level folder, where users find them, not conf/experiment/;
    Hydra's search path adds whole config folders (a group is a subfolder of one), so the group
    is filled through Hydra's ConfigStore instead, which Hydra searches like a folder (and a
    folder given with --config-dir can still add experiment/NAME.yaml files of its own)."""
    store = ConfigStore.instance()
    names = []
    for path in sorted(folder.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        header = ConfigSource._get_header_dict(text)  # Hydra's own reading of `# @package`
        store.store(name=path.stem, node=OmegaConf.create(text), group="experiment",
                    package=header.get("package"), provider=str(path))
        names.append(path.stem)
    return names


register_experiments(experiments_dir())


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config `normbench train OVERRIDES` runs, composed without running it (for tests and
    tools; unresolved, without the hydra node)."""
    with hydra.initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra.compose(config_name="config", overrides=list(overrides))


def typed_command(argv: list[str] | None = None) -> str:
    """The command line of this launch as the user typed it (a sweep's command.txt): `normbench
    train ...` from the normbench command (normbench/cli.py names the program so), else
    `python run.py ...`."""
    argv = sys.argv if argv is None else argv
    program = argv[0].split(" ")
    if program[0] == "normbench":
        return shlex.join([*program, *argv[1:]])
    return shlex.join(["python", *argv])


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> float | None:
    # The plain mapping: train.run parses it into a RunConfig once (and records in the run
    # folder why a bad value is refused, so that a sweep's summary names the cell).
    config = OmegaConf.to_container(cfg, resolve=True)
    # torchrun / SLURM with several processes: join them (nothing happens in a single process)
    distributed.start_process_group(config["device"])
    run_dir = agreed_run_dir(Path(HydraConfig.get().runtime.output_dir))
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        summary = run(config, run_dir)
    except (ConfigError, NormConfigError, RecordsError, DatasetError) as error:
        # A bad value or an unusable folder: one clear line, no traceback.
        log.error("%s", error)
        if in_sweep:
            return None  # the sweep goes on; the run folder says why this cell failed
        sys.exit(2)
    except Terminated as error:  # SIGTERM (SLURM's notice before a kill): records are consistent
        log.error("%s: %s", run_dir, error)
        sys.exit(143)  # 128 + SIGTERM, as if the signal had ended the process
    except Exception:
        if in_sweep:
            log.exception("run %s failed; the sweep goes on", run_dir)
            return None
        raise
    log.info("%s: %s (%s), final error %s, median of last 5 %s", run_dir, summary["status"],
             summary["outcome"], _fmt(summary["final_error"]), _fmt(summary["median5_error"]))
    return summary["final_error"]


def agreed_run_dir(own: Path) -> Path:
    """The first process's run folder, for every process. They differ only when the folder
    depends on the time or the process (e.g. hydra.run.dir=outputs/${now:%H-%M-%S}); then the
    empty folder Hydra made for this process is removed."""
    agreed = distributed.first_process_decides(lambda: own)
    if agreed != own:
        with contextlib.suppress(OSError):  # not empty: not made by Hydra for us, keep it
            own.rmdir()
    return agreed


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


if __name__ == "__main__":
    main()
