"""Benchmark batched generation against one-prompt-at-a-time on the same prompts, in one run.

Prints one JSON object: tokens/s at batch 1 and at batch N (greedy, through the batcher that every generation
uses), and whether the batched outputs equal the unbatched ones.

    python scripts/bench_infer.py [--model smollm2_135m] [--batch 8] [--max-new-tokens 128] [--device cpu]
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import json
import sys

PROMPTS = [
    "Explain the Lindy effect to a high school senior.",
    "Write a short note to a neighbour about a noisy party.",
    "Why do randomized controlled trials reduce confounding?",
    "Give three tips for learning a new language.",
    "What causes the seasons on Earth?",
    "Describe how a bicycle gear system works.",
    "What is the difference between weather and climate?",
    "Summarise the plot of a heist story in two sentences.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from selfalign.runtime.generate import generate
    from selfalign.runtime.loader import load_base

    handle = load_base(args.model, device=args.device)
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    generate(handle, prompts[:1], max_new_tokens=8)  # warm-up

    singles = [generate(handle, [p], max_new_tokens=args.max_new_tokens) for p in prompts]
    single_tokens = sum(g.completion_tokens[0] for g in singles)
    single_seconds = sum(g.seconds for g in singles)
    batched = generate(handle, prompts, max_new_tokens=args.max_new_tokens)
    batch_tokens = sum(batched.completion_tokens)
    result = {
        "model": handle.name,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "max_new_tokens": args.max_new_tokens,
        "batch": args.batch,
        "batch1_tokens_per_s": round(single_tokens / single_seconds, 2),
        f"batch{args.batch}_tokens_per_s": round(batch_tokens / batched.seconds, 2),
        "speedup": round((batch_tokens / batched.seconds) / (single_tokens / single_seconds), 2),
        "batched_equals_unbatched": batched.texts == [g.texts[0] for g in singles],
        "prompts_per_s_batched": round(len(prompts) / batched.seconds, 3),
    }
    print(json.dumps(result), file=sys.stdout)


if __name__ == "__main__":
    main()
