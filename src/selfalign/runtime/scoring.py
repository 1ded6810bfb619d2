"""Teacher-forced scoring: how likely a model finds a given answer, with the same rendering and the same per-row
LoRA routing as decoding (`runtime/lora.py`). Eval's continuous refusal score and the preference stage's log-probs
are computed here."""

from __future__ import annotations

import torch

from selfalign.runtime.chat import render_prompt
from selfalign.runtime.loader import BaseModelHandle, check_attached
from selfalign.runtime.lora import route


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over each row's answer tokens. `answer_mask[:, t]` marks token t as part of the answer;
    the logits at position t-1 predict token t."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logps, 2, input_ids[:, 1:, None]).squeeze(-1)
    return (picked * answer_mask[:, 1:].to(picked.dtype)).sum(-1)


def continuation_logprobs(
    handle: BaseModelHandle,
    prompts: list[str | list[dict]],
    continuation: str | list[str],
    *,
    adapter: str | None = None,
    batch_size: int = 16,
) -> list[float]:
    """log p(continuation | prompt) on `adapter` (None: the base), summed over the continuation's tokens. One
    continuation for every prompt, or one each."""
    check_attached(handle, adapter)
    tok = handle.tokenizer
    tails = [continuation] * len(prompts) if isinstance(continuation, str) else list(continuation)
    rows = [
        (
            tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"],
            tok(t, add_special_tokens=False)["input_ids"],
        )
        for p, t in zip(prompts, tails, strict=True)
    ]
    out: list[float] = []
    with handle.lock, torch.inference_mode():
        device = next(handle.model.parameters()).device
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(h) + len(t) for h, t in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            answer = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (head, tail) in enumerate(chunk):
                ids[i, : len(head) + len(tail)] = torch.tensor(head + tail)
                mask[i, : len(head) + len(tail)] = 1
                answer[i, len(head) : len(head) + len(tail)] = 1
            kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
            with route(handle, [adapter] * len(chunk)) as (model, extra):
                logits = model(**kwargs, **extra).logits
            out += sequence_logps(logits, kwargs["input_ids"], answer.to(device)).tolist()
    return out
