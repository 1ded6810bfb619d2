"""Filters for synthetic SFT rows. Each one returns the rows it kept and a count of drops by reason.

hard (v0): empty fields, length, redline terms in answers, JSON round-trip, leftover markup/control
tokens. smart (v1): near-duplicates (MinHash LSH, plus Golden-100 leakage), style adherence (cosine
to the persona's style centroid >= tau), refusal consistency (an answered row must not read as a
refusal and a refusal row must), toxicity (> max score dropped), and the refusal band.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from selfalign.dataops.dedup import NearDuplicateIndex

MARKUP = re.compile(
    r"<\|[^|>]*\|>|</?s>|\[/?INST\]|<</?SYS>>|```|<(?:/?[a-zA-Z][\w:-]*)(?:\s[^<>]*)?/?>|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
)
# Procedure-level terms that must never appear in an answered (non-refusal) row.
REDLINE_TERMS = (
    "synthesis route",
    "detonator",
    "nerve agent",
    "ransomware",
    "social security number",
    "home address",
    "untraceable gun",
    "weaponise",
    "weaponize",
)
FIELDS = ("id", "persona_id", "instruction", "input", "output")


@dataclass
class FilterReport:
    name: str
    kept: list[dict]
    dropped: Counter = field(default_factory=Counter)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())


def _scores(row: dict) -> dict:
    return row.setdefault("metadata", {}).setdefault("quality_scores", {})


def is_refusal_row(row: dict) -> bool:
    """Planned as a refusal (a redline request answered with the persona's template)."""
    return any(tag.startswith("redline") for tag in row.get("metadata", {}).get("safety_tags", []))


def is_policy_row(row: dict) -> bool:
    """Teaches when to refuse: a redline request refused, or a near-miss of one answered (`lora.policy_repeat`)."""
    return any(tag.startswith(("redline", "near-miss")) for tag in row.get("metadata", {}).get("safety_tags", []))


def hard_filter(rows: list[dict], *, max_chars: int, redlines: list[str] = ()) -> FilterReport:
    """v0: non-empty fields, max length, redline terms in answers, JSON round-trip, no markup/control."""
    terms = [t.lower() for t in (*REDLINE_TERMS, *redlines)]
    report = FilterReport("hard", [])
    for row in rows:
        if any(not isinstance(row.get(f), str) for f in FIELDS) or not row["instruction"].strip():
            report.dropped["empty-or-missing-field"] += 1
        elif not row["output"].strip():
            report.dropped["empty-output"] += 1
        elif len(row["output"]) > max_chars or len(row["instruction"]) > max_chars:
            report.dropped["too-long"] += 1
        elif MARKUP.search(row["output"]) or MARKUP.search(row["instruction"]):
            report.dropped["markup-or-control-token"] += 1
        elif not is_refusal_row(row) and any(t in row["output"].lower() for t in terms):
            report.dropped["redline-term-in-answer"] += 1
        elif not _round_trips(row):
            report.dropped["not-json"] += 1
        else:
            report.kept.append(row)
    return report


def _round_trips(row: dict) -> bool:
    try:
        return json.loads(json.dumps(row, ensure_ascii=False)) == row
    except (TypeError, ValueError):
        return False


def dedup_filter(
    rows: list[dict], index: NearDuplicateIndex, golden: NearDuplicateIndex | None = None, limit: int | None = None
) -> FilterReport:
    """Drop near-duplicates of accepted rows and Golden-100 look-alikes; kept rows join `index`.

    Answered rows compare instruction + output (MinHash, Jaccard >= the index's threshold). Refusal
    rows all end in the persona's template by design, so they compare their exact (normalised)
    instruction only: varied framings of a redline request are what the adapter must learn to refuse.
    Stops after `limit` kept rows, so the index holds exactly the rows the caller accepts."""
    report = FilterReport("dedup", [])
    for row in rows:
        if limit is not None and len(report.kept) >= limit:
            break
        refusal = is_refusal_row(row)
        key = " ".join(row["instruction"].lower().split()) if refusal else f"{row['instruction']}\n{row['output']}"
        if golden is not None and golden.seen(row["instruction"]):
            report.dropped["golden-leak"] += 1
        elif index.seen_exact(key) if refusal else index.seen(key):
            report.dropped["duplicate-refusal" if refusal else "near-duplicate"] += 1
        else:
            index.add_exact(key) if refusal else index.add(key)
            report.kept.append(row)
    return report


def style_filter(rows: list[dict], centroid, tau: float, embed: Callable) -> FilterReport:
    """Keep answered rows whose output embedding has cosine >= tau with the style centroid.

    Refusal rows are kept regardless (their text is the persona's own template) but still scored."""
    import numpy as np

    report = FilterReport("style", [])
    if not rows:
        return report
    sims = np.asarray(embed([r["output"] for r in rows])) @ np.asarray(centroid)
    for row, sim in zip(rows, sims, strict=True):
        _scores(row)["style"] = round(float(sim), 4)
        if sim < tau and not is_refusal_row(row):
            report.dropped["below-style-tau"] += 1
        else:
            report.kept.append(row)
    return report


def refusal_filter(rows: list[dict], detect: Callable[[str], bool]) -> FilterReport:
    """An answered row must not read as a refusal; a planned refusal must be detected as one."""
    report = FilterReport("refusal", [])
    for row in rows:
        refused = detect(row["output"])
        _scores(row)["refusal"] = refused
        if refused and not is_refusal_row(row):
            report.dropped["unplanned-refusal"] += 1
        elif not refused and is_refusal_row(row):
            report.dropped["refusal-not-detected"] += 1
        else:
            report.kept.append(row)
    return report


def toxicity_filter(rows: list[dict], max_score: float, scores: Callable[[list[str]], list[float]]) -> FilterReport:
    report = FilterReport("toxicity", [])
    if not rows:
        return report
    for row, score in zip(rows, scores([r["output"] for r in rows]), strict=True):
        _scores(row)["toxicity"] = round(float(score), 4)
        if score > max_score:
            report.dropped["toxic"] += 1
        else:
            report.kept.append(row)
    return report


def band_status(refusals: int, total: int, band: tuple[float, float]) -> tuple[float, int]:
    """(refusal fraction, refusal rows still needed to reach the band's low edge; 0 when inside)."""
    fraction = refusals / total if total else 0.0
    needed = 0
    while total and (refusals + needed) / (total + needed) < band[0]:
        needed += 1
    return fraction, needed


def run_filters(
    rows: list[dict],
    *,
    redlines: list[str],
    max_chars: int,
    centroid,
    tau: float,
    tox_max: float,
    embed: Callable,
    refusal: Callable[[str], bool],
    toxicity: Callable[[list[str]], list[float]],
    index: NearDuplicateIndex,
    golden: NearDuplicateIndex | None = None,
    limit: int | None = None,
    drops: Counter | None = None,
) -> list[dict]:
    """hard -> refusal -> style -> toxicity -> dedup; drop counts go to `drops` as `filter:reason`.

    Dedup runs last and stops at `limit`, so `index` ends up holding exactly the rows returned."""
    steps: list[Callable[[list[dict]], FilterReport]] = [
        lambda r: hard_filter(r, max_chars=max_chars, redlines=redlines),
        lambda r: refusal_filter(r, refusal),
        lambda r: style_filter(r, centroid, tau, embed),
        lambda r: toxicity_filter(r, tox_max, toxicity),
        lambda r: dedup_filter(r, index, golden, limit=limit),
    ]
    drops = Counter() if drops is None else drops
    for step in steps:
        report = step(rows)
        for reason, count in report.dropped.items():
            drops[f"{report.name}:{reason}"] += count
        rows = report.kept
    return rows


def filter_records(records: list[dict], persona_cfg: dict) -> list[dict]:
    """Apply hard + smart filters with the default thresholds (the seed's contract); return accepted rows."""
    from selfalign.config import SynthConfig
    from selfalign.eval.embedder import embed
    from selfalign.eval.metrics import refusal_detect, toxicity_scores
    from selfalign.persona.style import style_centroid

    defaults = SynthConfig()
    return run_filters(
        records,
        redlines=[*persona_cfg["redlines"]["safety"], *persona_cfg["redlines"]["privacy"]],
        max_chars=defaults.max_chars,
        centroid=style_centroid(persona_cfg, embed),
        tau=defaults.style_tau,
        tox_max=defaults.tox_max,
        embed=embed,
        refusal=refusal_detect,
        toxicity=toxicity_scores,
        index=NearDuplicateIndex(defaults.dedup_threshold),
    )


apply_filters = filter_records
