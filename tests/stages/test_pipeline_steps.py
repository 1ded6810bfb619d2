"""The pipeline's steps are data: each turns the pipeline's config into its stage's, given the results so far, and
eval takes the last adapter produced."""

from __future__ import annotations

import pytest

from selfalign.app import to_typed
from selfalign.config import PIPELINE_STEPS
from selfalign.stages.pipeline import STEPS, last_adapter


@pytest.fixture
def cfg(compose_cfg):
    return to_typed(compose_cfg(["stage=pipeline", "pipeline.force=true"]))


def test_the_step_table_is_the_pipeline_order():
    assert tuple(STEPS) == PIPELINE_STEPS == ("synth", "train", "prefer", "eval")


def test_each_step_gets_its_stage_run_dir_and_the_results_before_it(cfg):
    done = {"synth": {"rows": 1}, "train": {"adapter_dir": "/a/sft"}, "prefer": None, "eval": None}
    synth = STEPS["synth"](cfg, done)
    assert synth.stage.name == "synth" and synth.paths.run_dir.endswith("/synth") and synth.synth.overwrite
    train = STEPS["train"](cfg, done)
    assert train.data == cfg.synth.out and not train.train.suffix_sweep_jobs and train.train.overwrite
    prefer = STEPS["prefer"](cfg, done)
    assert prefer.prefer.sft_adapter == "/a/sft" and prefer.prefer.overwrite
    assert STEPS["eval"](cfg, done).adapter == "/a/sft"  # no preference step ran: the SFT adapter
    done["prefer"] = {"adapter_dir": "/a/pref"}
    assert STEPS["eval"](cfg, done).adapter == "/a/pref" and STEPS["eval"](cfg, done).adapters == []
    assert last_adapter({"synth": {"rows": 1}}) is None


def test_without_a_train_step_prefer_keeps_its_configured_sft_adapter(compose_cfg):
    cfg = to_typed(compose_cfg(["stage=pipeline", "prefer.sft_adapter=/given"]))
    assert STEPS["prefer"](cfg, {"synth": None, "train": None}).prefer.sft_adapter == "/given"
    with pytest.raises(Exception, match=r"pipeline.steps must be a non-empty subset"):
        to_typed(compose_cfg(["stage=pipeline", "pipeline.steps=[synth,dpo]"]))
