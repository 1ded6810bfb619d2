"""Decoding on CPU against the memory-bound floor, and at lower precision: speed, and greedy agreement with fp32.

Prints one JSON object on stdout; progress goes to stderr. In one run:
- the machine's memory read bandwidth: the median time `torch.sum` takes over a `--bandwidth-mib` float32 buffer,
  far larger than the caches;
- for the base model in fp32, bf16 (weights and activations) and int8 (PyTorch's dynamic quantisation of every
  linear layer: int8 weights, activations quantised per step), the bytes of weights a decode step reads, the floor
  that gives (bytes / bandwidth), and the measured one-row and `--rows`-row decode steps (`bench_serve.decode_step`,
  median of 20 over a 96-token cache);
- each precision's greedy answers to the first `--prompts` prompts of the frozen Golden 100, through the project's
  engine (`runtime/generate.py`) with `--max-new-tokens` tokens, against fp32's: the share of identical answers and
  the mean share of each fp32 answer's tokens produced before the first difference.

    python scripts/bench_precision.py [--model smollm2_135m] [--prompts 100] [--max-new-tokens 128] [--rows 16]
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import json
import sys
import time
from pathlib import Path

from bench_serve import ROOT, decode_step

sys.path.insert(0, str(ROOT / "src"))


def log(msg: str) -> None:
    print(f"[bench_precision] {msg}", file=sys.stderr, flush=True)


def read_bandwidth(mib: int, repeats: int = 7) -> float:
    """Bytes per second `torch.sum` reads from a buffer of `mib` MiB (median of `repeats` after one warm-up)."""
    import torch

    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / sorted(times[1:])[repeats // 2]


def to_precision(handle, precision: str):
    """The handle's model converted in place to `precision` (fp32: as loaded)."""
    import torch

    if precision == "bf16":
        handle.model.to(torch.bfloat16)
    elif precision == "int8":
        handle.model = torch.ao.quantization.quantize_dynamic(handle.model, {torch.nn.Linear}, dtype=torch.qint8)
    return handle


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter (a tied embedding counted once, as the output layer
    reads it whole and the input lookup reads one row), and each int8 linear layer's packed weight."""
    import torch

    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    for m in model.modules():
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            w = m.weight()
            total += w.numel() * w.element_size() + (m.bias().numel() * 4 if m.bias() is not None else 0)
    return total


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict:
    """Identical answers, and the mean share of each reference answer produced before the first different token."""
    same = sum(a == b for a, b in zip(ref, got, strict=True))
    shares = []
    for a, b in zip(ref, got, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        shares.append(n / max(len(a), 1))
    return {"identical_answers": round(same / len(ref), 3), "mean_shared_prefix": round(sum(shares) / len(shares), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--bandwidth-mib", type=int, default=1024)
    args = parser.parse_args()

    import torch

    from selfalign.runtime.generate import complete_all
    from selfalign.runtime.loader import load_base

    prompts = [json.loads(line)["prompt"] for line in (ROOT / "golden" / "golden_v0.jsonl").read_text().splitlines()]
    prompts = prompts[: args.prompts]
    bandwidth = read_bandwidth(args.bandwidth_mib)
    log(f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    result: dict = {
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None,
        "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "precisions": {},
    }
    reference: list[list[int]] | None = None
    for precision in ("fp32", "bf16", "int8"):
        handle = to_precision(load_base(args.model), precision)
        tok = handle.tokenizer
        nbytes = weight_bytes(handle.model)
        one, many = decode_step(handle.model, 1, 96), decode_step(handle.model, args.rows, 96)
        log(f"{precision}: {nbytes / 2**20:.0f} MiB of weights; step 1 row {one} s, {args.rows} rows {many} s")
        start = time.perf_counter()
        done = complete_all(handle, prompts, max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - start
        answers = [tok(c.text, add_special_tokens=False)["input_ids"] for c in done]
        floor = nbytes / bandwidth
        row = {
            "weight_mib": round(nbytes / 2**20, 1),
            "floor_step_s": round(floor, 4),
            "one_row_step_s": one,
            "one_row_step_over_floor": round(one / floor, 2),
            f"{args.rows}_row_step_s": many,
            "golden_seconds": round(seconds, 1),
            "golden_tokens_per_s": round(sum(c.completion_tokens for c in done) / seconds, 1),
        }
        if reference is None:
            reference = answers
        else:
            row |= agreement(reference, answers)
            row["one_row_speedup_vs_fp32"] = round(result["precisions"]["fp32"]["one_row_step_s"] / one, 2)
            row["golden_speedup_vs_fp32"] = round(result["precisions"]["fp32"]["golden_seconds"] / seconds, 2)
        result["precisions"][precision] = row
        log(f"{precision}: {row}")
        del handle
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
