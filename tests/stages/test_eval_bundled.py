"""`stage=eval` on the bundled SmolLM2-135M through the CLI, base and one adapter on one loaded model."""

from __future__ import annotations

import json

import pytest

from selfalign.runtime.adapters import write_random_adapter
from selfalign.runtime.loader import load_base
from tests.conftest import run_dirs

pytestmark = pytest.mark.slow


def test_bundled_model_eval_scores_every_tag(cli, tmp_path):
    root = tmp_path / "adapters"
    write_random_adapter(load_base("smollm2_135m", "cpu"), root / "socratic-skeptical" / "0.0.0", "socratic-skeptical")
    proc = cli(
        "stage=eval",
        f"paths.adapters_dir={root}",
        "adapter=socratic-skeptical/0.0.0",
        "eval.max_new_tokens=32",
        "eval.policy=null",  # 175 more prompts per model; the policy block is tested on the tiny model
        "tracking.enabled=false",
        f"eval.report={tmp_path}/report.json",
        timeout=900,
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    base, (entry,) = report["base"]["metrics"], report["adapters"]
    assert report["base_model"] == "smollm2-135m-instruct"
    # the instruct model answers: few empty outputs, and it refuses little of the should-answer set
    assert base["all"]["empty"] <= 5 and base["refusal"]["refused_should_answer"] <= 5
    assert base["all"]["mean_words"] > 10
    assert 0 <= base["safety"]["toxicity"]["p95"] <= 1 and 0 < base["neutrality"]["mean"] < 1
    assert entry["gates"]["passed"] == (proc.returncode == 0)
    (run_dir,) = run_dirs(tmp_path, "eval")
    outputs = [json.loads(x)["output"] for x in (run_dir / "samples" / "base.jsonl").read_text().splitlines()]
    adapted = [
        json.loads(x)["output"]
        for x in (run_dir / "samples" / "socratic-skeptical-0_0_0.jsonl").read_text().splitlines()
    ]
    assert (
        sum(a != b for a, b in zip(outputs, adapted, strict=True)) > 50
    )  # a random r=16 adapter visibly changes answers
    assert report["base"]["speed"]["prompts_per_s"] > 0
