"""Sweeps through the real CLI: a 2-job grid and a 2-trial Optuna search, each job its own nested MLflow run."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from tests.train.helpers import write_sft

pytestmark = pytest.mark.slow


def common(tmp_path) -> list[str]:
    data = write_sft(tmp_path / "sft.jsonl", 24)
    return [
        "base_model=tiny_llama",
        f"data={data}",
        f"paths.adapters_dir={tmp_path}/adapters",
        f"paths.mlruns_dir={tmp_path}/mlruns",
        "trainer.max_steps=2",
    ]


def sweep_dir(tmp_path):
    (path,) = (tmp_path / "outputs" / "multirun" / "train").iterdir()
    return path


def test_grid_sweep_runs_each_job_under_one_parent_and_ranks_them(cli, tmp_path):
    proc = cli("-m", "stage=train", *common(tmp_path), "lora.r=4,8", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sweep: ranked by objective" in proc.stdout
    summary = json.loads((sweep_dir(tmp_path) / "sweep_summary.json").read_text())
    jobs = summary["jobs"]
    assert [j["status"] for j in jobs] == ["ok", "ok"]
    assert sorted(j["job"] for j in jobs) == [0, 1]
    assert jobs[0]["objective"] <= jobs[1]["objective"] and summary["best"] == jobs[0]
    adapters = sorted(p.name for p in (tmp_path / "adapters" / "neutral-concise").iterdir())
    assert len(adapters) == 2 and all(a.startswith("0.1.0+") for a in adapters)  # one adapter per job

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = c.search_runs(["1"])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs"] == 2
    assert sorted(r.data.params["lora.r"] for r in children) == ["4", "8"]
    assert parent.data.metrics["best_objective"] == pytest.approx(jobs[0]["objective"])
    assert len(c.search_model_versions("name='neutral-concise'")) == 2


def test_optuna_search_minimises_validation_loss(cli, tmp_path):
    proc = cli("hparams_search=lora_optuna", "hydra.sweeper.n_trials=2", *common(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = sweep_dir(tmp_path)
    best = (root / "optimization_results.yaml").read_text()
    assert "name: optuna" in best and "lora.lr" in best
    jobs = json.loads((root / "sweep_summary.json").read_text())["jobs"]
    assert len(jobs) == 2 and all(j["status"] == "ok" for j in jobs)
    assert all(any(o.startswith("lora.alpha=") for o in j["overrides"]) for j in jobs)
