"""Benchmark adapter hot-swap against the naive reload, on CPU by default.

Prints exactly one JSON object on stdout; progress goes to stderr. Measures, over `--rounds` rounds:
attaching an adapter from disk (`apply_adapter`, the adapter unloaded again between rounds), switching
the active adapter between two resident ones (`set_active`, and PEFT's own `set_adapter` for
comparison), and the naive way (a fresh `load_base` plus `PeftModel.from_pretrained`, min(rounds, 5)
rounds). Also checks that greedy outputs with base, adapter A and adapter B differ.

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


def run(model: str, rounds: int, device: str) -> dict:
    import torch
    from peft import PeftModel

    from selfalign.runtime.adapters import write_random_adapter
    from selfalign.runtime.loader import apply_adapter, infer, load_base, set_active, unload_adapter

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

        # Base output first, while nothing is attached.
        out_base = infer(handle, PROMPT, max_new_tokens=MAX_NEW_TOKENS)

        # Attach from disk: nothing resident, alternate A and B; unload after each (untimed).
        attach: list[float] = []
        for i in range(rounds):
            name = "AB"[i % 2]
            t = time.perf_counter()
            apply_adapter(handle, dirs[name], root=root)
            attach.append(time.perf_counter() - t)
            unload_adapter(handle, name)
        log(f"attach p50 {pct(attach)[0]:.1f} ms")

        # Attach from disk while another adapter is already resident (PEFT load_adapter path).
        apply_adapter(handle, dirs["A"], root=root, activate=False)
        attach_second: list[float] = []
        for _ in range(rounds):
            t = time.perf_counter()
            apply_adapter(handle, dirs["B"], root=root, activate=False)
            attach_second.append(time.perf_counter() - t)
            unload_adapter(handle, "B")
        apply_adapter(handle, dirs["B"], root=root, activate=False)

        # Switch between two resident adapters.
        switch: list[float] = []
        peft_switch: list[float] = []
        for i in range(rounds):
            name = "AB"[i % 2]
            t = time.perf_counter()
            set_active(handle, name)
            switch.append(time.perf_counter() - t)
            t = time.perf_counter()
            handle.model.set_adapter(name)
            peft_switch.append(time.perf_counter() - t)
        log(f"switch p50 {pct(switch)[0]:.4f} ms, peft set_adapter p50 {pct(peft_switch)[0]:.4f} ms")

        out_a = infer(handle, PROMPT, max_new_tokens=MAX_NEW_TOKENS, adapter="A")
        out_b = infer(handle, PROMPT, max_new_tokens=MAX_NEW_TOKENS, adapter="B")
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

    attach_p50, attach_p95 = pct(attach)
    naive_p50, naive_p95 = pct(naive)
    return {
        "model": model,
        "base_model_name": handle.name,
        "device": handle.device,
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds,
        "lora_r": 16,
        "attach_ms_p50": attach_p50,
        "attach_ms_p95": attach_p95,
        "attach_with_resident_ms_p50": pct(attach_second)[0],
        "attach_with_resident_ms_p95": pct(attach_second)[1],
        "switch_ms_p50": pct(switch)[0],
        "switch_ms_p95": pct(switch)[1],
        "peft_set_adapter_ms_p50": pct(peft_switch)[0],
        "peft_set_adapter_ms_p95": pct(peft_switch)[1],
        "naive_ms_p50": naive_p50,
        "naive_ms_p95": naive_p95,
        "naive_rounds": naive_rounds,
        "speedup_attach_vs_naive": round(naive_p50 / attach_p50, 2) if attach_p50 > 0 else None,
        "prompt": PROMPT,
        "max_new_tokens": MAX_NEW_TOKENS,
        "outputs_differ": len({out_base, out_a, out_b}) == 3,
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
