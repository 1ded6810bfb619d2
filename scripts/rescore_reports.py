"""Re-score an eval run's saved answers with the judges of this checkout: the report's numbers beside the new ones.

    python scripts/rescore_reports.py outputs/.../eval [more eval run dirs]   # prints JSON
    python scripts/rescore_reports.py --demo reports/demo.json

An eval run dir holds `eval_report.json` and `samples/` (every model's answers on the Golden 100 and the policy
set). Each answer is scored again by `score_outputs` / `score_policy`, the functions eval itself uses, and the
judge-dependent numbers are printed before (as the report has them) and after: the refusal rate the band gate reads,
the toxicity p95 the tox gate reads, each gate's verdict, and the policy set's recall, near-miss rate, precision and
bait toxicity p95. Style and neutrality do not depend on the judges and are left out. Nothing is generated again:
after a judge changes, this tells what the checked-in reports would say of the same answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from selfalign.eval.harness import score_outputs, score_policy  # noqa: E402
from selfalign.eval.metrics import refusal_detect, toxicity_scores  # noqa: E402
from selfalign.utils.io import read_jsonl  # noqa: E402

ROUND = 4


def _golden_numbers(metrics: dict) -> dict:
    return {
        "refusal_rate": round(metrics["refusal"]["rate"], ROUND),
        "tox_p95": round(metrics["safety"]["toxicity"]["p95"], ROUND),
        "tox_max": round(metrics["safety"]["toxicity"]["max"], ROUND),
    }


def _policy_numbers(metrics: dict) -> dict:
    return {
        "recall": round(metrics["should_refuse"]["recall"], ROUND),
        "near_miss": round(metrics["near_miss"]["refusal_rate"], ROUND),
        "precision": round(metrics["precision"], ROUND),
        "bait_tox_p95": round(metrics["bait"]["toxicity"]["p95"], ROUND),
    }


def _gates(numbers: dict, band: list[float], tox_max: float) -> dict:
    return {
        "refusal_band": band[0] <= numbers["refusal_rate"] <= band[1],
        "tox_p95": numbers["tox_p95"] <= tox_max,
    }


def rescore_run(run_dir: Path) -> dict:
    report = json.loads((run_dir / "eval_report.json").read_text(encoding="utf-8"))
    tox_max = report["settings"]["tox_p95_max"]

    def golden(name: str) -> dict:
        rows = read_jsonl(run_dir / "samples" / f"{name}.jsonl")
        return _golden_numbers(score_outputs(rows, [r["output"] for r in rows], None)[0])

    def policy(name: str) -> dict | None:
        path = run_dir / "samples" / "policy" / f"{name}.jsonl"
        if not path.exists():
            return None
        rows = read_jsonl(path)
        return _policy_numbers(score_policy(rows, [r["output"] for r in rows])[0])

    out = {
        "run": str(run_dir),
        "base": {"golden": {"report": _golden_numbers(report["base"]["metrics"]), "now": golden("base")}},
    }
    if report.get("policy"):
        out["base"]["policy"] = {"report": _policy_numbers(report["policy"]["base"]["metrics"]), "now": policy("base")}
    policy_by_name = {a["name"]: a for a in (report.get("policy") or {}).get("adapters", [])}
    for adapter in report["adapters"]:
        name, band = adapter["name"], adapter["gates"]["refusal_band"]["band"]
        before, after = _golden_numbers(adapter["metrics"]), golden(name)
        entry = {
            "golden": {"report": before, "now": after},
            "gates": {"report": _gates(before, band, tox_max), "now": _gates(after, band, tox_max), "band": band},
        }
        if name in policy_by_name:
            entry["policy"] = {"report": _policy_numbers(policy_by_name[name]["metrics"]), "now": policy(name)}
        out[name] = entry
    return out


def rescore_demo(path: Path) -> dict:
    """The demo's answers: per model, the toxicity max over its answers and how many are refusals, then and now."""
    demo = json.loads(path.read_text(encoding="utf-8"))
    out = {}
    for model, texts in demo["outputs"].items():
        texts = list(texts) + [demo["policy"][kind]["answers"][model]["output"] for kind in demo["policy"]]
        out[model] = {"answers": len(texts), "tox_max": round(max(toxicity_scores(texts)), ROUND)}
        out[model]["refusals"] = sum(refusal_detect(t) for t in texts)
    for kind, block in demo["policy"].items():
        for model, answer in block["answers"].items():
            out[model][f"{kind}_toxicity"] = {
                "report": answer.get("toxicity"),
                "now": round(toxicity_scores([answer["output"]])[0], ROUND),
            }
            out[model][f"{kind}_refused"] = {"report": answer["refused"], "now": refusal_detect(answer["output"])}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="eval run dirs (eval_report.json + samples/)")
    parser.add_argument("--demo", type=Path, help="a demo report (reports/demo.json)")
    args = parser.parse_args()
    for run in args.runs:
        if not (run / "eval_report.json").is_file():
            print(f"{run}: no eval_report.json here (an eval run dir holds it and samples/)", file=sys.stderr)
            return 2
    result = {"runs": [rescore_run(run) for run in args.runs]}
    if args.demo:
        result["demo"] = rescore_demo(args.demo)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
