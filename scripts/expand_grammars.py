"""Expand the toxicity judge's two grammars: its functional suite (a test set) and its grammar training source.

    python scripts/expand_grammars.py           # rewrite judge_data/toxicity/{functional_suite,grammar_sentences}.jsonl
    python scripts/expand_grammars.py --check   # fail if a shipped file is not its grammar's output

`suite_grammar.yaml` -> `functional_suite.jsonl` and `train_grammar.yaml` -> `grammar_sentences.jsonl`. Every
template is expanded with every combination of the words of the slots it names, and its first letter is put in
upper case; each function keeps `per_function` of its sentences, drawn with a generator seeded by the grammar's seed
and the function's name, in the order drawn. Deterministic: no timestamps, one ordering.
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
DATA = ROOT / "judge_data" / "toxicity"
GRAMMARS = {
    DATA / "suite_grammar.yaml": DATA / "functional_suite.jsonl",
    DATA / "train_grammar.yaml": DATA / "grammar_sentences.jsonl",
}
_SLOT = re.compile(r"\{(\w+)\}")
_FIRST_LETTER = re.compile(r"^(\W*)([a-z])")


def expand(template: str, slots: dict[str, list[str]]) -> list[str]:
    """Every filling of `template`'s slots, in the order of the slot lists, first letter in upper case."""
    names = list(dict.fromkeys(_SLOT.findall(template)))
    return [
        _FIRST_LETTER.sub(lambda m: m[1] + m[2].upper(), template.format(**dict(zip(names, words, strict=True))))
        for words in itertools.product(*[slots[n] for n in names])
    ]


def build(grammar: dict, path: Path) -> list[dict]:
    rows = []
    for function, spec in grammar["functions"].items():
        cases = list(dict.fromkeys(t for template in spec["templates"] for t in expand(template, grammar["slots"])))
        if len(cases) < grammar["per_function"]:
            sys.exit(f"{path}: function {function} expands to {len(cases)} cases, fewer than per_function")
        drawn = random.Random(f"{grammar['seed']}:{function}").sample(cases, grammar["per_function"])
        rows += [{"function": function, "label": int(spec["label"]), "text": text} for text in drawn]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = parser.parse_args()
    failed = 0
    for grammar, out in GRAMMARS.items():
        rows = build(yaml.safe_load(grammar.read_text(encoding="utf-8")), grammar)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if args.check:
            same = out.exists() and out.read_text(encoding="utf-8") == text
            print(f"{out}: {'identical' if same else 'DIFFERS'} ({len(rows)} rows)")
            failed += not same
        else:
            out.write_text(text, encoding="utf-8")
            print(
                json.dumps(
                    {
                        "path": str(out.relative_to(ROOT)),
                        "rows": len(rows),
                        "functions": len({r["function"] for r in rows}),
                    }
                )
            )
    return int(bool(failed))


if __name__ == "__main__":
    raise SystemExit(main())
