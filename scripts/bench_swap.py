"""Benchmark adapter hot-swap against PEFT's attach and the naive reload, on CPU by default.

Prints exactly one JSON object on stdout; progress goes to stderr. Measures, over `--rounds` rounds: attaching an
adapter from disk (`apply_adapter`, the adapter unloaded again between rounds), alone and next to a resident one,
both as a copy into the LoRA slots (`runtime/lora.py`) and on PEFT's `load_adapter` path that every attach took
before (forced by a slot rank of 0); the slots' first, allocating attach; switching the active adapter
(`set_active`); and the naive way (a fresh `load_base` plus `PeftModel.from_pretrained`, min(rounds, 5) rounds).
Also checks that greedy outputs with base, adapter A and adapter B differ, and that both paths give the same ones.

    python scripts/bench_swap.py [--model smollm2_135m] [--rounds 20] [--device cpu]
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # models load offline only
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Give me one tip for staying focused while working."
MAX_NEW_TOKENS = 24


def log(msg: str) -> None:
    print(f"[bench_swap] {msg}", file=sys.stderr, flush=True)


def pct(samples_s: list[float]) -> tuple[float, float]:
    """(p50, p95) in milliseconds."""
    import numpy as np

    ms = np.asarray(samples_s, dtype=float) * 1000.0
    return round(float(np.percentile(ms, 50)), 4), round(float(np.percentile(ms, 95)), 4)


def attach_rounds(handle, dirs: dict, root: Path, rounds: int, resident: bool) -> list[float]:
    """Seconds per `apply_adapter` from disk over `rounds` rounds, each unloaded again (untimed). Nothing else
    resident, alternating A and B; or (`resident`) B attached next to a resident A."""
    from selfalign.runtime.loader import apply_adapter, unload_adapter

    if resident:
        apply_adapter(handle, dirs["A"], root=root, activate=False)
    seconds = []
    for i in range(rounds):
        name = "B" if resident else "AB"[i % 2]
        t = time.perf_counter()
        apply_adapter(handle, dirs[name], root=root, activate=False)
        seconds.append(time.perf_counter() - t)
        unload_adapter(handle, name)
    if resident:
        unload_adapter(handle, "A")
    return seconds


def run(model: str, rounds: int, device: str) -> dict:
    import torch
    from peft import PeftModel

    from selfalign.runtime.adapters import write_random_adapter
    from selfalign.runtime.generate import infer
    from selfalign.runtime.loader import apply_adapter, load_base, set_active, unload_adapter
    from selfalign.runtime.lora import DEFAULT_MAX_RANK

    log(f"loading {model} on {device}")
    t0 = time.perf_counter()
    handle = load_base(model, device=device)
    log(f"loaded in {time.perf_counter() - t0:.2f}s")

    with tempfile.TemporaryDirectory(prefix="bench_swap_") as tmp:
        root = Path(tmp)
        dirs = {
            "A": write_random_adapter(handle, root / "A", "A", r=16, seed=1),
            "B": write_random_adapter(handle, root / "B", "B", r=16, seed=2),
        }
        log(f"wrote random r=16 adapters to {root}")
        out_base = infer(handle, PROMPT, max_new_tokens=MAX_NEW_TOKENS)  # while nothing is attached

        # The slots' first attach allocates them (once per handle); every later attach is a copy.
        t = time.perf_counter()
        apply_adapter(handle, dirs["A"], root=root, activate=False)
        first_attach = time.perf_counter() - t
        unload_adapter(handle, "A")
        paths: dict[str, dict] = {}
        for path, max_rank in (("slots", DEFAULT_MAX_RANK), ("peft", 0)):  # max rank 0: every adapter takes PEFT's
            handle.slots.max_rank = max_rank
            paths[path] = {
                "alone": attach_rounds(handle, dirs, root, rounds, resident=False),
                "resident": attach_rounds(handle, dirs, root, rounds, resident=True),
            }
            log(f"{path}: attach p50 {pct(paths[path]['alone'])[0]:.1f} ms, p95 {pct(paths[path]['alone'])[1]:.1f} ms")
            apply_adapter(handle, dirs["A"], root=root, activate=False)
            apply_adapter(handle, dirs["B"], root=root, activate=False)
            assert (path == "peft") == bool(handle.peft), handle.peft
            paths[path]["outputs"] = {n: infer(handle, PROMPT, max_new_tokens=MAX_NEW_TOKENS, adapter=n) for n in "AB"}
            if path == "slots":
                switch: list[float] = []
                for i in range(rounds):
                    t = time.perf_counter()
                    set_active(handle, "AB"[i % 2])
                    switch.append(time.perf_counter() - t)
            unload_adapter(handle, "A")
            unload_adapter(handle, "B")
        out_base_after = infer(handle, PROMPT, max_new_tokens=MAX_NEW_TOKENS, adapter="base")

        # Naive: a fresh base plus PeftModel.from_pretrained per switch.
        naive_rounds = min(rounds, 5)
        naive: list[float] = []
        for i in range(naive_rounds):
            name = "AB"[i % 2]
            t = time.perf_counter()
            fresh = load_base(model, device=device)
            peft_model = PeftModel.from_pretrained(fresh.model, str(dirs[name]), adapter_name=name)
            naive.append(time.perf_counter() - t)
            del peft_model, fresh
        log(f"naive p50 {pct(naive)[0]:.1f} ms over {naive_rounds} rounds")

    slots, peft = paths["slots"], paths["peft"]
    naive_p50, naive_p95 = pct(naive)
    out_a, out_b = slots["outputs"]["A"], slots["outputs"]["B"]
    return {
        "model": model,
        "base_model_name": handle.name,
        "device": handle.device,
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds,
        "lora_r": 16,
        "first_attach_ms": round(first_attach * 1000, 1),
        "attach_ms_p50": pct(slots["alone"])[0],
        "attach_ms_p95": pct(slots["alone"])[1],
        "attach_with_resident_ms_p50": pct(slots["resident"])[0],
        "attach_with_resident_ms_p95": pct(slots["resident"])[1],
        "peft_attach_ms_p50": pct(peft["alone"])[0],
        "peft_attach_ms_p95": pct(peft["alone"])[1],
        "peft_attach_with_resident_ms_p50": pct(peft["resident"])[0],
        "peft_attach_with_resident_ms_p95": pct(peft["resident"])[1],
        "speedup_attach_p95_vs_peft": round(pct(peft["alone"])[1] / pct(slots["alone"])[1], 2),
        "switch_ms_p50": pct(switch)[0],
        "switch_ms_p95": pct(switch)[1],
        "naive_ms_p50": naive_p50,
        "naive_ms_p95": naive_p95,
        "naive_rounds": naive_rounds,
        "speedup_attach_vs_naive": round(naive_p50 / pct(slots["alone"])[0], 2),
        "prompt": PROMPT,
        "max_new_tokens": MAX_NEW_TOKENS,
        "outputs_differ": len({out_base, out_a, out_b}) == 3,
        "slots_answer_as_peft": slots["outputs"] == peft["outputs"],
        "base_unchanged_after_swaps": out_base_after == out_base,
        "outputs": {"base": out_base, "A": out_a, "B": out_b},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m", help="base model preset (default: smollm2_135m)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per measurement (default: 20)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    # Libraries print to fd 1 now and then; keep stdout for the one JSON object.
    real_stdout = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)
    from selfalign.errors import SelfAlignError

    try:
        result = run(args.model, args.rounds, args.device)
    except SelfAlignError as exc:
        log(f"error: {exc}")
        return 2
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)
    print(json.dumps(result, indent=2, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
