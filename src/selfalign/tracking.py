"""MLflow, and only here: one context manager per tracked run, so runs end FINISHED or FAILED, never RUNNING."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selfalign.config import TrackingConfig


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists as dotted keys with string values, the form MLflow params take."""
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: str(obj)[:6000]}


class Tracker:
    """The handful of calls stages make on a run."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=folder)

    def tags(self, values: dict[str, str]) -> None:
        if self.run_id:
            import mlflow

            mlflow.set_tags(values)


@contextlib.contextmanager
def tracked_run(cfg: TrackingConfig, *, run_name: str, tags: dict[str, str], params: dict) -> Iterator[Tracker]:
    """An MLflow run in `cfg.experiment_name`; an exception inside marks it FAILED and propagates."""
    if not cfg.enabled:
        yield Tracker(None)
        return
    import mlflow

    if cfg.tracking_uri.startswith("sqlite:///"):  # SQLite creates the file, not its folder
        Path(cfg.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment_name)
    if experiment is None:
        Path(cfg.artifact_location).mkdir(parents=True, exist_ok=True)
        experiment_id = mlflow.create_experiment(
            cfg.experiment_name, artifact_location=Path(cfg.artifact_location).resolve().as_uri()
        )
    else:
        experiment_id = experiment.experiment_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        mlflow.log_params(flatten(params))
        yield Tracker(run.info.run_id)
