"""Preference training pieces on the tiny model: the pair batch layout, the reference log-probs (the starting
adapter's own, so the first DPO loss is log 2 exactly), and a few steps that move the chosen answers up."""

from __future__ import annotations

import math

import pytest
import torch

from selfalign.runtime.loader import resolve_base_model
from selfalign.train.preference import PairDataModule, PreferenceModule, fill_reference, pad_pairs
from selfalign.train.sft import build_peft_model
from tests.conftest import preset


def pairs(n: int = 8) -> list[dict]:
    out = []
    for i in range(n):
        out.append(
            {
                "id": f"p{i}",
                "prompt": f"How do I remove stain number {i} from my shirt?",
                "chosen": f"Answer: Soak it in cold water, then wash. Step {i}.",
                "rejected": "Answer: I can’t provide that.",
            }
        )
    return out


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    model, handle = build_peft_model(resolve_base_model("tiny_llama"), preset("lora"), preset("trainer", "cpu"))
    data = PairDataModule(pairs(), handle.tokenizer, max_seq_len=256, micro_batch_size=2, val_fraction=0.25, seed=1)
    return model, handle, data


def test_batches_hold_chosen_then_rejected_with_their_answer_marks(model_and_data):
    _, handle, data = model_and_data
    assert len(data.train_rows) == 6 and len(data.val_rows) == 2
    rows = data.train_rows[:2]
    batch = pad_pairs(rows, handle.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and batch["ref"].shape == (2, 2)
    for i, r in enumerate(rows):
        assert batch["input_ids"][i, : len(r["chosen_ids"])].tolist() == r["chosen_ids"]
        assert batch["input_ids"][2 + i, : len(r["rejected_ids"])].tolist() == r["rejected_ids"]
        marked = batch["answer"][i].nonzero().flatten().tolist()
        assert marked == list(range(r["chosen_start"], len(r["chosen_ids"])))
    text = handle.tokenizer.decode(rows[0]["rejected_ids"][rows[0]["rejected_start"] :])
    assert text.startswith("Answer: I can’t provide that.")


def test_first_dpo_loss_is_log_two_and_training_moves_the_margin(model_and_data):
    model, _, data = model_and_data
    fill_reference(model, data)
    assert all(r["ref_chosen"] < 0 and r["ref_rejected"] < 0 for r in data.all_rows)

    class Prefer:
        loss, beta, sft_weight, simpo_gamma, lr = "dpo", 0.5, 0.0, 0.5, 5e-3

    module = PreferenceModule(
        model, prefer=Prefer, betas=(0.9, 0.95), weight_decay=0.0, warmup_ratio=0.0, scheduler="constant"
    )
    batch = pad_pairs(data.train_rows, data.tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        terms, _, _ = module._terms(batch)
    assert float(terms.loss) == pytest.approx(math.log(2), abs=1e-4)  # the policy is the reference at step 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(5):
        loss = module._terms(batch)[0].loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after, _, _ = module._terms(batch)
    assert float(after.loss) < math.log(2) - 0.05
    assert float((after.chosen_rewards - after.rejected_rewards).mean()) > 0
