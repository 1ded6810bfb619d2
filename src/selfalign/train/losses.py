"""Preference losses on per-sequence log-probabilities (summed over each answer's tokens).

- `dpo` (Rafailov et al. 2023; TRL's `sigmoid`): -log σ(β[(π_c − ref_c) − (π_r − ref_r)]), where π and ref are the
  trained and the reference model's log-probs of the chosen (c) and rejected (r) answer.
- `simpo` (Meng et al. 2024), reference-free: -log σ(β[π_c/|c| − π_r/|r|] − γ), on length-normalised log-probs.

Either can add an SFT term: `sft_weight` × the mean negative log-likelihood per chosen-answer token over the batch
(TRL's `sft` loss type), which keeps the chosen answers likely while the margin grows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfalign.config import PREFERENCE_LOSSES


@dataclass
class PreferenceTerms:
    loss: torch.Tensor  # the scalar to minimise
    preference: torch.Tensor  # the preference part, averaged over pairs
    sft: torch.Tensor  # the NLL per chosen token (0 when sft_weight is 0 it is still reported)
    chosen_rewards: torch.Tensor  # per pair, detached
    rejected_rewards: torch.Tensor


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    loss: str = "dpo",
    beta: float = 0.1,
    sft_weight: float = 0.0,
    simpo_gamma: float = 0.5,
) -> PreferenceTerms:
    """The batch's loss and per-pair rewards. `*_tokens`: each answer's token count (for SimPO and the SFT term)."""
    if loss == "dpo":
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("dpo needs the reference model's log-probs")
        chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
        rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
        per_pair = -F.logsigmoid(chosen_rewards - rejected_rewards)
    elif loss == "simpo":
        chosen_rewards = beta * chosen_logps / chosen_tokens.clamp(min=1)
        rejected_rewards = beta * rejected_logps / rejected_tokens.clamp(min=1)
        per_pair = -F.logsigmoid(chosen_rewards - rejected_rewards - simpo_gamma)
    else:
        raise ValueError(f"unknown preference loss {loss!r}; choose one of {PREFERENCE_LOSSES}")
    preference = per_pair.mean()
    sft = -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)
    total = preference + sft_weight * sft if sft_weight else preference
    return PreferenceTerms(total, preference, sft, chosen_rewards.detach(), rejected_rewards.detach())
