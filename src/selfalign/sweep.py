"""Multirun sweeps (`python -m selfalign -m ...`): one MLflow parent run, a ranked table at the end.

Hydra calls this callback around every multirun (`hydra.callbacks.sweep` in `conf/config.yaml`). Each
job's stage run is nested under the parent; each job's `result.json` gives its objective (for
`stage=train`, the best validation loss), which also drives the Optuna sweeper (`hparams_search=`).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from selfalign.config import TrackingConfig
from selfalign.utils.io import write_json

SUMMARY_FILE = "sweep_summary.json"
COLUMNS = ("train_loss", "steps", "tokens_per_s")  # beside the objective (train: the best val_loss)


def _objective(row: dict) -> float:
    value = row.get("objective")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def rank(rows: list[dict]) -> list[dict]:
    """Jobs best-first by objective (lower is better); jobs without one last, in job order."""
    return sorted(rows, key=lambda r: (_objective(r), r["job"]))


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.parent: str | None = None
        self.tracking: TrackingConfig | None = None
        self.active = False  # Hydra calls on_job_end for single runs too; only multiruns are collected

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from selfalign.tracking import open_parent_run

        self.rows, self.active = [], True
        self.tracking = OmegaConf.to_object(config.tracking)
        stage = config.stage.name
        tags = {"stage": stage, "kind": "sweep", "sweep_dir": str(config.hydra.sweep.dir)}
        self.parent = open_parent_run(self.tracking, f"sweep-{stage}", tags)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not self.active:
            return
        run_dir = Path(job_return.hydra_cfg.hydra.runtime.output_dir)
        result_file = run_dir / "result.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        crashed = job_return.status != JobStatus.COMPLETED or not result or "error" in result
        status = "error" if crashed else ("ok" if result.get("passed", False) else "failed")
        self.rows.append(
            {
                "job": job_return.hydra_cfg.hydra.job.num,
                "overrides": list(job_return.overrides or []),
                "status": status,  # ok | failed (ran; its checks failed) | error (crashed or bad input)
                "objective": None if crashed else result.get("objective"),
                "run_dir": str(run_dir),
                "adapter_dir": result.get("adapter_dir"),
                "milestone": result.get("milestone"),
                **{k: result.get(k) for k in COLUMNS},
            }
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from selfalign.tracking import close_parent_run

        self.active = False
        ranked = rank(self.rows)
        failed = [r for r in ranked if r["status"] != "ok"]
        crashed = [r for r in ranked if r["status"] == "error"]
        write_json({"jobs": ranked, "best": ranked[0] if ranked else None}, Path(config.hydra.sweep.dir) / SUMMARY_FILE)
        milestones = [r["milestone"] for r in sorted(self.rows, key=lambda r: r["job"]) if r.get("milestone")]
        if milestones:  # a sweep of pipelines: the milestone table says more than a ranking
            from selfalign.eval.milestone import print_milestone

            print_milestone(milestones)
        else:
            print_table(ranked)
        best = [r for r in ranked if r["status"] != "error" and r["objective"] is not None]
        metrics = {"best_objective": _objective(best[0])} if best else {}
        metrics |= {"jobs": len(ranked), "jobs_passed": len(ranked) - len(failed)}
        close_parent_run(self.tracking, self.parent, failed=bool(crashed), metrics=metrics)
        if failed:
            sys.exit(1)


def print_table(ranked: list[dict]) -> None:
    from rich.table import Table

    from selfalign.utils.console import console

    shared = set.intersection(*(set(r["overrides"]) for r in ranked)) if ranked else set()
    table = Table(title="sweep: ranked by objective (lower is better)")
    for name in ("rank", "job", "swept", "objective", *COLUMNS, "status"):
        table.add_column(name, justify="left" if name in ("swept", "status") else "right")
    for i, r in enumerate(ranked, 1):
        swept = " ".join(o for o in r["overrides"] if o not in shared)
        cells = [_fmt(r.get(k)) for k in ("objective", *COLUMNS)]
        table.add_row(str(i), str(r["job"]), swept, *cells, r["status"])
    console.print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
