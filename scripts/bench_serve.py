"""Benchmark the batching server against one-request-at-a-time serving, with the real `openai` client over 127.0.0.1.

Prints one JSON object on stdout; progress goes to stderr. For each server it starts `stage=serve` in a subprocess
with two random LoRA adapters resident, then for 1, 8, 16 and 32 concurrent clients has every client send
`--requests` chat requests in a row (`max_tokens=--tokens`, greedy), half the clients on each adapter. It reports
requests/s, completion tokens/s, and p50/p95 latency per level.

Every answer is `--tokens` long (the request's `min_tokens`; `vllm bench serve` likewise ignores end-of-sequence
for a fixed output length): the ceiling below assumes steps of N busy rows, and when answers end early the clients
that drew short ones run out of requests while the others still decode, so a level's last seconds run on few rows.
`--natural-length` lets end-of-sequence end answers: that measures the clients' tail as well as the batching
(DECISIONS.md "One thread computes").

It also measures, in this process, the base model's decode step (one token for N rows, over a cache of
`--context` tokens, the median of 20) for one row and for each batch size a level fills, and the **ceiling** that
allows: N x (one-row step) / (N-row step), the requests/s speedup batching could give if nothing but the forward
pass took time (N = min(clients, serve.max_batch)). Each level's `fraction_of_ceiling` is its measured speedup
over that ceiling.

The baseline, in the same run, is one request at a time: this server with `serve.max_batch=1`, or, with
`--baseline-src DIR`, the `src/` of another checkout (for example the commit before batching) served the same way.
`--without-prefix-cache` also runs the batched server with `serve.prefix_cache_tokens=0`, for the prefix cache's share.

    python scripts/bench_serve.py [--model smollm2_135m] [--clients 1 8 16 32] [--requests 2] [--tokens 64]
        [--baseline-src /path/to/old/checkout/src] [--natural-length] [--without-prefix-cache]
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PROMPTS = [
    "Give me one tip for staying focused while working.",
    "Explain why the sky is blue in two sentences.",
    "What should I pack for a weekend hike?",
    "Summarise the pros and cons of remote work.",
]


def log(msg: str) -> None:
    print(f"[bench_serve] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, root: Path, tmp: Path, src: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "selfalign",
        "stage=serve",
        f"base_model={model}",
        f"serve.port={port}",
        f"paths.adapters_dir={root}",
        f"paths.output_dir={tmp}/outputs",
        "serve.adapters=[A,B]",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not come up")


def two_adapters(model: str, root: Path):
    """Random LoRA adapters "A" and "B" for `model` under `root`, as the benchmarks serve them; the tokenizer."""
    from selfalign.runtime.adapters import write_random_adapter
    from selfalign.runtime.loader import load_base

    handle = load_base(model)
    write_random_adapter(handle, root / "A", "A", seed=1)
    write_random_adapter(handle, root / "B", "B", seed=2)
    return handle.tokenizer


def decode_step(model, rows: int, context: int, repeats: int = 20, route=contextlib.nullcontext) -> float:
    """Median seconds of one decode step of `model` (one new token per row, `logits_to_keep=1`, as the server runs
    it) for `rows` rows over a cache of `context` tokens each; each step runs inside `route()` (for example a
    `LoraSlots.rows(...)` routing). Two steps warm up first."""
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        ids = torch.randint(100, 10000, (rows, context))
        cache, mask = DynamicCache(), torch.ones((rows, context), dtype=torch.long)
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        times = []
        for i in range(repeats + 2):
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            start = time.perf_counter()
            with route():
                model(
                    input_ids=ids[:, :1],
                    attention_mask=mask,
                    position_ids=torch.full((rows, 1), context + i),
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            times.append(time.perf_counter() - start)
    return round(float(sorted(times[2:])[repeats // 2]), 4)


def decode_steps(model: str, sizes: list[int], context: int) -> dict[int, float]:
    """The base model's `decode_step` for each batch size in `sizes`."""
    from selfalign.runtime.loader import load_base

    model_ = load_base(model).model
    steps = {}
    for n in sizes:
        steps[n] = decode_step(model_, n, context)
        log(f"decode step, {n} rows: {steps[n]} s")
    return steps


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return round(float(np.percentile(values, q)), 3)


def level(url: str, clients: int, requests: int, tokens: int, natural: bool = False) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    def one_client(c: int) -> list[tuple[float, int]]:
        out = []
        for r in range(requests):
            start = time.perf_counter()
            reply = client.chat.completions.create(
                model="A" if c % 2 == 0 else "B",
                messages=[{"role": "user", "content": PROMPTS[(c + r) % len(PROMPTS)]}],
                max_tokens=tokens,
                temperature=0,
                extra_body=None if natural else {"min_tokens": tokens},
            )
            out.append((time.perf_counter() - start, reply.usage.completion_tokens))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = [x for xs in pool.map(one_client, range(clients)) for x in xs]
    wall = time.perf_counter() - start
    latencies = [r[0] for r in results]
    return {
        "clients": clients,
        "requests": len(results),
        "seconds": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 3),
        "tokens_per_s": round(sum(r[1] for r in results) / wall, 1),
        "p50_latency_s": pct(latencies, 50),
        "p95_latency_s": pct(latencies, 95),
    }


def bench(name: str, model: str, root: Path, tmp: Path, src: Path, args, *extra: str) -> list[dict]:
    proc, url = start_server(model, root, tmp, src, *extra)
    try:
        level(url, 1, 1, 8)  # warm-up: first-call allocations
        rows = []
        for clients in args.clients:
            row = level(url, clients, args.requests, args.tokens, args.natural_length)
            log(f"{name}: {row}")
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--max-batch", type=int, default=16, help="the batched server's serve.max_batch")
    parser.add_argument("--context", type=int, default=96, help="cache length of the measured decode steps")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, sent one after another")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--baseline-src", type=Path, default=None, help="serve the baseline from this src/ (one that takes min_tokens)"
    )
    parser.add_argument("--natural-length", action="store_true", help="answers end at end-of-sequence")
    parser.add_argument(
        "--without-prefix-cache", action="store_true", help="also run the batched server with its prefix cache off"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "adapters"
        two_adapters(args.model, root)
        src = ROOT / "src"
        if args.baseline_src:
            baseline_name = f"one at a time ({args.baseline_src})"
            baseline = bench("baseline", args.model, root, tmp, args.baseline_src.resolve(), args)
        else:
            baseline_name = "one at a time (serve.max_batch=1)"
            baseline = bench("baseline", args.model, root, tmp, src, args, "serve.max_batch=1")
        batched = bench("batched", args.model, root, tmp, src, args, f"serve.max_batch={args.max_batch}")
        uncached = None
        if args.without_prefix_cache:
            uncached = bench(
                "batched, no prefix cache",
                args.model,
                root,
                tmp,
                src,
                args,
                f"serve.max_batch={args.max_batch}",
                "serve.prefix_cache_tokens=0",
            )
    rows = sorted({1, *(min(c, args.max_batch) for c in args.clients)})
    steps = decode_steps(args.model, rows, args.context)
    speedup = {
        str(b["clients"]): round(b["requests_per_s"] / a["requests_per_s"], 2)
        for a, b in zip(baseline, batched, strict=True)
    }
    filled = {str(c): min(c, args.max_batch) for c in args.clients}  # rows one decode step runs at each level
    ceiling = {c: round(n * steps[1] / steps[n], 2) for c, n in filled.items()}
    fraction = {c: round(speedup[c] / ceiling[c], 3) for c in ceiling}
    extra = {}
    if uncached is not None:
        extra["batched_no_prefix_cache"] = {
            "server": f"serve.max_batch={args.max_batch} serve.prefix_cache_tokens=0",
            "levels": uncached,
            "fraction_of_ceiling": {
                str(b["clients"]): round(b["requests_per_s"] / a["requests_per_s"] / ceiling[str(b["clients"])], 3)
                for a, b in zip(baseline, uncached, strict=True)
            },
        }
    p95_1 = (baseline[0]["p95_latency_s"], batched[0]["p95_latency_s"]) if args.clients[0] == 1 else None
    print(
        json.dumps(
            {
                "model": args.model,
                "tokens_per_request": f"up to {args.tokens}" if args.natural_length else args.tokens,
                "requests_per_client": args.requests,
                "baseline": {"server": baseline_name, "levels": baseline},
                "batched": {"server": f"serve.max_batch={args.max_batch}", "levels": batched},
                "decode_step_s": {str(n): t for n, t in steps.items()},
                "decode_context_tokens": args.context,
                "requests_per_s_speedup": speedup,
                "ceiling_speedup": ceiling,
                "fraction_of_ceiling": fraction,
                "p95_latency_1_client_s": None if p95_1 is None else {"baseline": p95_1[0], "batched": p95_1[1]},
                **extra,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
