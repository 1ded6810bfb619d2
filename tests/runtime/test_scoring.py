"""Teacher-forced scoring on the tiny model: the log-probability of a continuation equals the sum read off a plain
forward pass of PEFT's own model (a separate copy), on the base and on each resident adapter, whatever the batch;
a call adds no hook."""

from __future__ import annotations

import pytest
import torch

from selfalign.runtime.adapters import write_random_adapter
from selfalign.runtime.chat import render_prompt
from selfalign.runtime.loader import apply_adapter, load_base
from selfalign.runtime.scoring import continuation_logprobs
from tests.runtime.reference import HFReference

PROMPTS = ["Name a colour.", "Tell me about rivers and why they reach the sea.", "What is two plus two?"]
OPENING = "Answer: I can’t provide that."


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    h = load_base("tiny_llama")
    write_random_adapter(h, root / "alpha", "alpha", seed=1)
    write_random_adapter(h, root / "beta", "beta", seed=2)
    apply_adapter(h, "alpha", root=root, activate=False)
    apply_adapter(h, "beta", root=root, activate=False)
    h.reference = HFReference("tiny_llama", {"alpha": root / "alpha", "beta": root / "beta"})
    return h


def reference(handle, prompt: str, tail: str, adapter: str | None) -> float:
    """One row on the reference's `PeftModel`, PEFT's own adapter switch, log-softmax by hand."""
    tok = handle.tokenizer
    head = tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    rest = tok(tail, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + rest])
    model = handle.reference.model
    with torch.inference_mode():
        if adapter is None:
            with model.disable_adapter():
                logits = model(input_ids=ids).logits
        else:
            model.set_adapter(adapter)
            logits = model(input_ids=ids).logits
    logps = torch.log_softmax(logits[0, :-1].float(), -1)
    return float(sum(logps[len(head) - 1 + i, t] for i, t in enumerate(rest)))


@pytest.mark.parametrize("adapter", [None, "alpha", "beta"])
def test_scores_equal_a_plain_forward_pass_whatever_the_batch(handle, adapter):
    hooks_before = sum(len(m._forward_hooks) for m in handle.model.modules())
    batched = continuation_logprobs(handle, PROMPTS, OPENING, adapter=adapter, batch_size=2)
    assert sum(len(m._forward_hooks) for m in handle.model.modules()) == hooks_before
    expected = [reference(handle, p, OPENING, adapter) for p in PROMPTS]
    assert batched == pytest.approx(expected, abs=1e-3)
    assert all(x < 0 for x in batched)


def test_adapters_score_differently_and_per_row_continuations(handle):
    base = continuation_logprobs(handle, PROMPTS, OPENING)
    alpha = continuation_logprobs(handle, PROMPTS, OPENING, adapter="alpha")
    assert max(abs(a - b) for a, b in zip(base, alpha, strict=True)) > 1e-3
    tails = ["Red.", "They flow downhill.", "Four."]
    each = continuation_logprobs(handle, PROMPTS, tails, adapter="beta")
    assert each == pytest.approx(
        [reference(handle, p, t, "beta") for p, t in zip(PROMPTS, tails, strict=True)], abs=1e-3
    )


def test_an_adapter_that_is_not_resident_is_named(handle):
    from selfalign.errors import SelfAlignError

    with pytest.raises(SelfAlignError, match="'gamma' is not attached"):
        continuation_logprobs(handle, PROMPTS, OPENING, adapter="gamma")
