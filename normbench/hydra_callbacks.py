"""Hydra callbacks (Hydra's edge of the library; nothing else in normbench imports this).

:class:`SweepSummary` writes the sweep's command to ``<sweep dir>/command.txt`` when a multirun
starts and prints a one-screen status summary when it ends: how many runs were trained, resumed,
skipped (already finished), failed or diverged in this launch, with the failures' reasons. It
reads the run folders' ``launches.jsonl``, so it works the same with every launcher (local,
joblib, SLURM through submitit), whose jobs may run in other processes or on other machines.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

OUTCOMES = ("trained", "resumed", "skipped", "diverged", "failed", "interrupted")


def last_launch(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "launches.jsonl"
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def launch_outcomes(sweep_dir: Path, since: float) -> dict[Path, dict[str, Any]]:
    """Run folder -> its last launch record, for the launches started at or after ``since``."""
    outcomes = {}
    for launches in sorted(sweep_dir.glob("**/launches.jsonl")):
        record = last_launch(launches.parent)
        if record and record["started"] >= since:
            outcomes[launches.parent] = record
    return outcomes


def failure_reason(run_dir: Path) -> str:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "no summary.json (see the run's log)"
    return summary.get("error") or summary.get("status", "?")


def format_sweep_summary(sweep_dir: Path, since: float) -> str:
    outcomes = launch_outcomes(sweep_dir, since)
    counts = Counter(record["outcome"] for record in outcomes.values())
    lines = [f"sweep {sweep_dir}: {len(outcomes)} runs in this launch",
             "  " + "  ".join(f"{name} {counts.get(name, 0)}" for name in OUTCOMES)]
    for run_dir, record in outcomes.items():
        if record["outcome"] in ("failed", "diverged", "interrupted"):
            lines.append(f"  {record['outcome']:>11}: {run_dir.name}: {failure_reason(run_dir)}")
    return "\n".join(lines)


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        from normbench.hydra_main import typed_command  # the sweep's own entry point

        command = typed_command()
        with open(sweep_dir / "command.txt", "a") as f:
            f.write(command + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        since = getattr(self, "started", 0.0)
        print(format_sweep_summary(Path(config.hydra.sweep.dir), since), flush=True)
