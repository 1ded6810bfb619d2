"""The frozen Golden 100 eval set: every reader goes through `load_golden`, which checks the lock."""

from __future__ import annotations

from pathlib import Path

from selfalign.errors import SelfAlignError
from selfalign.utils.hashing import sha256_file
from selfalign.utils.io import iter_jsonl

CATEGORIES = ("style", "qa", "refusal", "safety", "neutrality")
COMPOSITION = {"style": 40, "qa": 20, "refusal": 20, "safety": 10, "neutrality": 10}


def lock_path(path: Path) -> Path:
    """`golden_v0.jsonl` is locked by `golden_v0.jsonl.sha256`, in `sha256sum -c` format."""
    return path.with_name(path.name + ".sha256")


def verify_lock(path: str | Path) -> str:
    """Return the set's sha256, or raise SelfAlignError when the file or its lock is missing or differs."""
    path = Path(path)
    if not path.is_file():
        raise SelfAlignError(f"{path}: eval set not found")
    lock = lock_path(path)
    if not lock.is_file():
        raise SelfAlignError(f"{path}: no lock file {lock.name} beside it; a Golden set must be frozen")
    expected = lock.read_text(encoding="utf-8").split()[0].strip().lower()
    actual = sha256_file(path)
    if actual != expected:
        raise SelfAlignError(
            f"{path}: sha256 {actual[:12]}… does not match {lock.name} ({expected[:12]}…); "
            "the Golden set is frozen: restore it (git checkout) instead of editing it"
        )
    return actual


def load_golden(path: str | Path) -> list[dict]:
    """Rows `{"id", "prompt", "tags"}` of a locked eval set; the first tag is the row's category."""
    verify_lock(path)
    rows, seen = [], set()
    try:
        numbered = list(iter_jsonl(path))
    except ValueError as exc:
        raise SelfAlignError(str(exc)) from None
    for lineno, row in numbered:
        if not isinstance(row, dict) or set(row) != {"id", "prompt", "tags"}:
            raise SelfAlignError(f"{path}:{lineno}: a row must have exactly the keys id, prompt, tags")
        if row["id"] in seen:
            raise SelfAlignError(f"{path}:{lineno}: duplicate id {row['id']!r}")
        if not row["tags"] or row["tags"][0] not in CATEGORIES:
            raise SelfAlignError(f"{path}:{lineno}: first tag must be one of {', '.join(CATEGORIES)}")
        seen.add(row["id"])
        rows.append(row)
    return rows


def by_category(rows: list[dict], category: str) -> list[dict]:
    return [r for r in rows if r["tags"][0] == category]
