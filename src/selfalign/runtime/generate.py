"""Every generation in the project goes through here: the continuous batcher (`runtime/batching.py`), each row on
its own adapter (slots or PEFT's path, `runtime/lora.py`).

`complete_all` runs a list of prompts to their ends in the calling thread (eval, the local teacher, the preference
stage's sampling, demo, infer, doctor); the server drives the same `Batcher` from its worker thread. Greedy decoding
is the default; with a temperature each row samples with its own generator seeded from the call's seed, so a
prompt's answer never depends on its batch-mates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from selfalign.errors import SelfAlignError
from selfalign.runtime.batching import Batcher, Event, Job
from selfalign.runtime.chat import render_prompt
from selfalign.runtime.loader import BaseModelHandle, check_attached, check_context, resolve_adapter_name


@dataclass
class Completion:
    text: str
    finish: str  # "stop" (end of sequence or `until`) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Generation:
    texts: list[str]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    seconds: float
    adapter: str | None


def complete_all(
    handle: BaseModelHandle,
    prompts: list[str | list[dict]],
    *,
    max_new_tokens: int | list[int],
    adapter: str | None = None,
    max_batch: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seeds: list[int | None] | None = None,
    until: list[Callable[[str], bool] | None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Completion]:
    """Every prompt decoded to its end on `adapter` (None: the base) through `Batcher.drain`, in the calling thread.

    Rows retire as they finish and the next prompts take their slots, so no row waits on the longest of its batch;
    the schedule depends on the prompts alone, so the texts do too. Per prompt: its own token budget, sampling seed
    and early stop (`until`). `progress(1)` hears of each prompt as it finishes."""
    check_attached(handle, adapter)
    tok = handle.tokenizer
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    out: list[Completion | None] = [None] * len(prompts)
    errors: list[str] = []

    def emit(i: int, event: Event) -> None:
        if event.kind == "done":
            out[i] = Completion(event.text, event.finish or "stop", event.prompt_tokens, event.completion_tokens)
            if progress:
                progress(1)
        elif event.kind == "error":
            errors.append(event.text)

    jobs = []
    for i, prompt in enumerate(prompts):
        ids = tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        check_context(handle, len(ids), budgets[i])
        jobs.append(
            Job(
                ids=ids,
                adapter=adapter,
                attach_id=handle.attach_ids.get(adapter) if adapter else None,
                max_new_tokens=budgets[i],
                emit=partial(emit, i),
                temperature=temperature,
                top_p=top_p,
                seed=seeds[i] if seeds else None,
                until=until[i] if until else None,
            )
        )
    Batcher(handle, max_batch=max_batch).drain(jobs)
    if errors:
        raise SelfAlignError(f"generation failed: {errors[0]}")
    return out


def generate(
    handle: BaseModelHandle,
    prompts: list[str | list[dict]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    adapter: str | None = None,
    max_batch: int = 16,
) -> Generation:
    """`prompts` answered on `adapter` (None: the active one; `"base"`: the base), with token counts and the seconds
    taken; greedy when temperature is 0, else every row sampled with its own generator seeded with `seed`."""
    name = resolve_adapter_name(handle, adapter)
    start = time.perf_counter()
    done = complete_all(
        handle,
        prompts,
        max_new_tokens=max_new_tokens,
        adapter=name,
        max_batch=max_batch,
        temperature=temperature,
        top_p=top_p,
        seeds=[seed] * len(prompts),
    )
    return Generation(
        [c.text for c in done],
        [c.prompt_tokens for c in done],
        [c.completion_tokens for c in done],
        time.perf_counter() - start,
        name,
    )


def infer(
    handle: BaseModelHandle,
    prompt: str | list[str],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    adapter: str | None = None,
) -> str | list[str]:
    """Answer one prompt (returns a str) or a list (returns a list), with the active or named adapter."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    result = generate(
        handle, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, adapter=adapter
    )
    return result.texts[0] if isinstance(prompt, str) else result.texts
