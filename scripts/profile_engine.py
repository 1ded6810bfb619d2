"""Where a batched decode's time goes: the real scheduler (`Batcher.drain`), each part timed around its real call.

Prints one JSON object on stdout. Two random adapters on `--model`; `--jobs` greedy jobs of `--tokens` new tokens
(end-of-sequence held back until then, as `scripts/bench_serve.py` does, unless `--natural-length`), alternating
between them, over `--max-batch` slots, with the server's prefill chunk and prefix cache. Reported: wall time and
steps; seconds in decode forward passes, prefill passes, sampling (`_pick`), retiring and detokenizing (`_retire`),
and the rest of each step; then a `--max-batch`-row decode step (median of 10, over a 96-token cache) on the base
alone and with the rows routed to the two adapters through the LoRA slots' hooks (`runtime/lora.py`), whose
difference is what the hooks cost; and `--max-batch` jobs, then one job alone, drained under PyTorch's profiler: the
operators with the most self CPU time and their share.

    python scripts/profile_engine.py [--model smollm2_135m] [--jobs 32] [--tokens 64] [--max-batch 16]
        [--natural-length]
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_serve import PROMPTS, ROOT, decode_step, two_adapters

sys.path.insert(0, str(ROOT / "src"))


def operator_profile(batcher, jobs: list, top: int = 10) -> dict:
    """`jobs` drained under PyTorch's profiler: the operators with the most self CPU time and their share of the
    time spent in operators. (The profiler's own cost per call inflates the wall time, so the time outside operators
    is not reported here; the timed parts above measure the Python around the forward passes.)"""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        batcher.drain(jobs)
    averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in averages)
    return {
        "in_operators_s": round(total / 1e6, 2),
        "top": [
            {
                "op": e.key,
                "calls": e.count,
                "self_s": round(e.self_cpu_time_total / 1e6, 3),
                "share": round(e.self_cpu_time_total / total, 3),
            }
            for e in averages[:top]
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--natural-length", action="store_true", help="answers end at end-of-sequence")
    args = parser.parse_args()

    from selfalign.config import ServeConfig
    from selfalign.runtime.batching import Batcher, Job
    from selfalign.runtime.chat import render_prompt
    from selfalign.runtime.loader import apply_adapter, load_base

    seconds: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()

    class Timed(Batcher):
        def _forward(self, input_ids, mask, positions, rows, cache):
            start = time.perf_counter()
            logits = super()._forward(input_ids, mask, positions, rows, cache)
            part = "decode_forward" if input_ids.shape[1] == 1 and rows is self.running else "prefill_forward"
            seconds[part] += time.perf_counter() - start
            calls[part] += 1
            return logits

        def _pick(self, logits, rows):
            start = time.perf_counter()
            tokens = super()._pick(logits, rows)
            seconds["sampling"] += time.perf_counter() - start
            return tokens

        def _retire(self):
            start = time.perf_counter()
            super()._retire()
            seconds["retire_detokenize"] += time.perf_counter() - start

        def _iterate(self, new):
            start = time.perf_counter()
            super()._iterate(new)
            seconds["steps"] += time.perf_counter() - start
            calls["steps"] += 1

    with tempfile.TemporaryDirectory(prefix="profile_engine_") as tmp_name:
        root = Path(tmp_name)
        two_adapters(args.model, root)
        handle = load_base(args.model)
        for name in ("A", "B"):
            apply_adapter(handle, name, root=root, activate=False)
    tok = handle.tokenizer

    produced: list[int] = []

    def heard(event) -> None:
        if event.kind == "done":
            produced.append(event.completion_tokens)

    def jobs(n: int) -> list[Job]:
        out = []
        for i in range(n):
            ids = tok(render_prompt(tok, PROMPTS[i % len(PROMPTS)]), add_special_tokens=False)["input_ids"]
            name = "AB"[i % 2]
            least = 0 if args.natural_length else args.tokens
            out.append(Job(ids, name, handle.attach_ids[name], args.tokens, heard, min_new_tokens=least))
        return out

    serve = ServeConfig()  # scheduled as the server schedules: its prefill chunk and prefix cache
    batcher = Timed(
        handle,
        max_batch=args.max_batch,
        prefill_chunk=serve.prefill_chunk,
        prefix_cache_tokens=serve.prefix_cache_tokens,
    )
    batcher.drain(jobs(4))  # warm-up
    seconds.clear()
    calls.clear()
    produced.clear()
    start = time.perf_counter()
    batcher.drain(jobs(args.jobs))
    wall = time.perf_counter() - start
    parts = {k: round(v, 3) for k, v in seconds.items() if k != "steps"}
    parts["rest_of_step"] = round(seconds["steps"] - sum(seconds[k] for k in parts), 3)
    result = {
        "model": args.model,
        "jobs": args.jobs,
        "tokens_per_job": args.tokens,
        "max_batch": args.max_batch,
        "wall_s": round(wall, 2),
        "steps": calls["steps"],
        "tokens_per_s": round(sum(produced) / wall, 1),
        "seconds": parts,
        "passes": {k: calls[k] for k in ("decode_forward", "prefill_forward")},
    }
    rows = args.max_batch
    step = {
        label: decode_step(handle.model, rows, 96, repeats=10, route=lambda routed=routed: handle.slots.rows(routed))
        for label, routed in (("base_only", [None] * rows), ("two_adapters_slots", ["A", "B"] * (rows // 2)))
    }
    result[f"decode_step_{rows}_rows_s"] = step
    result["hooks_share_of_step"] = round(step["two_adapters_slots"] / step["base_only"] - 1, 3)
    result["operators"] = {
        f"{args.max_batch}_jobs": operator_profile(Batcher(handle, max_batch=args.max_batch), jobs(args.max_batch)),
        "1_job": operator_profile(Batcher(handle, max_batch=1), jobs(1)),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
