"""Teacher-written instructions (seed §6.2): the persona-aware instruction generator, repair of its JSONL, dedup and
leakage checks, and a classifier that holds the domain and difficulty mix.

With `synth.instructions=teacher` (or `mixed`, every other slot), a chunk's answered slots keep their planned
(domain, difficulty) from the bank schedule, and the teacher is asked, per open (domain, difficulty), for new
instructions under the seed's instruction-generator prompt. Every line it writes is parsed (fenced blocks, list
markers, trailing commas and text around one JSON object are repaired; anything else is dropped and counted),
checked (length, near-duplicates of the run's earlier instructions, Golden-100 and policy-set look-alikes), then
*classified* (nearest domain and difficulty centroid of the bank's own instructions, MiniLM), and it fills an open
slot of the class it was classified into, whatever it was asked for. Up to `ROUNDS` rounds ask again for what is
still open; a slot still open after that keeps the bank's instruction (counted as `bank-fallback`). Policy rows
(redline refusals and their near-misses) always come from the bank: they are planned per redline category.

Everything a chunk asks is seeded from the chunk, and the instructions used so far are kept in the run's state, so
a killed run resumes with the same dedup index and ends byte-identical.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from functools import cache

import numpy as np

from selfalign.dataops.bank import load_bank
from selfalign.dataops.dedup import NearDuplicateIndex
from selfalign.dataops.teacher import Ask, Sampling

ROUNDS = 3  # teacher rounds per chunk before an open slot keeps the bank's instruction
PER_ASK = (3, 8)  # instructions asked for per (domain, difficulty): twice what is open, within these bounds
TOKENS_PER_INSTRUCTION = 60
WORDS = (4, 80)  # an instruction outside these word counts is dropped
DOMAIN_BRIEF = {
    "general": "general knowledge",
    "reasoning": "reasoning and decisions (weighing options, evidence, trade-offs)",
    "social": "social situations and communication",
    "safety_edge": "safety-adjacent but benign questions (health, home safety, security hygiene)",
    "code": "light coding",
}
DIFFICULTY_BRIEF = {
    "easy": "easy (one fact, definition or short explanation)",
    "medium": "medium (an explanation, comparison or how-to)",
    "hard": "hard (trade-offs, several steps, or open questions)",
}
_MARKER = re.compile(r"^\s*(?:\d{1,3}[.)]|[-*•])\s*")


def instruction_system(persona: dict, n: int) -> str:
    """The seed's instruction-generator prompt (§6.2), filled from the persona."""
    return (
        "You design tasks matching a target persona and value profile.\n"
        f"Persona: {persona['description']}\n"
        f"Value weights: {json.dumps(persona['values'])}\n"
        f"Constraints: produce {n} diverse instructions across domains (general knowledge, reasoning, social, "
        "light coding).\n"
        "Avoid benchmark boilerplate. Output JSONL lines with keys: instruction, input(optional), target_style_tags."
    )


def instruction_ask(persona: dict, domain: str, difficulty: str, n: int) -> Ask:
    user = (
        f"Write {n} new, different instructions a user might send. Domain: {DOMAIN_BRIEF[domain]}. "
        f"Difficulty: {DIFFICULTY_BRIEF[difficulty]}. One JSON object per line and nothing else, for example:\n"
        '{"instruction": "...", "input": "", "target_style_tags": ["..."]}'
    )
    system = {"role": "system", "content": instruction_system(persona, n)}
    return Ask([system, {"role": "user", "content": user}], TOKENS_PER_INSTRUCTION * n)


def _load(line: str) -> tuple[dict | None, bool]:
    """A JSON object from one line, and whether it needed repair (list marker, trailing comma, text around it)."""
    try:
        obj = json.loads(line)
        return (obj, False) if isinstance(obj, dict) else (None, False)
    except ValueError:
        pass
    text = _MARKER.sub("", line).rstrip().rstrip(",")
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None, False
    try:
        obj = json.loads(text[start : end + 1])
    except ValueError:
        return None, False
    return (obj, True) if isinstance(obj, dict) else (None, False)


def parse_instructions(reply: str | None, stats: Counter, refusal: Callable[[str], bool]) -> list[dict]:
    """The teacher's reply as `{instruction, input, target_style_tags}` items; what cannot be used is counted in
    `stats` by reason, and lines kept after repair under `repaired`."""
    if reply is None:
        stats["no-reply"] += 1
        return []
    if "{" not in reply:
        stats["refused-ask" if refusal(reply) else "no-json"] += 1
        return []
    items = []
    for line in reply.splitlines():
        line = line.strip()
        if not line or line.startswith("```"):
            continue
        obj, repaired = _load(line)
        if obj is None:
            stats["malformed-line"] += 1
            continue
        instruction = obj.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            stats["no-instruction"] += 1
            continue
        words = len(instruction.split())
        if not WORDS[0] <= words <= WORDS[1]:
            stats["length"] += 1
            continue
        given = obj.get("input", "")
        tags = obj.get("target_style_tags", [])
        repaired = repaired or not isinstance(given, str) or not isinstance(tags, list)
        if repaired:
            stats["repaired"] += 1
        items.append(
            {
                "instruction": " ".join(instruction.split()),
                "input": given.strip() if isinstance(given, str) else "",
                "target_style_tags": [str(t) for t in tags] if isinstance(tags, list) else [],
            }
        )
    return items


class MixClassifier:
    """Domain and difficulty of an instruction: the nearest class centroid (cosine, MiniLM) of the bank's own
    instructions, every template with a few of its domain's topics."""

    def __init__(self, bank: dict, embed: Callable[[list[str]], np.ndarray], topics_per_template: int = 4):
        texts, domains, levels = [], [], []
        for domain, spec in bank["domains"].items():
            for level, templates in spec["templates"].items():
                for template in templates:
                    for topic in spec["topics"][:topics_per_template]:
                        texts.append(template.format(topic=topic))
                        domains.append(domain)
                        levels.append(level)
        vectors = np.asarray(embed(texts), dtype=np.float32)
        self.embed = embed
        self.domains, self.domain_centroids = _centroids(vectors, domains)
        self.levels, self.level_centroids = _centroids(vectors, levels)

    def __call__(self, texts: list[str]) -> list[tuple[str, str]]:
        if not texts:
            return []
        vectors = np.asarray(self.embed(texts), dtype=np.float32)
        d = (vectors @ self.domain_centroids.T).argmax(1)
        lv = (vectors @ self.level_centroids.T).argmax(1)
        return [(self.domains[i], self.levels[j]) for i, j in zip(d, lv, strict=True)]


def _centroids(vectors: np.ndarray, labels: list[str]) -> tuple[list[str], np.ndarray]:
    names = sorted(set(labels))
    rows = np.stack([vectors[[lab == n for lab in labels]].mean(0) for n in names])
    return names, rows / np.linalg.norm(rows, axis=1, keepdims=True)


@cache
def _classifier(embed: Callable) -> MixClassifier:
    return MixClassifier(load_bank(), embed)


def teacher_tasks(
    persona: dict,
    teacher,
    tasks: list,
    sampling: Sampling,
    *,
    mixed: bool,
    seen: NearDuplicateIndex,
    golden: NearDuplicateIndex,
    embed: Callable,
    refusal: Callable[[str], bool],
    stats: Counter,
) -> tuple[list, list[str]]:
    """`tasks` with the teacher's instructions in their answered slots (every other one when `mixed`), and every
    instruction added to `seen` (the run's state keeps them, to rebuild `seen` on resume). Policy rows and slots
    the teacher could not fill keep the bank's instruction. Counts by outcome go to `stats`."""
    answered = [i for i, t in enumerate(tasks) if not (t.redline or t.near_miss)]
    slots = answered[::2] if mixed else answered
    open_slots = {i: (tasks[i].domain, tasks[i].difficulty) for i in slots}
    classify = _classifier(embed)
    added: list[str] = []
    tasks = list(tasks)
    for round_ in range(ROUNDS):
        wanted = Counter(open_slots.values())
        if not wanted:
            break
        keys = sorted(wanted)
        asks = [
            instruction_ask(persona, d, lv, min(PER_ASK[1], max(PER_ASK[0], 2 * wanted[(d, lv)]))) for d, lv in keys
        ]
        replies = teacher.complete(asks, replace(sampling, seed=sampling.seed * 10 + 1 + round_))
        items = []
        for reply in replies:
            for item in parse_instructions(reply, stats, refusal):
                if golden.seen(item["instruction"]):
                    stats["golden-leak"] += 1
                elif seen.seen(item["instruction"]):
                    stats["duplicate"] += 1
                else:
                    seen.add(item["instruction"])  # also keeps a later line of this reply from repeating it
                    added.append(item["instruction"])
                    items.append(item)
        for item, key in zip(items, classify([it["instruction"] for it in items]), strict=True):
            slot = next((i for i, k in open_slots.items() if k == key), None)
            if slot is None:
                stats["over-quota"] += 1  # classified into a class with no open slot
                continue
            del open_slots[slot]
            stats["placed"] += 1
            tasks[slot] = replace(
                tasks[slot], instruction=item["instruction"], input=item["input"], instruction_source="teacher"
            )
    stats["bank-fallback"] += len(open_slots)
    return tasks, added
