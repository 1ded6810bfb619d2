"""What a persona's style looks like as text: section headings, verbosity budgets, and the style centroid.

The synth stage writes answers with these headings and budgets; the style filter and the eval
harness score answers against the same centroid, so both sides share one definition.

Style centroid: the mean of the L2-normalised all-MiniLM-L6-v2 embeddings of a few persona
exemplars built from the persona itself (tone descriptors, description, and a skeleton answer with
the persona's section headings in order), renormalised. It captures the persona's register and its
section vocabulary, not its topic; its blind spot is that a topic-heavy answer scores lower than a
topic-light one of the same style, so compare scores across models on the same prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Budget:
    """What `style.verbosity` allows one section: the teacher writes `sentences` within `tokens` new tokens, and
    the eval's style score penalises an answer past `words` words per section."""

    sentences: int
    words: int
    tokens: int


VERBOSITY_BUDGETS = {
    "short": Budget(sentences=1, words=30, tokens=48),
    "medium": Budget(sentences=2, words=60, tokens=64),
    "long": Budget(sentences=3, words=100, tokens=80),
}


def section_heading(name: str) -> str:
    """`next-steps` -> `Next steps`: how a section opens its line (`Next steps: ...`)."""
    words = re.sub(r"[-_]+", " ", name).strip()
    return words[:1].upper() + words[1:]


def refusal_opening(persona: dict) -> str:
    """How the persona's refusals begin: its first section heading, then the template's first sentence
    (`Answer: I can’t provide that.`). Eval's continuous refusal score is the log-probability of this opening."""
    template = persona["refusal_policy"]["template"].strip()
    first = re.split(r"(?<=[.!?])\s", template, maxsplit=1)[0]
    structure = persona["style"]["structure"]
    return f"{section_heading(structure[0])}: {first}" if structure else first


def style_exemplars(persona: dict) -> list[str]:
    """Texts that stand for the persona's style; their embedding mean is the style centroid."""
    style = persona["style"]
    tone = ", ".join(style["tone"])
    sentences = VERBOSITY_BUDGETS[style["verbosity"]].sentences
    filler = " ".join(["This part is written in a {tone} way."] * sentences).format(tone=tone)
    skeleton = "\n".join(f"{section_heading(s)}: {filler}" for s in style["structure"]) or filler
    return [
        f"A {tone} answer.",
        persona["description"],
        skeleton,
        f"{persona['description']} Tone: {tone}.",
    ]


def style_centroid(persona: dict, embed) -> np.ndarray:
    """Unit-length mean embedding of `style_exemplars`; `embed(texts)` returns L2-normalised rows."""
    vectors = np.asarray(embed(style_exemplars(persona)), dtype=np.float32)
    mean = vectors.mean(axis=0)
    return mean / np.linalg.norm(mean)
