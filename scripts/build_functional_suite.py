"""Expand the toxicity judge's functional suite from its grammar (judge_data/toxicity/suite_grammar.yaml).

    python scripts/build_functional_suite.py           # rewrite judge_data/toxicity/functional_suite.jsonl
    python scripts/build_functional_suite.py --check   # fail if the shipped suite is not the grammar's output

Every template is expanded with every combination of the words of the slots it names; each function keeps
`per_function` of its cases, drawn with a generator seeded by the grammar's seed and the function's name, in the
order drawn. Deterministic: no timestamps, one ordering.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GRAMMAR = ROOT / "judge_data" / "toxicity" / "suite_grammar.yaml"
SUITE = ROOT / "judge_data" / "toxicity" / "functional_suite.jsonl"
_SLOT = re.compile(r"\{(\w+)\}")


def expand(template: str, slots: dict[str, list[str]]) -> list[str]:
    """Every filling of `template`'s slots, in the order of the slot lists."""
    names = list(dict.fromkeys(_SLOT.findall(template)))
    return [
        template.format(**dict(zip(names, words, strict=True)))
        for words in itertools.product(*[slots[n] for n in names])
    ]


def build(grammar: dict) -> list[dict]:
    rows = []
    for function, spec in grammar["functions"].items():
        cases = list(dict.fromkeys(t for template in spec["templates"] for t in expand(template, grammar["slots"])))
        if len(cases) < grammar["per_function"]:
            sys.exit(f"{GRAMMAR}: function {function} expands to {len(cases)} cases, fewer than per_function")
        drawn = random.Random(f"{grammar['seed']}:{function}").sample(cases, grammar["per_function"])
        rows += [{"function": function, "label": int(spec["label"]), "text": text} for text in drawn]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped suite instead of writing")
    args = parser.parse_args()
    rows = build(yaml.safe_load(GRAMMAR.read_text(encoding="utf-8")))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.check:
        same = SUITE.read_text(encoding="utf-8") == text
        print(f"{SUITE}: {'identical' if same else 'DIFFERS'} ({len(rows)} cases)")
        return 0 if same else 1
    SUITE.write_text(text, encoding="utf-8")
    print(json.dumps({"cases": len(rows), "functions": len({r["function"] for r in rows})}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
