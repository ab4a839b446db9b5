"""Train one model, or a sweep with -m. Hydra stays here, at the edge of the library.

    python run.py norm=gn batch=2                       # one run
    python run.py -m norm=bn,gn batch=32,8,2            # a sweep
    python run.py -m experiment=demo                    # a named sweep from experiments/

The run folder is runs/<experiment>/<norm>_b<batch>x<workers>_<placement>_s<seed>_<hash>, the hash
being of the config, so relaunching the same command finds its folders: finished runs are skipped
and interrupted ones resume from their checkpoints.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from normbench.config import ConfigError, run_name
from normbench.data import DatasetError
from normbench.norms import NormConfigError
from normbench.records import RecordsError
from normbench.train import run

log = logging.getLogger("normbench")


def _run_name_resolver(*, _root_: DictConfig) -> str:
    # Resolved for hydra.run.dir / hydra.sweep.subdir: hash the job's config without the hydra
    # node (which holds this very interpolation).
    job = OmegaConf.masked_copy(_root_, [k for k in _root_ if k != "hydra"])
    return run_name(OmegaConf.to_container(job, resolve=True))


OmegaConf.register_new_resolver("run_name", _run_name_resolver, replace=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    config = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        summary = run(config, run_dir)
    except (ConfigError, NormConfigError, RecordsError, DatasetError) as error:
        # A bad value or an unusable folder: one clear line, no traceback.
        log.error("%s", error)
        if in_sweep:
            return None  # the sweep goes on; the run folder says why this cell failed
        sys.exit(2)
    except Exception:
        if in_sweep:
            log.exception("run %s failed; the sweep goes on", run_dir)
            return None
        raise
    log.info("%s: %s (%s), final error %s, median of last 5 %s", run_dir, summary["status"],
             summary["outcome"], _fmt(summary["final_error"]), _fmt(summary["median5_error"]))
    return summary["final_error"]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


if __name__ == "__main__":
    main()
