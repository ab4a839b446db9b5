"""Mirroring a run to Weights & Biases. The local run folder stays the record of truth.

``mode`` is ``online``, ``offline`` (the default: real run files under the run folder that
``wandb sync <run folder>/wandb/offline-run-*`` uploads later) or ``disabled`` (W&B is not even
imported). A resumed run continues the same W&B run: its id is kept in the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


class Tracker:
    def __init__(self, settings: Mapping[str, Any], run_dir: Path, config: Mapping[str, Any],
                 *, run_id: str | None = None, name: str | None = None) -> None:
        self.mode = settings["mode"]
        self._run = None
        self.run_id = run_id
        if self.mode == "disabled":
            return
        import wandb  # imported only when used: it is slow to import

        self._run = wandb.init(
            project=settings["project"], entity=settings.get("entity"),
            group=settings.get("group"), name=name, mode=self.mode, dir=str(run_dir),
            config=dict(config), id=run_id, resume="allow" if run_id else None,
            reinit="finish_previous")
        self.run_id = self._run.id

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
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
