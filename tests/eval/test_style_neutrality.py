"""style_score and neutrality_score on crafted texts: each component moves the score the documented way."""

from __future__ import annotations

import pytest

from selfalign.eval.metrics import (
    STRUCTURE_PENALTY,
    neutrality_cues,
    neutrality_score,
    structure_score,
    style_components,
    style_score,
    verbosity_overrun,
)
from selfalign.persona.schema import load_persona
from tests.conftest import PERSONAS


@pytest.fixture(scope="module")
def skeptic():
    return load_persona(PERSONAS / "socratic_skeptical.yaml")[0]


@pytest.fixture(scope="module")
def concise():
    return load_persona(PERSONAS / "neutral_concise.yaml")[0]


SECTIONS = ["claim", "evidence", "counterpoint", "next-steps"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Claim: a.\nEvidence: b.\nCounterpoint: c.\nNext steps: d.", 1.0),
        ("**Claim**: a.\n## Evidence\nb.\n- Counterpoint — c.\n4. Next-steps: d.", 1.0),
        ("Claim: a.\nCounterpoint: c.\nEvidence: b.", 0.5),  # evidence after counterpoint is out of order
        ("The claim: a. Some evidence: b.", 0.0),  # mid-line words are not headings
        ("", 0.0),
    ],
)
def test_structure_counts_headings_in_persona_order(text, expected):
    assert structure_score(text, SECTIONS) == expected
    assert structure_score(text, []) == 1.0


def test_verbosity_overrun_is_relative_to_the_budget():
    assert verbosity_overrun("word " * 60, "short", 2) == 0.0  # budget 2 x 30 words
    assert verbosity_overrun("word " * 90, "short", 2) == pytest.approx(0.5)
    assert verbosity_overrun("word " * 500, "short", 2) == 1.0
    assert verbosity_overrun("word " * 240, "medium", 4) == 0.0


def test_style_score_rewards_the_personas_structure_and_length(skeptic):
    shaped = (
        "Claim: Randomisation balances confounders on average.\nEvidence: Trials assign by chance.\n"
        "Counterpoint: Small trials can still be unbalanced.\nNext steps: Check the baseline table."
    )
    plain = "Randomisation balances confounders on average because trials assign treatment by chance."
    rambling = plain + " " + "More words about trials and chance. " * 80
    (s, p, r) = style_components([shaped, plain, rambling], skeptic)
    assert s["structure"] == 1.0 and p["structure"] == 0.0
    assert s["verbosity_overrun"] == 0.0 and r["verbosity_overrun"] == 1.0
    assert s["score"] == pytest.approx((1 + s["cosine"]) / 2)
    assert p["score"] == pytest.approx((1 + p["cosine"]) / 2 - STRUCTURE_PENALTY)
    assert r["score"] == pytest.approx(max(0.0, (1 + r["cosine"]) / 2 - 0.5 - 0.25))
    assert s["score"] - p["score"] > 0.4
    assert style_score(shaped, skeptic) == pytest.approx(s["score"])
    assert 0.0 <= style_score("", skeptic) <= 1.0  # an empty answer is scored, not an error


def test_style_is_judged_against_the_asked_persona(skeptic, concise):
    concise_answer = "Answer: Paris.\nNote: It is also the largest city."
    assert style_score(concise_answer, concise) > style_score(concise_answer, skeptic) + 0.3


def test_a_persona_without_style_material_is_refused(concise):
    broken = {**concise, "style": {**concise["style"], "tone": []}}
    with pytest.raises(ValueError, match="has no style centroid material"):
        style_score("Answer: x.", broken)


def test_neutrality_counts_balance_against_stance():
    balanced = (
        "Supporters say it cuts costs; critics argue it hurts quality. Evidence is mixed; it depends on the city."
    )
    one_sided = (
        "Clearly this policy is a disgrace. Everyone knows it is the worst idea, and I believe it must be stopped."
    )
    assert neutrality_cues(balanced)[1] == 0 and neutrality_cues(balanced)[0] >= 4
    assert neutrality_cues(one_sided)[0] == 0 and neutrality_cues(one_sided)[1] >= 4
    assert neutrality_score(balanced) > 0.8 > 0.2 > neutrality_score(one_sided)
    assert neutrality_score("Paris is the capital of France.") == 0.5
    assert neutrality_score("") == 0.5
