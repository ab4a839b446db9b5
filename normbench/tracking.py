"""Mirroring runs to Weights & Biases. The local run folder stays the record of truth.

``mode`` is ``online``, ``offline`` (the default: real run files under the run folder that
``wandb sync <run folder>/wandb/offline-run-*`` uploads later) or ``disabled`` (W&B is not even
imported).

What a training run's W&B run holds:

- ``config``: the run's resolved config, nested as in ``config.yaml`` (W&B shows and filters it
  as ``norm.name``, ``optim.lr_per_256``, ...), plus one derived key, ``global_batch`` =
  ``batch * workers``;
- ``job_type`` ``train`` (``report`` for the report's run), the group from ``wandb.group``
  (the experiment by default), and tags ``norm=gn``, ``batch=2``, ``workers=8``,
  ``placement=before``, ``model=...``, ``dataset=...`` (RUN_TAG_KEYS) to filter by;
- one history row per epoch, at W&B step = epoch, with the fields of ``metrics.jsonl``.

Resuming: a resumed run keeps its W&B id (stored in the checkpoint). W&B continues a run online
only; offline it starts an empty run under the same id, and ``wandb sync`` of the offline
folders then keeps the history of the last one synced. So on resume the epochs of the
checkpoint's history that the W&B run does not hold yet (all of them offline, those after its
last step online) are logged again before training goes on: the newest offline folder of a run
holds every epoch exactly once. Sync that one (or all of them, oldest first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from .config import RunConfig, WandbConfig

# Config values a training run is tagged with, as `key=value` (dotted keys name nested values).
RUN_TAG_KEYS = ("norm.name", "batch", "workers", "placement", "model.name", "dataset.name")


def _value(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def run_tags(cfg: RunConfig) -> list[str]:
    """Return the tags of a training run: ``norm=gn``, ``batch=2``, ... (RUN_TAG_KEYS)."""
    return [f"{key.removesuffix('.name')}={_value(cfg, key)}" for key in RUN_TAG_KEYS]


def run_config(cfg: RunConfig) -> dict[str, Any]:
    """Return the W&B config of a training run: the nested config plus ``global_batch``."""
    return {**cfg.to_dict(), "global_batch": cfg.global_batch}


def _start(settings: WandbConfig, run_dir: Path, **init: Any):
    import wandb  # imported only when used: it is slow to import

    return wandb.init(project=settings.project, entity=settings.entity, group=settings.group,
                      mode=settings.mode, dir=str(run_dir), reinit="finish_previous", **init)


class Tracker:
    """The W&B run of one training run (nothing at all with ``mode: disabled``).

    settings: the config's ``wandb`` section (mode, project, entity, group).
    cfg: the run's config.
    run_id: the W&B id of an earlier launch of this run (from its checkpoint), or None.
    history: the epochs already recorded (a resumed run's checkpoint history, one record per
        epoch with its ``epoch``); those the W&B run lacks are logged again (see above).
    """

    def __init__(self, settings: WandbConfig, run_dir: Path, cfg: RunConfig,
                 *, run_id: str | None = None, name: str | None = None,
                 history: Iterable[Mapping[str, Any]] = ()) -> None:
        self.mode = settings.mode
        self._run = None
        self.run_id = run_id
        if self.mode == "disabled":
            return
        self._run = _start(settings, run_dir, name=name, job_type="train", tags=run_tags(cfg),
                           config=run_config(cfg), id=run_id,
                           resume="allow" if run_id else None)
        self.run_id = self._run.id
        self._log_missing_epochs(history)

    def _log_missing_epochs(self, history: Iterable[Mapping[str, Any]]) -> None:
        # starting_step is the step W&B expects next: 0 for a new run and for any offline run,
        # the last logged step + 1 for a run resumed online. Steps are epochs (see log()).
        first_missing = self._run.starting_step
        for record in history:
            if record["epoch"] >= first_missing:
                self.log(record, step=record["epoch"])

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log one epoch's record; ``step`` is the epoch (1 for the first)."""
        if self._run is not None:
            self._run.log(dict(metrics), step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self._run is not None:
            self._run.summary.update(dict(values))

    def finish(self, exit_code: int = 0) -> None:
        """Always called, also when the run fails, so W&B never keeps a run 'running'."""
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None


def log_report(settings: Mapping[str, Any], run_dir: Path, *, name: str,
               config: Mapping[str, Any], figures: Mapping[str, Path],
               tables: Mapping[str, Any], line_charts: Iterable[tuple[str, str, str, str, str]] = ()
               ) -> str:
    """Log a report as one W&B run of job_type ``report``; return its id.

    settings: mode, project, entity and group (those of the runs the report covers).
    figures: {name: PNG path}, logged as images under ``figures/<name>``.
    tables: {name: pandas DataFrame}, logged as W&B tables.
    line_charts: (chart name, table name, x column, y column, series column): a W&B line chart
        of a logged table, one line per value of the series column.
    """
    import wandb

    run = _start(WandbConfig(mode=settings["mode"], project=settings["project"],
                             entity=settings.get("entity"), group=settings.get("group")),
                 run_dir, name=name, job_type="report", config=dict(config))
    logged_tables = {key: wandb.Table(dataframe=frame) for key, frame in tables.items()}
    charts = {chart: wandb.plot.line(logged_tables[table], x, y, stroke=series, title=chart)
              for chart, table, x, y, series in line_charts}
    images = {f"figures/{stem}": wandb.Image(str(path)) for stem, path in figures.items()}
    run.log({**images, **logged_tables, **charts})
    run_id = run.id
    run.finish()
    return run_id
