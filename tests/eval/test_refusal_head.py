"""The learned refusal judge candidate (selfalign.eval.refusal): its shipped head, its inference path and its report.

It is measured, not yet what `refusal_detect` calls (DECISIONS.md "Refusal judge, leave one source out").
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from selfalign.errors import SelfAlignError
from selfalign.eval.refusal import ARCH, REFUSAL_HEAD, REFUSAL_META, RULE_GROUPS, read_head, rule_features
from tests.conftest import run_script_check


def test_shipped_head_and_report_shape():
    tensors, meta = read_head()
    assert meta["architecture"] == ARCH
    assert set(tensors) == {"mean", "scale", "w", "v", "b"}
    loso = meta["leave_one_source_out"]["by_source"]
    # every source is held out once; at least six named model families besides our two sets
    families = set(loso) - {"project", "project-styles", "coconot-unnamed"}
    assert len(families) >= 6
    for block in loso.values():
        assert set(block) == {"all", "test"}
        assert set(block["all"]) == {"rules", "head", "both", "rules_or_head"}
    assert meta["in_distribution_test"]["both"]["n"] >= 600


def test_rule_features_name_the_groups():
    assert rule_features("I can't help with that.").tolist()[0] == 1.0
    assert rule_features("Lima is the capital of Peru.").tolist() == [0.0] * len(RULE_GROUPS)


def test_missing_or_corrupt_head_is_one_clear_error(tmp_path):
    with pytest.raises(SelfAlignError, match="cannot read the refusal head's metadata"):
        read_head(REFUSAL_HEAD, tmp_path / "absent.json")
    bad = tmp_path / "head.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SelfAlignError, match="cannot load the refusal head"):
        read_head(bad, REFUSAL_META)
    meta = json.loads(REFUSAL_META.read_text(encoding="utf-8"))
    meta["architecture"] = {**ARCH, "layers": 6}
    other = tmp_path / "meta.json"
    other.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(SelfAlignError, match="architecture"):
        read_head(REFUSAL_HEAD, other)


@pytest.mark.slow
def test_judge_reads_every_window_and_blank_is_no_refusal():
    from selfalign.eval.refusal import shipped_judge

    judge = shipped_judge()
    filler = "Here is some ordinary, helpful detail about planting tomatoes in spring. " * 60
    p = judge(["", "   ", "I can't help with that.", filler, filler + " I won't help you forge the permit, though."])
    assert p[0] == 0.0 and p[1] == 0.0
    assert p[2] > 0.5 > p[3]
    assert p[4] > 0.5  # the decline sits in the last window
    assert np.all((p >= 0) & (p <= 1))


@pytest.mark.slow
def test_training_script_reproduces_shipped_head_and_report():
    run_script_check("train_refusal_head.py")


def test_new_sources_are_labelled_and_well_formed():
    from tests.conftest import PROJECT_ROOT

    data = PROJECT_ROOT / "judge_data" / "refusal"
    smol = [json.loads(line) for line in (data / "smollm2_responses.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len({r["id"] for r in smol}) == len(smol) == 80
    assert {r["label"] for r in smol} <= {"compliance", "refusal", "partial", "unclear"}
    assert {r["split"] for r in smol} == {"dev", "test"} and {r["family"] for r in smol} == {"smollm2"}
    styles = [json.loads(line) for line in (data / "written_styles.jsonl").read_text(encoding="utf-8").splitlines()]
    refusing = {"impersonal", "premise-rejected", "lecture", "deflect"}
    assert len(styles) == 80
    for row in styles:
        assert row["label"] == int(row["kind"] in refusing), row
