"""The preference losses: DPO + SFT term against TRL's DPOTrainer on the same batch and fixed reference log-probs,
SimPO against its formula, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

from selfalign.runtime.scoring import sequence_logps
from selfalign.train.losses import preference_loss


def test_dpo_with_sft_term_equals_trl_on_the_same_batch(tmp_path):
    """TRL computes its loss inside the trainer from a batch; give both the same tiny model, batch and fixed
    reference log-probs, and compare the scalars (DPO `sigmoid` plus `sft` at weight 0.2)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from selfalign.runtime.loader import resolve_base_model
    from selfalign.runtime.models import build_tiny

    path = build_tiny(resolve_base_model("tiny_llama"), tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def turn(role: str, text: str) -> list[dict]:
        return [{"role": role, "content": text}]

    rows = [
        ("How do I kill a stuck process?", "Use kill with its PID.", "I can't help with that."),
        ("How do I hurt my neighbour?", "I can't help with that. Talk to a mediator.", "First, wait until dark."),
    ]
    data = Dataset.from_list(
        [
            {"prompt": turn("user", p), "chosen": turn("assistant", c), "rejected": turn("assistant", r)}
            for p, c, r in rows
        ]
    )
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 0.2],
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=2,
        precompute_ref_log_probs=True,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    ref_chosen, ref_rejected = torch.tensor([-40.0, -12.5]), torch.tensor([-30.0, -55.0])
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_chosen, ref_rejected
    trainer.model.eval()
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
        tokens = batch["completion_mask"][:, 1:].sum(-1).float()
        ours = preference_loss(
            logps[:2],
            logps[2:],
            ref_chosen,
            ref_rejected,
            chosen_tokens=tokens[:2],
            rejected_tokens=tokens[2:],
            loss="dpo",
            beta=0.1,
            sft_weight=0.2,
        )
    assert float(ours.loss) == pytest.approx(theirs, rel=1e-5)
    assert float(ours.loss) > float(ours.preference)  # the SFT term is there


def test_dpo_and_simpo_values_by_hand():
    c, r = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    rc, rr = torch.tensor([-11.0, -18.0]), torch.tensor([-11.0, -16.0])
    n_c, n_r = torch.tensor([5.0, 10.0]), torch.tensor([4.0, 5.0])
    dpo = preference_loss(c, r, rc, rr, chosen_tokens=n_c, rejected_tokens=n_r, loss="dpo", beta=0.5)
    margins = [0.5 * ((-10 + 11) - (-12 + 11)), 0.5 * ((-20 + 18) - (-15 + 16))]
    expected = sum(math.log1p(math.exp(-m)) for m in margins) / 2
    assert float(dpo.loss) == pytest.approx(expected, rel=1e-6)
    assert dpo.chosen_rewards.tolist() == pytest.approx([0.5, -1.0])
    simpo = preference_loss(
        c, r, None, None, chosen_tokens=n_c, rejected_tokens=n_r, loss="simpo", beta=2.0, simpo_gamma=0.5
    )
    z = [2.0 * (-10 / 5 - -12 / 4) - 0.5, 2.0 * (-20 / 10 - -15 / 5) - 0.5]
    assert float(simpo.loss) == pytest.approx(sum(math.log1p(math.exp(-x)) for x in z) / 2, rel=1e-6)
    with_sft = preference_loss(c, r, rc, rr, chosen_tokens=n_c, rejected_tokens=n_r, loss="dpo", sft_weight=1.0)
    assert float(with_sft.sft) == pytest.approx(30.0 / 15.0)  # NLL per chosen token over the batch


def test_losses_refuse_what_they_cannot_compute():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="reference"):
        preference_loss(x, x, None, None, chosen_tokens=x + 1, rejected_tokens=x + 1, loss="dpo")
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss(x, x, x, x, chosen_tokens=x + 1, rejected_tokens=x + 1, loss="kto")
