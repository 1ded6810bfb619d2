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


def test_a_dataset_is_logged_as_an_input_without_mlflow_notices(tmp_path):
    """A JSONL with an integer column, as the SFT sets and pair sets have: logged with its digest and context, and
    none of MLflow's warnings about source ambiguity or integer schemas reach the user's console."""
    import warnings

    from selfalign.utils.hashing import sha256_file

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "score": 1}\n{"prompt": "b", "score": 2}\n')
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    cfg = preset("tracking", "mlflow", tracking_uri=uri, artifact_location=str(tmp_path / "mlruns" / "artifacts"))
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        with tracked_run(cfg, run_name="one", tags={}, params={}) as tracker:
            tracker.dataset(data, "pairs-x", "training")
            run_id = tracker.run_id
    assert [str(w.message) for w in heard if "mlflow" in w.filename] == []
    (logged,) = MlflowClient(tracking_uri=uri).get_run(run_id).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("pairs-x", sha256_file(data)[:16])
