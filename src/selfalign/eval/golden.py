"""The frozen eval sets, pinned in code: every reader goes through `load_golden`, which checks them.

- `golden_v0.jsonl`, the Golden 100: the milestone's gates (style, refusal band, toxicity, neutrality).
- `policy_v0.jsonl`, the policy set: 70 should-refuse prompts over the shipped personas' redline categories,
  70 near-miss prompts that share their words but deserve an answer, 35 bait prompts (insults, stereotypes,
  loaded provocations). It measures whether an adapter learned *when* to refuse; the LoRA recipe is chosen on
  it, never on the Golden 100.

A frozen set is known to this version by its file name, its sha256 and the ids of each category (`FROZEN`): the
`.sha256` file beside it is for `sha256sum -c`, not the authority. Any other file is a custom set, read with
`load_custom_set` only when a user names it (`eval.custom_set`): it never sets a milestone gate or the
`champion` alias.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from selfalign.errors import SelfAlignError
from selfalign.utils.hashing import sha256_file
from selfalign.utils.io import iter_jsonl

CATEGORIES = ("style", "qa", "refusal", "safety", "neutrality")  # the Golden 100's (and a custom set's)
POLICY_CATEGORIES = ("should-refuse", "near-miss", "bait")
CUSTOM_NOTE = "custom set, not the milestone"


@dataclass(frozen=True)
class FrozenSet:
    sha256: str
    ids: dict[str, tuple[str, ...]]  # category -> its row ids, in file order

    @property
    def composition(self) -> Counter:
        return Counter({category: len(ids) for category, ids in self.ids.items()})


def _span(prefix: str, first: int, last: int) -> tuple[str, ...]:
    return tuple(f"{prefix}-{i:04d}" for i in range(first, last + 1))


FROZEN = {
    "golden_v0.jsonl": FrozenSet(
        sha256="5ac560796714a5dc278e12e5633d1ba8c8b3a25b96a624fea8328c3d8a6c24de",
        ids={
            "style": _span("eval", 1, 40),
            "qa": _span("eval", 41, 60),
            "refusal": _span("eval", 61, 80),
            "safety": _span("eval", 81, 90),
            "neutrality": _span("eval", 91, 100),
        },
    ),
    "policy_v0.jsonl": FrozenSet(
        sha256="67f2e4700b968c494922944cadfcbebce0e1dc6f6a355420e6ce870280d2cd88",
        ids={
            "should-refuse": _span("policy", 1, 70),
            "near-miss": _span("policy", 71, 140),
            "bait": _span("policy", 141, 175),
        },
    ),
}
COMPOSITION = FROZEN["golden_v0.jsonl"].composition  # 40/20/20/10/10


def lock_path(path: Path) -> Path:
    """`golden_v0.jsonl.sha256` beside the set, in `sha256sum -c` format (for people; the code pins `FROZEN`)."""
    return path.with_name(path.name + ".sha256")


def verify_lock(path: str | Path) -> str:
    """The sha256 of a frozen set, or SelfAlignError when the file is missing, unknown or not the pinned bytes."""
    path = Path(path)
    if not path.is_file():
        raise SelfAlignError(f"{path}: eval set not found")
    frozen = FROZEN.get(path.name)
    if frozen is None:
        raise SelfAlignError(
            f"{path}: not a frozen set of this version ({', '.join(FROZEN)}); to evaluate on another file, name it "
            f"as a custom set: eval.custom_set={path} ({CUSTOM_NOTE}: no milestone gate, no champion alias)"
        )
    actual = sha256_file(path)
    if actual != frozen.sha256:
        raise SelfAlignError(
            f"{path}: sha256 {actual[:12]}… is not the frozen {path.name} ({frozen.sha256[:12]}…, pinned in "
            "selfalign.eval.golden); the Golden set is frozen: restore it (git checkout) instead of editing it"
        )
    return actual


def _read_rows(path: Path, categories: tuple[str, ...] = CATEGORIES) -> list[dict]:
    rows, seen = [], set()
    try:
        numbered = list(iter_jsonl(path))
    except ValueError as exc:
        raise SelfAlignError(str(exc)) from None
    for lineno, row in numbered:
        if not isinstance(row, dict) or set(row) != {"id", "prompt", "tags"}:
            raise SelfAlignError(f"{path}:{lineno}: a row must have exactly the keys id, prompt, tags")
        if not isinstance(row["id"], str) or not row["id"].strip():
            raise SelfAlignError(f"{path}:{lineno}: id must be a non-empty string (got {row['id']!r})")
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise SelfAlignError(f"{path}:{lineno}: prompt must be a non-empty string (got {row['prompt']!r})")
        if row["id"] in seen:
            raise SelfAlignError(f"{path}:{lineno}: duplicate id {row['id']!r}")
        if not isinstance(row["tags"], list) or not row["tags"] or row["tags"][0] not in categories:
            raise SelfAlignError(f"{path}:{lineno}: first tag must be one of {', '.join(categories)}")
        if not all(isinstance(t, str) for t in row["tags"]):
            raise SelfAlignError(f"{path}:{lineno}: tags must be strings")
        seen.add(row["id"])
        rows.append(row)
    return rows


def check_composition(path: Path, rows: list[dict], frozen: FrozenSet) -> None:
    """Each category's row count and ids, as pinned."""
    counts = Counter(r["tags"][0] for r in rows)
    if counts != frozen.composition:
        raise SelfAlignError(f"{path}: composition {dict(counts)} is not {dict(frozen.composition)}")
    for category, ids in frozen.ids.items():
        if tuple(r["id"] for r in by_category(rows, category)) != ids:
            raise SelfAlignError(f"{path}: the {category} rows are not the pinned ids {ids[0]}…{ids[-1]}")


def load_custom_set(path: str | Path) -> list[dict]:
    """Rows of a user's own eval file (same row format; no lock, no composition): a custom set."""
    path = Path(path)
    if not path.is_file():
        raise SelfAlignError(f"{path}: eval set not found")
    rows = _read_rows(path)
    if not rows:
        raise SelfAlignError(f"{path}: the custom set has no rows")
    return rows


def load_golden(path: str | Path, categories: tuple[str, ...] = CATEGORIES) -> list[dict]:
    """Rows `{"id", "prompt", "tags"}` of a frozen set with these categories (the first tag is the row's
    category), all checks passed. The Golden 100 by default; `load_policy` for the policy set."""
    path = Path(path)
    verify_lock(path)
    frozen = FROZEN[path.name]
    if tuple(frozen.ids) != categories:
        raise SelfAlignError(
            f"{path}: a frozen set with categories {', '.join(frozen.ids)}, not the {', '.join(categories)} "
            "this setting reads (eval.golden is the Golden 100, eval.policy the policy set)"
        )
    rows = _read_rows(path, categories)
    check_composition(path, rows, frozen)
    return rows


def load_policy(path: str | Path) -> list[dict]:
    """The frozen policy set's rows: first tag should-refuse, near-miss or bait, second the redline or bait kind."""
    return load_golden(path, POLICY_CATEGORIES)


def by_category(rows: list[dict], category: str) -> list[dict]:
    return [r for r in rows if r["tags"][0] == category]
