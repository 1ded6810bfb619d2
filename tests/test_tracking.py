"""The MLflow experiment: created with the kind that makes MLflow 3's UI open it on its runs."""

from __future__ import annotations

from mlflow import MlflowClient

from selfalign.tracking import EXPERIMENT_KIND, tracked_run
from tests.conftest import preset


def test_experiment_opens_on_its_runs_new_or_old(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    cfg = preset("tracking", "mlflow", tracking_uri=uri, artifact_location=str(tmp_path / "mlruns" / "artifacts"))
    with tracked_run(cfg, run_name="one", tags={"stage": "test"}, params={"a": 1}) as tracker:
        tracker.metrics({"loss": 0.5})
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("selfalign")
    assert (
        experiment.tags["mlflow.experimentKind"]
        == "custom_model_development"
        == EXPERIMENT_KIND["mlflow.experimentKind"]
    )
    assert [r.info.run_name for r in client.search_runs([experiment.experiment_id])] == ["one"]

    # a store made before the tag existed gets it on the next run
    old = client.create_experiment("older", artifact_location=(tmp_path / "old").as_uri())
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    with tracked_run(cfg.__class__(**{**vars(cfg), "experiment_name": "older"}), run_name="two", tags={}, params={}):
        pass
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
