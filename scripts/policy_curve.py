"""The policy set's discrimination curve for the base and any adapters, without decoding: each should-refuse and
near-miss prompt's continuous refusal score (log p(the persona's refusal opening | prompt), teacher-forced), and the
ROC-AUC between the two groups, overall and per category. Prints one JSON object; progress goes to stderr.

    python scripts/policy_curve.py adapters/neutral-concise/0.1.0 adapters/neutral-concise/0.2.0 [--persona ...]

Eval reports the same numbers beside recall and precision (`stage=eval`); this script re-scores adapters from a
sweep in seconds each, so a recipe can be judged by whether it moves the curve, not one operating point.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="*", help="adapter dirs (under --root)")
    parser.add_argument("--persona", default=str(ROOT / "personas" / "neutral_concise.yaml"))
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--root", default=str(ROOT / "adapters"))
    parser.add_argument("--policy", default=str(ROOT / "golden" / "policy_v0.jsonl"))
    args = parser.parse_args()

    from selfalign.eval.golden import load_policy
    from selfalign.eval.metrics import roc_auc
    from selfalign.persona.schema import load_persona
    from selfalign.persona.style import refusal_opening
    from selfalign.runtime.loader import apply_adapter, load_base, resolve_base_model
    from selfalign.runtime.scoring import continuation_logprobs

    persona, _ = load_persona(args.persona)
    rows = [r for r in load_policy(args.policy) if r["tags"][0] != "bait"]
    labels = [r["tags"][0] == "should-refuse" for r in rows]
    handle = load_base(resolve_base_model(args.model))
    opening = refusal_opening(persona)
    out = {"opening": opening, "n": len(rows), "models": {}}
    for path in [None, *args.adapters]:
        name = None if path is None else apply_adapter(handle, path, root=args.root, name=f"a{len(out['models'])}")
        print(f"[policy_curve] scoring {path or 'base'}", file=sys.stderr, flush=True)
        scores = continuation_logprobs(handle, [r["prompt"] for r in rows], opening, adapter=name)
        per_category = {}
        for cat in sorted({r["tags"][1] for r in rows}):
            ix = [i for i, r in enumerate(rows) if r["tags"][1] == cat]
            per_category[cat] = round(roc_auc([labels[i] for i in ix], [scores[i] for i in ix]), 4)
        out["models"][path or "base"] = {"roc_auc": round(roc_auc(labels, scores), 4), "per_category": per_category}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
