"""MLflow, and only here: one context manager per tracked run, so runs end FINISHED or FAILED, never RUNNING."""

from __future__ import annotations

import contextlib
import os
import warnings
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


# A sweep or pipeline's parent run; every run started while it is set is nested under it.
PARENT_RUN_ENV = "SELFALIGN_PARENT_RUN_ID"


class Tracker:
    """The handful of calls stages make on a run."""

    def __init__(self, run_id: str | None, artifact_uri: str | None = None):
        self.run_id = run_id
        self.artifact_uri = artifact_uri

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=folder)

    def artifacts(self, folder_path: str | Path, folder: str | None = None) -> None:
        """Log a whole directory (an adapter, `samples/`) under `folder`."""
        if self.run_id:
            import mlflow

            mlflow.log_artifacts(str(folder_path), artifact_path=folder)

    def dataset(self, path: str | Path, name: str, context: str) -> None:
        """Log a JSONL file as an MLflow dataset input (the runs table's Dataset column): its rows as a table, its
        sha256 as the digest, its path as the source; `context` is `training` or `evaluation`."""
        if not self.run_id:
            return
        import mlflow
        import pandas as pd

        from selfalign.utils.hashing import sha256_file
        from selfalign.utils.io import read_jsonl

        frame = pd.DataFrame(read_jsonl(path))
        with warnings.catch_warnings():
            # Two notices MLflow prints for every local JSONL: that two of its own local-file source classes both
            # match a path (they are the same kind), and that integer columns cannot hold missing values in a model
            # signature (this is a dataset record, not a signature). Neither asks anything of the user.
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted", UserWarning)
            warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer column", UserWarning)
            data = mlflow.data.from_pandas(frame, source=str(path), name=name, digest=sha256_file(path)[:16])
            mlflow.log_input(data, context=context)

    def tags(self, values: dict[str, str]) -> None:
        if self.run_id:
            import mlflow

            mlflow.set_tags(values)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point registry alias `alias` of model `name` at `version` (it moves from any older version)."""
        if self.run_id:
            from mlflow import MlflowClient

            MlflowClient().set_registered_model_alias(name, alias, version)

    def register(self, name: str, folder: str, tags: dict[str, str]) -> str | None:
        """Add a Model Registry version of this run's artefact `folder` under `name`; its version number."""
        if not self.run_id:
            return None
        from mlflow import MlflowClient

        client = MlflowClient()
        if not _model_exists(client, name):
            client.create_registered_model(name, description=f"SelfAlign adapters of persona {name}")
        version = client.create_model_version(
            name, source=f"{self.artifact_uri}/{folder}", run_id=self.run_id, tags=tags
        )
        return str(version.version)


def _model_exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        return False
    return True


# The MLflow 3 UI opens an experiment of this kind on its runs ("Training runs"); without the tag it guessed
# GenAI and opened an empty "Overview" page.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(cfg: TrackingConfig) -> str:
    """Point MLflow at the configured store; the experiment's id, created on first use, tagged with its kind."""
    import mlflow

    if cfg.tracking_uri.startswith("sqlite:///"):  # SQLite creates the file, not its folder
        Path(cfg.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment_name)
    if experiment is None:
        Path(cfg.artifact_location).mkdir(parents=True, exist_ok=True)
        return mlflow.create_experiment(
            cfg.experiment_name, artifact_location=Path(cfg.artifact_location).resolve().as_uri(), tags=EXPERIMENT_KIND
        )
    if any(experiment.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):  # a store made by an older version
        for key, value in EXPERIMENT_KIND.items():
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


@contextlib.contextmanager
def tracked_run(cfg: TrackingConfig, *, run_name: str, tags: dict[str, str], params: dict) -> Iterator[Tracker]:
    """An MLflow run in `cfg.experiment_name`; an exception inside marks it FAILED and propagates.

    Inside a sweep or pipeline (`PARENT_RUN_ENV` set) the run is nested under that parent.
    """
    if not cfg.enabled:
        yield Tracker(None)
        return
    import mlflow

    experiment_id = ensure_experiment(cfg)
    if parent := os.environ.get(PARENT_RUN_ENV):
        tags = {**tags, "mlflow.parentRunId": parent}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        mlflow.log_params(flatten(params))
        yield Tracker(run.info.run_id, run.info.artifact_uri)


_parents: list[str | None] = []  # the parent each open parent run replaced, to restore on close


def open_parent_run(cfg: TrackingConfig, run_name: str, tags: dict[str, str]) -> str | None:
    """Start a parent run (not the active run) and export its id for child runs; nests under an open parent."""
    if not cfg.enabled:
        return None
    from mlflow import MlflowClient

    experiment_id = ensure_experiment(cfg)  # sets the tracking URI, which the client reads when it is made
    outer = os.environ.get(PARENT_RUN_ENV)
    if outer:
        tags = {**tags, "mlflow.parentRunId": outer}
    run = MlflowClient().create_run(experiment_id, run_name=run_name, tags=tags)
    _parents.append(outer)
    os.environ[PARENT_RUN_ENV] = run.info.run_id
    return run.info.run_id


def close_parent_run(cfg: TrackingConfig, run_id: str | None, *, failed: bool, metrics: dict[str, float]) -> None:
    """End a parent run FINISHED (or FAILED) with its summary metrics; the enclosing parent is current again."""
    if not (cfg.enabled and run_id):
        return
    outer = _parents.pop() if _parents else None
    if outer:
        os.environ[PARENT_RUN_ENV] = outer
    else:
        os.environ.pop(PARENT_RUN_ENV, None)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


@contextlib.contextmanager
def parent_run(cfg: TrackingConfig, run_name: str, tags: dict[str, str]) -> Iterator[dict]:
    """A parent run around several stage runs; FAILED if the body raises. Yield a dict to fill with metrics."""
    run_id = open_parent_run(cfg, run_name, tags)
    summary: dict[str, float] = {}
    try:
        yield summary
    except BaseException:
        close_parent_run(cfg, run_id, failed=True, metrics=summary)
        raise
    close_parent_run(cfg, run_id, failed=False, metrics=summary)
