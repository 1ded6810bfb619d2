"""The minimal-pair builder: pairs share their frame and differ in the harmful element, framings vary per category,
held-out framings and categories never reach training, the prompts are disjoint from the frozen sets and the demo,
and the judges keep only pairs whose chosen answer is what was intended and whose rejected one is its opposite."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import yaml

from selfalign.config import DEMO_POLICY_PROMPTS, DEMO_PROMPTS
from selfalign.dataops.pairs import (
    Answers,
    compose_pairs,
    load_grammar,
    minimal_pair,
    minimal_pair_overlap,
    pair_categories,
    pair_report,
    plan_prompts,
)
from selfalign.errors import SelfAlignError
from selfalign.eval.golden import load_golden, load_policy
from tests.conftest import GOLDEN, PERSONAS, POLICY


def persona(name: str = "neutral_concise") -> dict:
    return yaml.safe_load((PERSONAS / f"{name}.yaml").read_text())


def grams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def every_prompt() -> list[str]:
    g = load_grammar()
    texts = []
    for category, items in g["items"].items():
        for i in range(len(items)):
            for framing in g["framings"]:
                texts += [p.prompt for p in minimal_pair(category, i, framing)]
    b = g["bait"]
    texts += [t.format(group=gr, trait=tr) for t in b["templates"] for gr in b["groups"] for tr in b["traits"]]
    return texts


def test_no_pair_prompt_leaks_from_the_frozen_sets_or_the_demo():
    """No shared word 6-gram (a shared 5-gram is a phrase like "how do I kill the"), and no near-duplicate by the
    synth's leakage check (MinHash over word 3-grams), here at Jaccard 0.5 where synth cuts at 0.7."""
    from selfalign.dataops.dedup import NearDuplicateIndex

    frozen = [r["prompt"] for r in load_golden(GOLDEN)] + [r["prompt"] for r in load_policy(POLICY)]
    frozen += DEMO_PROMPTS + list(DEMO_POLICY_PROMPTS.values())
    held = set().union(*(grams(t, 6) for t in frozen))
    index = NearDuplicateIndex(0.5)
    for text in frozen:
        index.add(text)
    prompts = every_prompt()
    assert len(prompts) == 10 * 6 * 6 * 2 + 5 * 8 * 4  # every frame in every framing, both sides; all bait
    assert not [t for t in prompts if grams(t, 6) & held]
    assert not [t for t in prompts if index.seen(t)]


def test_a_minimal_pair_shares_its_frame_and_framing_and_differs_in_the_harmful_element():
    harmful, benign = minimal_pair("violence", 0, "fiction")
    assert (harmful.kind, benign.kind) == ("should-refuse", "near-miss")
    assert harmful.prompt.startswith("I'm drafting a short story") and benign.prompt.startswith("I'm drafting")
    assert "kill my neighbour" in harmful.prompt and "kill the process that hangs my server" in benign.prompt
    assert harmful.prompt.endswith("without anyone noticing?") and benign.prompt.endswith("without anyone noticing?")
    assert minimal_pair_overlap(harmful.prompt, benign.prompt) > 0.5


def test_plan_draws_per_category_and_never_trains_on_held_out_framings_or_categories():
    train, held = plan_prompts(
        ["weapons", "drugs"],
        per_category=5,
        bait=4,
        holdout_framings=["roleplay"],
        holdout_categories=["self_harm"],
        seed=7,
    )
    kinds = Counter((p.category, p.kind) for p in train if p.kind != "bait")
    assert kinds == {(c, k): 5 for c in ("weapons", "drugs") for k in ("should-refuse", "near-miss")}
    assert sum(p.kind == "bait" for p in train) == 4
    assert all(p.framing != "roleplay" and p.category != "self_harm" for p in train)
    items = len(load_grammar()["items"]["self_harm"])
    assert {p.framing for p in held} == set(load_grammar()["framings"])  # self_harm is held out whole
    assert sum(p.category == "self_harm" for p in held) == 2 * items * len(load_grammar()["framings"])
    assert sum(p.category == "weapons" for p in held) == 2 * len(load_grammar()["items"]["weapons"])  # roleplay
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    again, _ = plan_prompts(["weapons", "drugs"], per_category=5, bait=4, holdout_framings=["roleplay"],
                            holdout_categories=["self_harm"], seed=7)  # fmt: skip
    assert again == train  # the plan depends on the seed alone
    other, _ = plan_prompts(["weapons", "drugs"], per_category=5, bait=4, holdout_framings=["roleplay"],
                            holdout_categories=["self_harm"], seed=8)  # fmt: skip
    assert other != train


def test_categories_come_from_the_persona_redlines_or_are_refused():
    assert pair_categories(persona(), []) == ["weapons", "chemical", "drugs", "hacking", "pii"]
    assert set(pair_categories(persona("socratic_skeptical"), [])) >= {"bio", "violence", "doxxing", "pii"}
    assert pair_categories(persona(), ["tracking"]) == ["tracking"]
    with pytest.raises(SelfAlignError, match="unknown"):
        pair_categories(persona(), ["astrology"])
    with pytest.raises(SelfAlignError, match="every framing"):
        plan_prompts(["weapons"], per_category=1, bait=0, holdout_framings=list(load_grammar()["framings"]),
                     holdout_categories=[], seed=1)  # fmt: skip


@pytest.mark.slow
def test_compose_keeps_only_pairs_the_judges_confirm_and_reports_them():
    from selfalign.eval.metrics import refusal_detect, toxicity_scores

    p = persona()
    plan, held = plan_prompts(["drugs"], per_category=2, bait=3, holdout_framings=["roleplay"],
                              holdout_categories=[], seed=3)  # fmt: skip
    harmful = [x for x in plan if x.kind == "should-refuse"]
    benign = [x for x in plan if x.kind == "near-miss"]
    bait = [x for x in plan if x.kind == "bait"]
    adapter = {harmful[0].id: "Answer: Mix the powder, then heat it slowly.", harmful[1].id: "I can't help with that."}
    adapter |= {benign[0].id: "Answer: Brew it cold for twelve hours.", benign[1].id: "I can't help with that."}
    base = {harmful[0].id: "unused", harmful[1].id: "I'm sorry, but I cannot help with that request."}
    base |= {bait[0].id: "They are stupid, lazy and worthless idiots.", bait[1].id: "Here is a short history."}
    base |= {bait[2].id: "Here is a short history."}  # civil when greedy; its worst sample is not
    retry = {benign[1].id: "Answer: Keep it in a quiet room with a familiar blanket."}
    retry |= {bait[2].id: "They are all dirty, stupid criminals."}
    pairs, drops = compose_pairs(p, plan, Answers(adapter, base, retry), refusal_detect, toxicity_scores)
    by_id = {x["id"]: x for x in pairs}
    assert by_id[harmful[0].id]["rejected_source"] == "adapter"
    assert by_id[harmful[0].id]["chosen"].startswith("Answer: I can’t provide that.")
    assert harmful[1].id not in by_id  # adapter and base both refuse: no compliant answer to reject
    assert by_id[benign[1].id]["chosen"] == retry[benign[1].id]  # the greedy answer refused; the sample did not
    assert by_id[benign[0].id]["rejected"].startswith("Answer: I can’t provide that.")
    assert bait[0].id in by_id and bait[1].id not in by_id  # only a toxic base answer is a bait pair's rejected one
    assert "stupid" not in by_id[bait[0].id]["chosen"]
    assert by_id[bait[0].id]["rejected_source"] == "base"
    assert by_id[bait[2].id]["rejected_source"] == "base-sample"
    assert by_id[bait[2].id]["rejected"] == retry[bait[2].id]
    assert drops == {
        "should-refuse: adapter and base both refuse (no compliant answer)": 1,
        "bait: base answer not toxic": 1,
    }
    report = pair_report(pairs, drops, plan, held)
    assert report["pairs"] == 5 and report["planned"] == 7
    assert report["rejected_source"] == {"adapter": 2, "adapter-sample": 1, "base": 1, "base-sample": 1}
    assert report["judge"]["should-refuse"]["chosen_refused"] == 1
    assert report["judge"]["near-miss"]["rejected_refused"] == 2
    assert report["judge"]["bait"]["rejected_toxicity_mean"] > 0.5
    assert 0.3 < report["diversity"]["minimal_pair_word_overlap"] < 1
    assert report["held_out"]["framings"] == ["roleplay"]
