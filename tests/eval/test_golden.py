"""The Golden 100: its composition, and the pins in code that freeze it (a `.sha256` beside it is not enough)."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter

import pytest

from selfalign.dataops.bank import load_bank
from selfalign.dataops.dedup import shingles
from selfalign.dataops.synth import redline_categories
from selfalign.errors import SelfAlignError
from selfalign.eval.golden import (
    COMPOSITION,
    FROZEN,
    by_category,
    check_composition,
    load_custom_set,
    load_golden,
    load_policy,
    lock_path,
    verify_lock,
)
from selfalign.persona.schema import load_persona
from selfalign.utils.hashing import sha256_file
from tests.conftest import GOLDEN, PERSONAS, POLICY


def test_composition():
    rows = load_golden(GOLDEN)
    assert len(rows) == 100
    assert Counter(r["tags"][0] for r in rows) == COMPOSITION
    assert [r["id"] for r in rows] == [f"eval-{i:04d}" for i in range(1, 101)]
    assert len({r["prompt"] for r in rows}) == 100
    style = Counter(r["tags"][1] for r in by_category(rows, "style"))
    assert style == {"writing": 20, "reasoning": 20}
    refusal = Counter(r["tags"][1] for r in by_category(rows, "refusal"))
    assert refusal == {"should-answer": 17, "should-refuse": 3}


def test_pinned_sha_and_lock_file_agree():
    assert FROZEN["golden_v0.jsonl"].sha256 == sha256_file(GOLDEN)
    assert lock_path(GOLDEN).read_text().split() == [sha256_file(GOLDEN), GOLDEN.name]
    assert verify_lock(GOLDEN) == sha256_file(GOLDEN)


@pytest.fixture
def golden_copy(tmp_path):
    path = tmp_path / GOLDEN.name
    shutil.copy(GOLDEN, path)
    return path


def test_modified_set_is_refused_even_with_a_fresh_lock(golden_copy):
    rows = [json.loads(line) for line in golden_copy.read_text().splitlines()]
    rows[0]["prompt"] += " Please."
    golden_copy.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lock_path(golden_copy).write_text(f"{sha256_file(golden_copy)}  {golden_copy.name}\n")
    with pytest.raises(SelfAlignError, match=r"is not the frozen golden_v0\.jsonl .*pinned in selfalign\.eval\.golden"):
        load_golden(golden_copy)


def test_a_five_row_style_only_set_is_not_a_golden_set(tmp_path):
    """The hole the issue found: an edited small set with its own lock. By name it is refused; as a custom set it
    loads, and is then never the milestone (tests/stages/test_eval_stage.py)."""
    rows = by_category(load_golden(GOLDEN), "style")[:5]
    for name in ("golden_v0.jsonl", "golden_v1.jsonl"):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        lock_path(path).write_text(f"{sha256_file(path)}  {name}\n")
        with pytest.raises(SelfAlignError, match=r"is not the frozen|not a frozen set of this version"):
            load_golden(path)
    assert len(load_custom_set(tmp_path / "golden_v1.jsonl")) == 5


def test_composition_and_ids_are_checked():
    rows = load_golden(GOLDEN)
    frozen = FROZEN["golden_v0.jsonl"]
    check_composition(GOLDEN, rows, frozen)
    with pytest.raises(SelfAlignError, match=r"composition .* is not"):
        check_composition(GOLDEN, rows[:-1], frozen)
    swapped = [dict(r) for r in rows]
    swapped[0]["id"], swapped[40]["id"] = swapped[40]["id"], swapped[0]["id"]
    with pytest.raises(SelfAlignError, match=r"the style rows are not the pinned ids eval-0001…eval-0040"):
        check_composition(GOLDEN, swapped, frozen)


def test_missing_set_is_refused(tmp_path):
    with pytest.raises(SelfAlignError, match="eval set not found"):
        load_golden(tmp_path / "golden_v0.jsonl")
    with pytest.raises(SelfAlignError, match="eval set not found"):
        load_custom_set(tmp_path / "mine.jsonl")


def test_custom_set_malformed_row_names_the_line(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(GOLDEN.read_text() + '{"id": "eval-0101", "prompt": "x"}\n')
    with pytest.raises(SelfAlignError, match=r":101: a row must have exactly the keys id, prompt, tags"):
        load_custom_set(path)
    path.write_text("")
    with pytest.raises(SelfAlignError, match="the custom set has no rows"):
        load_custom_set(path)


def test_policy_set_composition_and_pins():
    rows = load_policy(POLICY)
    assert FROZEN["policy_v0.jsonl"].sha256 == sha256_file(POLICY)
    assert lock_path(POLICY).read_text().split() == [sha256_file(POLICY), POLICY.name]
    assert Counter(r["tags"][0] for r in rows) == {"should-refuse": 70, "near-miss": 70, "bait": 35}
    assert len({r["prompt"] for r in rows}) == 175
    # every redline category of every shipped persona has should-refuse and near-miss prompts
    personas = [load_persona(p)[0] for p in sorted(PERSONAS.glob("*.yaml"))]
    wanted = {c for p in personas for c in redline_categories(p)}
    assert wanted == {
        "weapons",
        "chemical",
        "drugs",
        "hacking",
        "pii",
        "self_harm",
        "doxxing",
        "tracking",
        "bio",
        "violence",
    }
    for kind in ("should-refuse", "near-miss"):
        per = Counter(r["tags"][1] for r in by_category(rows, kind))
        assert set(per) == wanted and min(per.values()) >= 6, (kind, per)
    assert set(Counter(r["tags"][1] for r in by_category(rows, "bait"))) == {
        "insult",
        "stereotype",
        "provocation",
        "jailbreak",
        "loaded",
    }


def _bank_texts() -> list[str]:
    """Every instruction the synth bank can produce, and every other string in it (placeholders dropped)."""
    bank = load_bank()
    texts = [
        t.format(topic=topic)
        for d in bank["domains"].values()
        for ts in d["templates"].values()
        for t in ts
        for topic in d["topics"]
    ]

    def strings(node):
        if isinstance(node, str):
            yield re.sub(r"\{\w+\}", " ", node)
        elif isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)

    return texts + list(strings(bank))


def test_policy_set_shares_no_five_word_run_with_the_golden_100_or_the_synth_bank():
    policy = load_policy(POLICY)
    for name, others in (("Golden 100", [r["prompt"] for r in load_golden(GOLDEN)]), ("synth bank", _bank_texts())):
        seen = set().union(*(shingles(t, 5) for t in others))
        overlaps = {r["id"]: shingles(r["prompt"], 5) & seen for r in policy}
        assert not {k: v for k, v in overlaps.items() if v}, name


def test_the_two_frozen_sets_are_not_interchangeable():
    with pytest.raises(SelfAlignError, match=r"categories should-refuse, near-miss, bait, not the style"):
        load_golden(POLICY)
    with pytest.raises(
        SelfAlignError, match=r"categories style, qa, refusal, safety, neutrality, not the should-refuse"
    ):
        load_policy(GOLDEN)
