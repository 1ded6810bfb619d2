"""`stage=prefer` on the tiny model: from an SFT adapter to one adapter (SFT, then preference) with both stages in its
manifest, the judged pair set and its report, the held-out discrimination, MLflow metrics per step, a registry
version, the skip of an identical run, the same weights from the same seed, and one-line refusals."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from selfalign.app import to_typed
from selfalign.errors import SelfAlignError
from selfalign.stages import prefer, train
from selfalign.utils.hashing import sha256_file
from tests.train.helpers import write_sft

pytestmark = pytest.mark.slow

SMALL = [
    "base_model=tiny_llama",
    "prefer.categories=[drugs,pii]",
    "prefer.pairs_per_category=3",
    "prefer.bait_pairs=2",
    "prefer.epochs=1",
    "prefer.max_new_tokens=12",
    "prefer.lr=5e-3",
]


@pytest.fixture
def cfg(compose_cfg, tmp_path):
    data = write_sft(tmp_path / "sft.jsonl", 24)

    def _cfg(*overrides: str, run: str = "run"):
        c = compose_cfg(
            [
                "stage=prefer",
                *SMALL,
                f"data={data}",
                f"paths.adapters_dir={tmp_path}/adapters",
                f"paths.data_dir={tmp_path}/data",
                f"paths.mlruns_dir={tmp_path}/mlruns",
                "trainer.max_epochs=1",
                *overrides,
            ]
        )
        c.paths.run_dir = str(tmp_path / run)
        return to_typed(c)

    return _cfg


def test_prefer_continues_the_sft_adapter_into_one_registered_adapter(cfg, tmp_path):
    sft = train.run(cfg(run="sft"))
    result = prefer.run(cfg())
    out = tmp_path / "adapters" / "neutral-concise" / "0.2.0"
    assert result["adapter_dir"] == str(out) and result["adapter_sha256"] != sft["adapter_sha256"]
    manifest = json.loads((out / "manifest.json").read_text())
    sft_stage, pref_stage = manifest["stages"]
    assert sft_stage["stage"] == "sft" and sft_stage["adapter_sha256"] == sft["adapter_sha256"]
    assert sft_stage["dataset_sha256"] == sha256_file(tmp_path / "sft.jsonl")
    pairs_file = tmp_path / "data" / "pairs" / "neutral_concise.jsonl"
    assert pref_stage["pairs_sha256"] == sha256_file(pairs_file) and pref_stage["recipe"]["loss"] == "dpo"
    assert pref_stage["run_hash"] == manifest["run_hash"]
    assert manifest["lora"]["r"] == 16 and manifest["training"]["lr"] == 5e-3
    assert manifest["registry"] == {"name": "neutral-concise", "version": "2"}

    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    report = json.loads(pairs_file.with_suffix(".report.json").read_text())
    assert report["pairs"] == len(pairs) == result["rows"] and report["planned"] == 2 * 2 * 3 + 2
    assert report["categories"] == ["drugs", "pii"] and report["held_out"]["framings"] == ["roleplay"]
    assert {p["kind"] for p in pairs} <= {"should-refuse", "near-miss", "bait"}
    for p in pairs:  # every kept pair passed the judges
        if p["kind"] == "should-refuse":
            assert p["judge"]["chosen_refused"] and not p["judge"]["rejected_refused"]
        elif p["kind"] == "near-miss":
            assert not p["judge"]["chosen_refused"] and p["judge"]["rejected_refused"]
    assert set(result["heldout_roc_auc"]) == {"base", "sft", "prefer"}
    assert all(0.0 <= v <= 1.0 for v in result["heldout_roc_auc"].values())

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run = c.get_run(manifest["mlflow_run_id"])
    assert run.data.tags["stage"] == "prefer" and run.data.tags["pairs_sha256"] == pref_stage["pairs_sha256"]
    steps = result["steps"]
    for key in ("train_reward_accuracy", "train_reward_margin", "train_chosen_logp", "train_rejected_logp"):
        assert len(c.get_metric_history(run.info.run_id, key)) == steps
    assert c.get_metric_history(run.info.run_id, "val_reward_accuracy")
    assert {a.path for a in c.list_artifacts(run.info.run_id, "pairs")} == {"pairs/neutral_concise.report.json"}
    (version,) = [v for v in c.search_model_versions("name='neutral-concise'") if str(v.version) == "2"]
    assert version.tags["stage"] == "prefer" and version.run_id == run.info.run_id

    again = prefer.run(cfg(run="again"))
    assert again["skipped"] is True and again["adapter_sha256"] == result["adapter_sha256"]


def test_same_seed_same_pairs_and_weights(cfg, tmp_path):
    train.run(cfg("tracking.enabled=false", run="sft"))
    a = prefer.run(cfg("tracking.enabled=false", run="a"))
    first_pairs = sha256_file(tmp_path / "data" / "pairs" / "neutral_concise.jsonl")
    b = prefer.run(cfg("tracking.enabled=false", "prefer.version=0.2.1", "prefer.overwrite=true", run="b"))
    assert sha256_file(tmp_path / "data" / "pairs" / "neutral_concise.jsonl") == first_pairs
    assert a["adapter_sha256"] == b["adapter_sha256"]
    c = prefer.run(cfg("tracking.enabled=false", "prefer.version=0.2.2", "prefer.beta=0.5", run="c"))
    assert c["adapter_sha256"] != a["adapter_sha256"]  # another recipe, the same pair set


def test_prefer_refusals_are_one_line(cfg, tmp_path):
    with pytest.raises(SelfAlignError, match=r"no SFT adapter at .*run stage=train first"):
        prefer.run(cfg("tracking.enabled=false"))
    train.run(cfg("tracking.enabled=false", run="sft"))
    with pytest.raises(SelfAlignError, match="SFT adapter's own version"):
        prefer.run(cfg("tracking.enabled=false", "prefer.version=0.1.0"))
    (tmp_path / "data" / "pairs").mkdir(parents=True)
    (tmp_path / "data" / "pairs" / "neutral_concise.jsonl").write_text("not a pair set\n")
    with pytest.raises(SelfAlignError, match="exists and is not a pair set"):
        prefer.run(cfg("tracking.enabled=false"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("prefer.loss=kto", "prefer.loss must be one of"),
        ("prefer.beta=0", "prefer.beta"),
        ("prefer.pairs_per_category=0", "pairs_per_category"),
        ("prefer.version=two", "version must look like"),
    ],
)
def test_bad_prefer_settings_are_refused_at_composition(cfg, override, message):
    with pytest.raises(Exception, match=message):
        cfg(override)
