"""The typed eval report reads and writes the report files exactly as they are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfalign.eval.milestone import milestone_row
from selfalign.eval.report import AdapterResult, EvalReport

REPORTS = Path(__file__).resolve().parents[2] / "reports"
SHIPPED = ["neutral-concise-0_2_0.json", "socratic-skeptical-0_2_0.json"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_reports_round_trip_byte_for_byte(name):
    text = (REPORTS / name).read_text(encoding="utf-8")
    report = EvalReport.read(REPORTS / name)
    assert isinstance(report.adapters[0], AdapterResult) and report.policy is not None
    assert report.passed == all(a.passed for a in report.adapters)
    again = json.dumps(report.to_json(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert again == text  # what write_json writes


def test_optional_blocks_are_left_out_when_unset():
    data = json.loads((REPORTS / SHIPPED[0]).read_text(encoding="utf-8"))
    for key in ("policy", "config_hash", "evalset"):
        del data[key]
    del data["adapters"][0]["champion"]  # run_eval's reports carry no alias
    report = EvalReport.from_json(data)
    assert report.policy is None and report.adapters[0].champion is None
    assert report.to_json() == data


def test_milestone_row_reads_the_typed_report():
    report = EvalReport.read(REPORTS / SHIPPED[0])
    persona = {"id": report.adapters[0].persona_id, "refusal_policy": {"band": [0.08, 0.18]}}
    row = milestone_row(persona, None, None, report, attach_max_ms=1000)
    gates = report.adapters[0].gates
    assert row["style_delta"] == gates["style_delta"]["value"] and row["tox_p95"] == gates["tox_p95"]["value"]
    assert row["passed"] == (gates["passed"] and report.adapters[0].attach_ms < 1000)


def test_a_file_that_is_not_a_report_is_a_value_error_naming_it(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"base_model": "m", "adapters": []}))  # no base block
    with pytest.raises(ValueError, match=r"old\.json: not an eval report \(KeyError"):
        EvalReport.read(path)
