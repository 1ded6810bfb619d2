"""Benchmark chunked prefill: how long a running stream stalls when a long prompt arrives, through the real server.

Prints one JSON object on stdout; progress goes to stderr. For each `serve.prefill_chunk` setting (the baseline,
in the same run, is a chunk larger than the prompt: the whole prompt prefilled in one pass, as before chunking) it
starts `stage=serve` on the bundled model, opens one streaming chat (`--stream-tokens`, greedy), and once that
stream has produced a few pieces sends one `--prompt-tokens`-token prompt from a second client. It reports the
stream's gaps between pieces while the long prompt is prefilled (max and p50), the stream's gap p50 outside that
window, and the long request's time to its first token (it asks for one).

    python scripts/bench_prefill.py [--model smollm2_135m] [--prompt-tokens 4000] [--chunks 128 256 512]
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import itertools
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_serve import ROOT, pct, start_server, two_adapters


def log(msg: str) -> None:
    print(f"[bench_prefill] {msg}", file=sys.stderr, flush=True)


WORDS = ["the", "river", "carries", "silt", "past", "the", "old", "mill", "and", "on", "toward", "the", "sea"]


def long_prompt(tokenizer, tokens: int) -> str:
    """A user message whose chat prompt is about `tokens` tokens."""
    from selfalign.runtime.chat import render_prompt

    text = " ".join(WORDS[i % len(WORDS)] for i in range(tokens))
    while len(tokenizer(render_prompt(tokenizer, text), add_special_tokens=False)["input_ids"]) > tokens:
        text = text.rsplit(" ", 1)[0]
    return text


def run(url: str, prompt: str, stream_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    arrivals: list[float] = []
    long_window: dict[str, float] = {}
    started = threading.Event()

    def send_long() -> None:
        started.wait()
        long_window["sent"] = time.perf_counter()
        reply = client.chat.completions.create(
            model="A", messages=[{"role": "user", "content": prompt}], max_tokens=1, temperature=0, stream=True
        )
        for _piece in reply:  # the role piece comes at once; the stream ends with the prompt's one token
            pass
        long_window["first"] = time.perf_counter()

    thread = threading.Thread(target=send_long)
    thread.start()
    stream = client.chat.completions.create(
        model="B",
        messages=[{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}],
        max_tokens=stream_tokens,
        temperature=0,
        stream=True,
    )
    for piece in stream:
        if piece.choices and piece.choices[0].delta.content:
            arrivals.append(time.perf_counter())
            if len(arrivals) == 5:
                started.set()
    started.set()
    thread.join()
    gaps = [(b, b - a) for a, b in itertools.pairwise(arrivals)]
    sent, first = long_window["sent"], long_window["first"]
    during = [g for end, g in gaps if sent < end <= first + 1.0]  # pieces while the long prompt was prefilled
    outside = [g for end, g in gaps if end <= sent or end > first + 1.0]
    return {
        "stream_pieces": len(arrivals),
        "gap_max_during_prefill_s": round(max(during), 3) if during else None,
        "gap_p50_during_prefill_s": pct(during, 50) if during else None,
        "gap_p50_otherwise_s": pct(outside, 50) if outside else None,
        "long_prompt_first_token_s": round(first - sent, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--stream-tokens", type=int, default=200)
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512])
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_prefill_") as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "adapters"
        prompt = long_prompt(two_adapters(args.model, root), args.prompt_tokens)
        whole = args.prompt_tokens + 1024  # a chunk the prompt fits in: one prefill pass, the pre-chunking behaviour
        for chunk in [whole, *args.chunks]:
            name = "whole prompt (baseline)" if chunk == whole else f"prefill_chunk={chunk}"
            proc, url = start_server(args.model, root, tmp, ROOT / "src", f"serve.prefill_chunk={chunk}")
            try:
                run(url, "Hello.", 4)  # warm-up
                results[name] = run(url, prompt, args.stream_tokens)
                log(f"{name}: {results[name]}")
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    print(
        json.dumps(
            {
                "model": args.model,
                "prompt_tokens": args.prompt_tokens,
                "stream_tokens": args.stream_tokens,
                "machine_cpus": os.cpu_count(),
                "settings": results,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
