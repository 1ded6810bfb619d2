"""The Golden 100: its composition, and the lock that freezes it."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from selfalign.errors import SelfAlignError
from selfalign.eval.golden import COMPOSITION, by_category, load_golden, lock_path, verify_lock
from selfalign.utils.hashing import sha256_file
from tests.conftest import GOLDEN


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


def test_lock_matches_file():
    assert lock_path(GOLDEN).read_text().split() == [sha256_file(GOLDEN), GOLDEN.name]
    assert verify_lock(GOLDEN) == sha256_file(GOLDEN)


@pytest.fixture
def golden_copy(tmp_path):
    path = tmp_path / GOLDEN.name
    shutil.copy(GOLDEN, path)
    shutil.copy(lock_path(GOLDEN), lock_path(path))
    return path


def test_modified_set_is_refused(golden_copy):
    rows = [json.loads(line) for line in golden_copy.read_text().splitlines()]
    rows[0]["prompt"] += " Please."
    golden_copy.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SelfAlignError, match=r"does not match golden_v0\.jsonl\.sha256.*frozen"):
        load_golden(golden_copy)


def test_missing_lock_is_refused(golden_copy):
    lock_path(golden_copy).unlink()
    with pytest.raises(SelfAlignError, match=r"no lock file golden_v0\.jsonl\.sha256"):
        load_golden(golden_copy)


def test_missing_set_is_refused(tmp_path):
    with pytest.raises(SelfAlignError, match="eval set not found"):
        load_golden(tmp_path / "golden_v9.jsonl")


def test_relocked_malformed_row_names_the_line(golden_copy):
    golden_copy.write_text(GOLDEN.read_text() + '{"id": "eval-0101", "prompt": "x"}\n')
    lock_path(golden_copy).write_text(f"{sha256_file(golden_copy)}  {golden_copy.name}\n")
    with pytest.raises(SelfAlignError, match=r":101: a row must have exactly the keys id, prompt, tags"):
        load_golden(golden_copy)
