"""Synth building blocks: task planning, answer composition, filters, dedup, band arithmetic."""

from __future__ import annotations

from collections import Counter

import pytest

from selfalign.dataops.bank import load_bank
from selfalign.dataops.dedup import NearDuplicateIndex, near_duplicate, simhash
from selfalign.dataops.filter import band_status, dedup_filter, hard_filter, refusal_filter, toxicity_filter
from selfalign.dataops.synth import (
    DOMAIN_SLOTS,
    Task,
    clean_section,
    compose_rows,
    plan_chunk,
    redline_categories,
    refusal_text,
    section_asks,
    section_done,
)
from selfalign.dataops.teacher import Sampling
from selfalign.persona.schema import load_persona
from tests.conftest import PERSONAS

SOCRATIC, _ = load_persona(str(PERSONAS / "socratic_skeptical.yaml"))
CONCISE, _ = load_persona(str(PERSONAS / "neutral_concise.yaml"))
SAMPLING = Sampling(0.8, 0.9, 1)


def test_plan_is_deterministic_and_follows_the_mix():
    a, sa = plan_chunk(SOCRATIC, 3, 42, 40, 4)
    b, sb = plan_chunk(SOCRATIC, 3, 42, 40, 4)
    assert a == b and sa == sb
    assert plan_chunk(SOCRATIC, 4, 42, 40, 4)[0] != a
    assert 0.7 <= sa.temperature <= 1.0 and 0.8 <= sa.top_p <= 0.95
    tasks = [t for c in range(5) for t in plan_chunk(SOCRATIC, c, 42, 40, 0)[0]]
    assert Counter(t.domain for t in tasks) == {
        "general": 120,
        "reasoning": 40,
        "social": 20,
        "safety_edge": 10,
        "code": 10,
    }
    difficulty = Counter(t.difficulty for t in tasks)
    assert max(difficulty.values()) - min(difficulty.values()) <= 1
    assert len(DOMAIN_SLOTS) == 20
    refusals = [t for t in a if t.redline]
    assert len(refusals) == 4 and all(t.domain == "safety_edge" for t in refusals)


def test_redline_categories_follow_the_persona():
    assert set(redline_categories(SOCRATIC)) >= {"bio", "violence", "pii", "doxxing"}
    assert set(redline_categories(CONCISE)) == {"weapons", "chemical", "drugs", "hacking", "pii"}


def test_refusal_rows_split_between_own_redlines_and_the_abuse_baseline():
    tasks = [t for c in range(40) for t in plan_chunk(CONCISE, c, 42, 0, 4)[0]]
    cats = Counter(t.redline for t in tasks)
    assert set(cats) == {"weapons", "chemical", "drugs", "hacking", "pii", "abuse"}
    assert 0.4 < cats["abuse"] / len(tasks) < 0.6  # half the refusal rows, 160 draws
    assert all(t.instruction.strip() and "{" not in t.instruction for t in tasks)


def test_each_refusal_brings_a_near_miss_of_its_category():
    tasks = [t for c in range(40) for t in plan_chunk(CONCISE, c, 42, 8, 4, 1.0)[0]]
    refusals = Counter(t.redline for t in tasks if t.redline)
    near = Counter(t.near_miss for t in tasks if t.near_miss)
    assert refusals == near and sum(near.values()) == 160  # paired one to one, per category
    assert all(t.domain == "safety_edge" and not t.redline for t in tasks if t.near_miss)
    bank = load_bank()["near_miss_requests"]
    assert all(t.instruction in bank[t.near_miss] for t in tasks if t.near_miss)
    # a fractional ratio averages out over chunks; none keeps the old plan
    half = sum(bool(t.near_miss) for c in range(40) for t in plan_chunk(CONCISE, c, 42, 8, 4, 0.5)[0])
    assert 70 <= half <= 90
    assert plan_chunk(CONCISE, 3, 42, 8, 4)[0] == plan_chunk(CONCISE, 3, 42, 8, 4, 0.0)[0]
    task = next(t for t in tasks if t.near_miss)
    texts = {task.id: ["Use the kill command with the process id.", "Check the id with ps first."]}
    (row,) = compose_rows(CONCISE, "neutral-concise", [task], texts, "s", SAMPLING)
    assert row["metadata"]["safety_tags"] == [f"near-miss:{task.near_miss}"]
    assert row["output"] == "Answer: Use the kill command with the process id.\nNote: Check the id with ps first."


def test_section_asks_follow_structure_and_verbosity():
    task = Task("t", "general", "easy", "What is DNA?")
    asks = section_asks(SOCRATIC, task)
    assert len(asks) == 4
    assert 'Write only the "Next steps" part' in asks[3].messages[1]["content"]
    assert "Use at most 2 sentences." in asks[0].messages[1]["content"]
    system = asks[0].messages[0]["content"]
    assert "Questions assumptions" in system and "tone=calm, precise, inquisitive" in system
    assert section_asks(CONCISE, task)[0].max_new_tokens < asks[0].max_new_tokens


@pytest.mark.parametrize(
    ("text", "heading", "n", "expected"),
    [
        (
            "**Claim:** DNA is a molecule. It has two strands. More.",
            "Claim",
            2,
            "DNA is a molecule. It has two strands.",
        ),
        ('I\'d use an "Evidence" approach here.', "Evidence", 2, ""),
        ("Next steps part: read a textbook on it.", "Next steps", 1, "read a textbook on it."),
        ("DNA is a long molecule that", "Claim", 1, "DNA is a long molecule that."),
        ("Yes.", None, 1, ""),
        (None, None, 1, ""),
        # list markers are not sentences (they emptied 36 of 224 raw rows: DECISIONS.md "Synth yield")
        ("1. 1. Planting trees is a delicate matter. 2. 2. The first", None, 1, "Planting trees is a delicate matter."),
        ("Pros: 1. Faster setup; 2. Lower cost. 3. More", None, 1, "Pros: Faster setup; Lower cost."),
        ("- Use a lock box for them.\n- Label", None, 1, "Use a lock box for them."),
        ("The answer is 42. Then go home.", None, 1, "The answer is 42."),
        # a two-word filler does not use up the budget; "e.g." does not end a sentence
        ("Sure! Here is a small test for you. It", None, 1, "Here is a small test for you."),
        ("Antibiotics, e.g. penicillin, kill bacteria. More", None, 1, "Antibiotics, e.g. penicillin, kill bacteria."),
    ],
)
def test_clean_section(text, heading, n, expected):
    assert clean_section(text, heading, n) == expected


@pytest.mark.parametrize(
    ("text", "heading", "n"),
    [
        ("Answer: Sure! Tea is a drink made from leaves. It is popular in Asia. Many drink it daily.", "Answer", 1),
        ("1. First, check the oil level. 2. Then check the tyres. 3. Finally, wash it.", "Steps", 2),
        ("DNA, e.g. in cells, is a long molecule. It stores genes! Really, it does.", None, 2),
        ('I would use an "Evidence" approach. It is good.', "Evidence", 1),
    ],
)
def test_section_done_stops_where_clean_section_would_cut(text, heading, n):
    """The first prefix the teacher may stop at cleans to the same section as the whole text."""
    stop = next(i for i in range(1, len(text) + 1) if section_done(text[:i], heading, n))
    assert clean_section(text[:stop], heading, n) == clean_section(text, heading, n)
    assert stop < len(text)  # and it stops before the end: what follows would have been thrown away


def test_refusal_text_uses_the_persona_template():
    assert refusal_text(SOCRATIC, "bio") == (
        "Claim: I can’t help with that. Here’s a safer alternative: "
        "I can explain how vaccines and biosafety labs protect people from outbreaks."
    )
    assert refusal_text(CONCISE, "pii").startswith("Answer: I can’t provide that. Here’s a safe alternative: I can")
    unstructured = {**CONCISE, "style": {**CONCISE["style"], "structure": []}}
    assert refusal_text(unstructured, "pii").startswith("I can’t provide that.")


def test_compose_rows_builds_the_seed_schema():
    tasks = [Task("a", "general", "easy", "What is DNA?"), Task("r", "safety_edge", "hard", "Make a virus.", "bio")]
    outputs = {"a": ["DNA is a molecule. Extra.", "It carries genes.", "Some say less.", "Read a primer."]}
    answered, refusal = compose_rows(SOCRATIC, "socratic-skeptical", tasks, outputs, "synthetic-v1:test", SAMPLING)
    assert answered["output"] == (  # "Extra." is under three words: not a sentence the budget counts
        "Claim: DNA is a molecule.\nEvidence: It carries genes.\n"
        "Counterpoint: Some say less.\nNext steps: Read a primer."
    )
    assert set(answered) == {"id", "persona_id", "instruction", "input", "output", "metadata"}
    meta = answered["metadata"]
    assert meta["values_vector"]["skepticism"] == 0.9 and meta["safety_tags"] == ["benign"]
    assert meta["style_tags"] == ["calm", "precise", "inquisitive", "claim-evidence-counterpoint-next-steps"]
    assert meta["quality_scores"]["len"] == len(answered["output"].split())
    assert refusal["metadata"]["safety_tags"] == ["redline:bio"] and refusal["output"].startswith("Claim: I can’t help")
    outputs["a"][2] = "no"  # one empty section: the row's output is empty and the hard filter drops it
    assert compose_rows(SOCRATIC, "s", tasks[:1], outputs, "x", SAMPLING)[0]["output"] == ""


def row(output, instruction="What is DNA?", tags=("benign",)):
    return {
        "id": "",
        "persona_id": "p",
        "instruction": instruction,
        "input": "",
        "output": output,
        "metadata": {"safety_tags": list(tags), "quality_scores": {}},
    }


def test_hard_filter_reasons():
    rows = [
        row("Fine answer."),
        row(""),
        row("x" * 50),
        row("Has <|im_end|> token."),
        row("Use <b>bold</b>."),
        row("Step one: get the nerve agent."),
        row("I can’t help with nerve agent requests.", tags=("redline:bio",)),
        {"id": "", "persona_id": "p", "instruction": "q", "input": "", "output": None, "metadata": {}},
    ]
    report = hard_filter(rows, max_chars=40)
    assert [r["output"] for r in report.kept] == ["Fine answer.", "I can’t help with nerve agent requests."]
    assert report.dropped == {
        "empty-output": 1,
        "too-long": 1,
        "markup-or-control-token": 2,
        "redline-term-in-answer": 1,
        "empty-or-missing-field": 1,
    }


def test_dedup_filter_near_duplicates_golden_and_limit():
    index, golden = NearDuplicateIndex(0.7), NearDuplicateIndex(0.7)
    golden.add("Explain the Lindy effect to a high school senior.")
    text = "The water cycle moves water between oceans, air and land through evaporation and rain."
    rows = [
        row(text),
        row(text + " Really."),
        row("Something else entirely about trains and rails today."),
        row("x", instruction="Explain the Lindy effect to a high school senior."),
        row("refusal", instruction="Make a bomb.", tags=("redline:weapons",)),
        row("refusal", instruction="make  a BOMB.", tags=("redline:weapons",)),
        row("A third distinct answer about volcanoes erupting lava."),
    ]
    report = dedup_filter(rows, index, golden, limit=3)
    assert [r["output"] for r in report.kept] == [
        text,
        "Something else entirely about trains and rails today.",
        "refusal",
    ]
    assert report.dropped == {"near-duplicate": 1, "golden-leak": 1}  # stops at the limit: the rest unexamined
    assert index.seen(text) and index.seen_exact("make a bomb.")


def test_refusal_and_toxicity_filters_with_given_scorers():
    rows = [
        row("Sure, here it is."),
        row("I can't do that."),
        row("I can't help.", tags=("redline:x",)),
        row("Here you go.", tags=("redline:x",)),
    ]
    report = refusal_filter(rows, lambda t: t.startswith("I can't"))
    assert report.dropped == {"unplanned-refusal": 1, "refusal-not-detected": 1}
    assert [r["metadata"]["quality_scores"]["refusal"] for r in report.kept] == [False, True]
    tox = toxicity_filter([row("a"), row("b")], 0.2, lambda texts: [0.1, 0.9])
    assert [r["output"] for r in tox.kept] == ["a"] and tox.dropped == {"toxic": 1}


@pytest.mark.parametrize(
    ("refusals", "total", "band", "fraction", "needed"),
    [
        (10, 100, (0.05, 0.15), 0.10, 0),
        (2, 100, (0.05, 0.15), 0.02, 4),
        (0, 0, (0.05, 0.15), 0.0, 0),
        (20, 100, (0.05, 0.15), 0.20, 0),
    ],
)
def test_band_status(refusals, total, band, fraction, needed):
    assert band_status(refusals, total, band) == (pytest.approx(fraction), needed)


def test_simhash_contract():
    a = simhash("the quick brown fox jumps over the lazy dog")
    assert near_duplicate(a, simhash("the quick brown fox jumps over the lazy dog"), k=0)
    assert not near_duplicate(a, simhash("completely different words about tax law and courts"), k=3)


def test_filter_records_contract_with_the_real_scorers():
    from selfalign.dataops.filter import filter_records

    good = "Answer: Tides come from the Moon's pull on the oceans.\nNote: Local coastlines change their size."
    rows = [
        row(good, instruction="What causes tides?"),
        row(good, instruction="What causes tides?"),  # duplicate
        row("Answer: You are a worthless idiot and everyone hates you.\nNote: Go away.", instruction="Roast me."),
        row("I can't help with that request.", instruction="What is rain?"),  # unplanned refusal
        row(
            "I can’t provide that. Here’s a safe alternative: ask a librarian.",
            instruction="Dox her.",
            tags=("redline:pii",),
        ),
    ]
    kept = filter_records(rows, CONCISE)
    assert [r["instruction"] for r in kept] == ["What causes tides?", "Dox her."]
    scores = kept[0]["metadata"]["quality_scores"]
    assert scores["refusal"] is False and scores["toxicity"] < 0.2 and -1 <= scores["style"] <= 1
