"""Preference pairs from the persona's own redlines, as minimal pairs (`pairs.yaml` beside this module).

For each of the persona's redline categories, request frames are filled with a harmful and a benign element, so a
should-refuse request and its near-miss share their framing, length and most of their words. Each is wrapped in a
framing (direct, fiction, claimed authority, role-play, ...). A planned minimal pair gives two preference pairs:
- should-refuse: chosen = the persona's refusal with a safer alternative; rejected = a compliant answer (the SFT
  adapter's own when it complies, else the base model's);
- near-miss: chosen = a helpful answer in the persona's style (the SFT adapter's own, greedy, else one sample);
  rejected = the persona's refusal.
Bait requests add pairs whose chosen answer is calm and repeats no stereotype, and whose rejected answer is the base
model's own (greedy, or the most toxic of a few samples where the greedy answer is civil), kept only where the
toxicity judge finds it toxic.

Every pair is checked by the judges (chosen judged as intended, rejected as its opposite); a pair that fails is
dropped and counted. Whole framings or categories can be held out: their prompts are planned, never trained on, and
score the adapter's discrimination on what it has not seen.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import yaml

from selfalign.dataops.synth import redline_categories, refusal_text
from selfalign.errors import SelfAlignError
from selfalign.persona.style import section_heading
from selfalign.utils.hashing import sha256_file

KINDS = ("should-refuse", "near-miss", "bait")
TOX_MAX = 0.5  # the toxicity judge's probability above which an answer counts as toxic in a pair's checks


GRAMMAR = Path(__file__).with_name("pairs.yaml")


@cache
def load_grammar() -> dict:
    return yaml.safe_load(GRAMMAR.read_text(encoding="utf-8"))


def grammar_sha256() -> str:
    return sha256_file(GRAMMAR)


@dataclass(frozen=True)
class PairPrompt:
    id: str
    kind: str  # should-refuse | near-miss | bait
    category: str  # redline category (bait: "bait")
    framing: str
    prompt: str
    item: int  # index of the minimal-pair frame (bait: of the template)


def frame(framing: str, request: str) -> str:
    template = load_grammar()["framings"][framing]
    return template.format(request=request, request_lc=request[0].lower() + request[1:])


def minimal_pair(category: str, item: int, framing: str) -> tuple[PairPrompt, PairPrompt]:
    """The should-refuse request and its near-miss: one frame, one framing, the harmful or the benign element."""
    spec = load_grammar()["items"][category][item]
    out = []
    for kind, filler in (("should-refuse", spec["h"]), ("near-miss", spec["b"])):
        prompt = frame(framing, spec["t"].format(x=filler))
        out.append(PairPrompt(f"{category}-{item}-{framing}-{kind}", kind, category, framing, prompt, item))
    return out[0], out[1]


def pair_categories(persona: dict, requested: list[str]) -> list[str]:
    """`requested` when given, else the grammar categories that the persona's redlines name."""
    known = list(load_grammar()["items"])
    unknown = sorted(set(requested) - set(known))
    if unknown:
        raise SelfAlignError(f"prefer.categories: unknown {unknown}; choose from {known}")
    chosen = requested or [c for c in redline_categories(persona) if c in known]
    if not chosen:
        raise SelfAlignError(
            f"persona {persona['id']!r}: no redline names a pair category ({', '.join(known)}); "
            "set prefer.categories explicitly"
        )
    return chosen


def plan_prompts(
    categories: list[str],
    *,
    per_category: int,
    bait: int,
    holdout_framings: list[str],
    holdout_categories: list[str],
    seed: int,
) -> tuple[list[PairPrompt], list[PairPrompt]]:
    """(training prompts, held-out prompts). Training: `per_category` minimal pairs per category, drawn by seed from
    the frames x the framings not held out, plus `bait` bait requests. Held out: every minimal pair of a held-out
    framing or category (never trained on)."""
    grammar = load_grammar()
    framings = list(grammar["framings"])
    unknown = sorted(set(holdout_framings) - set(framings))
    if unknown:
        raise SelfAlignError(f"prefer.holdout_framings: unknown {unknown}; choose from {framings}")
    train_framings = [f for f in framings if f not in holdout_framings]
    if not train_framings:
        raise SelfAlignError("prefer.holdout_framings holds out every framing: nothing is left to train on")
    train, held = [], []
    for category in categories + [c for c in holdout_categories if c not in categories]:
        combos = [(i, f) for i in range(len(grammar["items"][category])) for f in framings]
        rng = random.Random(f"{seed}:pairs:{category}")
        rng.shuffle(combos)
        taken = 0
        for item, framing in combos:
            pair = minimal_pair(category, item, framing)
            if category in holdout_categories or framing in holdout_framings:
                held.extend(pair)
            elif taken < per_category:
                train.extend(pair)
                taken += 1
    b = grammar["bait"]
    combos = [(t, g, tr) for t in range(len(b["templates"])) for g in b["groups"] for tr in b["traits"]]
    rng = random.Random(f"{seed}:pairs:bait")
    rng.shuffle(combos)
    seen: set[str] = set()
    for t, group, trait in combos:
        prompt = b["templates"][t].format(group=group, trait=trait)
        if prompt in seen or len(seen) >= bait:
            continue
        seen.add(prompt)
        framing = train_framings[len(seen) % len(train_framings)]
        wrapped = frame(framing, prompt)
        train.append(PairPrompt(f"bait-{len(seen) - 1}-{framing}", "bait", group, framing, wrapped, t))
    return train, held


def bait_answer(persona: dict, group: str) -> str:
    structure = persona["style"]["structure"]
    heading = f"{section_heading(structure[0])}: " if structure else ""
    return heading + load_grammar()["bait"]["answer"].format(group=group)


@dataclass
class Answers:
    """Greedy answers per prompt id from the SFT adapter and the base, and sampled retries: the adapter's for a
    near-miss it refused, the base's most toxic sample for bait it answered civilly."""

    adapter: dict[str, str]
    base: dict[str, str]
    retry: dict[str, str]


def compose_pairs(
    persona: dict, plan: list[PairPrompt], answers: Answers, refused, toxicity, tox_max: float = TOX_MAX
) -> tuple[list[dict], Counter]:
    """Preference pairs from the planned prompts and their answers, each checked by the judges (`refused(text)`,
    `toxicity(texts)`); returns the pairs and the count of drops by reason."""
    drops: Counter = Counter()
    candidates = []
    for p in plan:
        if p.kind == "should-refuse":
            chosen = refusal_text(persona, p.category)
            own, base = answers.adapter[p.id], answers.base[p.id]
            rejected, source = (own, "adapter") if not refused(own) else (base, "base")
        elif p.kind == "near-miss":
            own, retry = answers.adapter[p.id], answers.retry.get(p.id, "")
            chosen, source = (own, "adapter") if not refused(own) else (retry, "adapter-sample")
            rejected = refusal_text(persona, p.category)
        else:
            chosen = bait_answer(persona, p.category)
            rejected, source = (
                (answers.retry[p.id], "base-sample") if p.id in answers.retry else (answers.base[p.id], "base")
            )
        candidates.append((p, chosen, rejected, source))
    tox = toxicity([c for _, c, _, _ in candidates] + [r for _, _, r, _ in candidates])
    n = len(candidates)
    pairs = []
    for i, (p, chosen, rejected, source) in enumerate(candidates):
        judge = {
            "chosen_refused": refused(chosen),
            "rejected_refused": refused(rejected),
            "chosen_toxicity": round(tox[i], 4),
            "rejected_toxicity": round(tox[n + i], 4),
        }
        reason = _failed_check(p.kind, chosen, rejected, judge, tox_max)
        if reason:
            drops[f"{p.kind}: {reason}"] += 1
            continue
        pairs.append({**asdict(p), "chosen": chosen, "rejected": rejected, "rejected_source": source, "judge": judge})
    return pairs, drops


def _failed_check(kind: str, chosen: str, rejected: str, judge: dict, tox_max: float) -> str | None:
    """Why a pair fails the judges, or None: the chosen answer judged as intended, the rejected as its opposite."""
    if not chosen.strip() or not rejected.strip():
        return "empty answer"
    if chosen.strip() == rejected.strip():
        return "chosen equals rejected"
    if kind == "should-refuse":
        if not judge["chosen_refused"]:
            return "refusal template not judged a refusal"
        if judge["rejected_refused"]:
            return "adapter and base both refuse (no compliant answer)"
    elif kind == "near-miss":
        if judge["chosen_refused"]:
            return "adapter refuses the near-miss (no helpful answer)"
        if judge["chosen_toxicity"] > tox_max:
            return "helpful answer judged toxic"
        if not judge["rejected_refused"]:
            return "refusal template not judged a refusal"
    else:
        if judge["chosen_toxicity"] > tox_max:
            return "calm answer judged toxic"
        if judge["rejected_toxicity"] <= tox_max:
            return "base answer not toxic"
    return None


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def minimal_pair_overlap(a: str, b: str, n: int = 1) -> float:
    """Jaccard overlap of the word n-grams of two prompts."""
    x, y = _ngrams(_words(a), n), _ngrams(_words(b), n)
    return len(x & y) / len(x | y) if x | y else 1.0


def pair_report(pairs: list[dict], drops: Counter, plan: list[PairPrompt], held: list[PairPrompt]) -> dict:
    """Counts per category and kind, judge scores, and the set's diversity (framings per category, and the word
    overlap between the two sides of each minimal pair)."""
    counts: dict[str, Counter] = {}
    for p in pairs:
        counts.setdefault(p["category"] if p["kind"] != "bait" else "bait", Counter())[p["kind"]] += 1
    framings = {}
    for p in plan:
        if p.kind != "bait":
            framings.setdefault(p.category, set()).add(p.framing)
    by_id = {p.id: p for p in plan}
    overlaps = {1: [], 2: []}
    for p in plan:
        if p.kind == "should-refuse":
            partner = by_id.get(p.id.replace("-should-refuse", "-near-miss"))
            if partner:
                for n in overlaps:
                    overlaps[n].append(minimal_pair_overlap(p.prompt, partner.prompt, n))

    def mean(values: list[float]) -> float:
        return round(sum(values) / len(values), 4) if values else 0.0

    judge = {
        kind: {
            "n": sum(p["kind"] == kind for p in pairs),
            "chosen_toxicity_mean": mean([p["judge"]["chosen_toxicity"] for p in pairs if p["kind"] == kind]),
            "rejected_toxicity_mean": mean([p["judge"]["rejected_toxicity"] for p in pairs if p["kind"] == kind]),
            "chosen_refused": sum(p["judge"]["chosen_refused"] for p in pairs if p["kind"] == kind),
            "rejected_refused": sum(p["judge"]["rejected_refused"] for p in pairs if p["kind"] == kind),
        }
        for kind in KINDS
    }
    return {
        "pairs": len(pairs),
        "planned": len(plan),
        "dropped": dict(sorted(drops.items())),
        "by_category": {c: dict(sorted(v.items())) for c, v in sorted(counts.items())},
        "rejected_source": dict(sorted(Counter(p["rejected_source"] for p in pairs).items())),
        "judge": judge,
        "diversity": {
            "framings_per_category": {c: len(f) for c, f in sorted(framings.items())},
            "frames_per_category": {
                c: len({p.item for p in plan if p.category == c and p.kind != "bait"}) for c in sorted(framings)
            },
            "minimal_pair_word_overlap": mean(overlaps[1]),
            "minimal_pair_bigram_overlap": mean(overlaps[2]),
        },
        "held_out": {
            "prompts": len(held),
            "framings": sorted({p.framing for p in held}),
            "categories": sorted({p.category for p in held}),
        },
    }
