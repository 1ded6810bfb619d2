"""SFT data: row checks with line numbers, label masking on a real rendered example, split, resumable order."""

from __future__ import annotations

import json

import pytest

from selfalign.errors import SelfAlignError
from selfalign.runtime.loader import load_base
from selfalign.train.data import IGNORE, ResumableSampler, SFTDataModule, load_sft_rows, pad_batch, tokenize_row
from tests.train.helpers import sft_rows, write_sft


@pytest.fixture(scope="module")
def tokenizer():
    """The bundled SmolLM2 tokenizer and ChatML template (the tiny model shares them)."""
    return load_base("tiny_llama", "cpu").tokenizer


def test_labels_cover_only_the_assistant_turn(tokenizer):
    row = {"instruction": "Name a prime.", "input": "Below ten.", "output": "## Answer\nSeven."}
    out = tokenize_row(tokenizer, row, max_len=1024)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels) and not out["truncated"]
    first = next(i for i, t in enumerate(labels) if t != IGNORE)
    prompt = tokenizer.decode(ids[:first])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "Name a prime.\n\nBelow ten.<|im_end|>" in prompt  # instruction, blank line, input
    assert all(t == IGNORE for t in labels[:first])
    assert labels[first:] == ids[first:]  # every assistant token is learned, none masked
    assert tokenizer.decode(ids[first:]) == "## Answer\nSeven.<|im_end|>\n"
    assert tokenizer.eos_token_id in labels[first:]  # the closing <|im_end|> (= pad) is learned


def test_padding_is_masked_but_eos_inside_a_row_is_not(tokenizer):
    rows = [tokenize_row(tokenizer, r, 1024) for r in sft_rows(2)]
    rows[1]["input_ids"] = rows[1]["input_ids"][:-5]
    rows[1]["labels"] = rows[1]["labels"][:-5]
    batch = pad_batch(rows, tokenizer.pad_token_id)
    n = len(rows[1]["input_ids"])
    assert batch["attention_mask"][1, n:].sum() == 0 and batch["attention_mask"][1, :n].all()
    assert (batch["labels"][1, n:] == IGNORE).all()
    assert (batch["labels"][0] == tokenizer.eos_token_id).sum() == 1  # pad == eos, yet the real one is kept


def test_long_rows_are_truncated_and_counted_prompt_only_rows_dropped(tokenizer):
    rows = sft_rows(20)
    rows[0]["output"] = "word " * 400
    rows[1]["instruction"] = "question " * 400
    dm = SFTDataModule(rows, tokenizer, max_seq_len=96, micro_batch_size=4, val_fraction=0.1, seed=1)
    dm.setup()
    assert dm.stats.rows == 20 and dm.stats.truncated == 1 and dm.stats.dropped == 1
    assert len(dm.train_set) + len(dm.val_set) == 19
    assert max(len(x) for x in dm.train_set["input_ids"]) <= 96


def test_split_is_ninety_ten_and_fixed_by_seed(tokenizer):
    rows = sft_rows(50)

    def split(seed):
        dm = SFTDataModule(rows, tokenizer, max_seq_len=256, micro_batch_size=4, val_fraction=0.1, seed=seed)
        dm.setup()
        return [tokenizer.decode(x) for x in dm.val_set["input_ids"]], len(dm.train_set)

    (val_a, n_train), (val_b, _), (val_c, _) = split(7), split(7), split(8)
    assert len(val_a) == 5 and n_train == 45
    assert val_a == val_b and val_a != val_c


def test_policy_rows_repeat_in_the_training_split_only(tokenizer):
    rows = sft_rows(50)
    for i, tag in [
        (3, "redline:pii"),
        (8, "near-miss:pii"),
        (21, "redline:abuse"),
        (30, "benign"),
        (44, "near-miss:bio"),
    ]:
        rows[i]["metadata"]["safety_tags"] = [tag]
        rows[i]["instruction"] += f" [{tag}]"

    def setup(repeat):
        dm = SFTDataModule(
            rows, tokenizer, max_seq_len=256, micro_batch_size=4, val_fraction=0.1, seed=7, policy_repeat=repeat
        )
        dm.setup()
        texts = [tokenizer.decode(x) for x in dm.train_set["input_ids"]]
        return texts, [tokenizer.decode(x) for x in dm.val_set["input_ids"]]

    (once, val_once), (thrice, val_thrice) = setup(1), setup(3)
    assert val_once == val_thrice  # the same validation rows, never repeated
    policy = [t for t in once if "[redline:" in t or "[near-miss:" in t]
    in_val = sum("[redline:" in t or "[near-miss:" in t for t in val_once)
    assert len(policy) == 4 - in_val and len(policy) >= 3
    assert thrice[: len(once)] == once and len(thrice) == len(once) + 2 * len(policy)
    assert sorted(thrice[len(once) :]) == sorted(policy * 2)  # each policy row twice more; benign rows once
    assert sum("[benign]" in t for t in thrice) == sum("[benign]" in t for t in once) <= 1


def test_sampler_order_is_seeded_per_epoch_and_resumes_mid_epoch():
    s = ResumableSampler(10, seed=3)
    epoch0 = list(s)
    assert sorted(epoch0) == list(range(10)) and list(s) == epoch0
    s.set_epoch(1)
    epoch1 = list(s)
    assert epoch1 != epoch0
    s.skip = 4
    assert list(s) == epoch1[4:]
    assert list(s) == epoch1  # the skip applies to one pass only


def test_rows_are_checked_with_line_numbers(tmp_path):
    good = write_sft(tmp_path / "d.jsonl", 3)
    assert [r["id"] for r in load_sft_rows(good, "neutral-concise")] == ["sft-000000", "sft-000001", "sft-000002"]
    lines = good.read_text().splitlines()

    def refused(text: str, persona: str = "neutral-concise") -> str:
        path = tmp_path / "bad.jsonl"
        path.write_text(text)
        with pytest.raises(SelfAlignError) as err:
            load_sft_rows(path, persona)
        return str(err.value)

    assert refused("") == f"{tmp_path / 'bad.jsonl'}: no rows; the SFT dataset is empty"
    assert refused(f"{lines[0]}\n{{oops\n").startswith(f"{tmp_path / 'bad.jsonl'}:2: not valid JSON")
    row = json.loads(lines[0]) | {"output": ""}
    assert refused(f"{lines[0]}\n\n{json.dumps(row)}\n").endswith(":3: field 'output' must be a non-empty string")
    assert refused("[1, 2]\n").endswith(":1: a row must be a JSON object")
    msg = refused(good.read_text(), persona="socratic-skeptical")
    assert ":1: row belongs to persona_id 'neutral-concise', but this run trains persona 'socratic-skeptical'" in msg
    with pytest.raises(SelfAlignError, match=r"no such file .*run stage=synth first"):
        load_sft_rows(tmp_path / "missing.jsonl", "neutral-concise")
