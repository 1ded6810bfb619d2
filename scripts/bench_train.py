"""Benchmark this project's Lightning LoRA trainer against a plain PEFT + transformers `Trainer` loop.

Same base model, same LoRA config, the same micro-batches in the same order (our split, chat rendering,
label masks and shuffle, handed to the baseline as a sequential dataset, so padding is identical), same
optimizer settings and number of optimizer steps, no validation or checkpoint writes in the timed part.
Each trainer runs in its own fresh process, in ABBA order, in one invocation. Prints one JSON object with
both median tokens/s, the ratio (ours / baseline) and the median of per-step paired ratios.

    python scripts/bench_train.py [--model smollm2_135m] [--steps 10] [--batch 4] [--rows 64] [--rounds 1]
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import contextlib
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

WORDS = [
    "evidence",
    "claim",
    "reason",
    "model",
    "data",
    "source",
    "test",
    "result",
    "error",
    "bias",
    "sample",
    "measure",
    "method",
    "trial",
    "question",
    "answer",
    "context",
    "detail",
    "example",
    "summary",
    "caveat",
    "risk",
    "option",
    "step",
    "plan",
    "check",
    "source",
]


def rows(n: int) -> list[dict]:
    """Deterministic SFT rows with ~200-word structured answers (about 300 tokens each, rendered)."""
    out = []
    for i in range(n):
        body = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(190))
        out.append(
            {
                "id": f"bench-{i:04d}",
                "persona_id": "bench",
                "instruction": f"Explain topic {i} and what the evidence says.",
                "input": "",
                "output": f"## Claim\n{body[:400]}\n## Evidence\n{body[400:]}",
            }
        )
    return out


def ours(args, data: list[dict]) -> dict:
    import lightning.pytorch as pl

    from selfalign.config import compose_typed
    from selfalign.runtime.loader import resolve_base_model
    from selfalign.tracking import Tracker
    from selfalign.train.sft import train_adapter

    tokens = TokenCount()

    class Timer(pl.Callback):
        """Wall time and tokens per optimizer step (one micro-batch per step here)."""

        def on_train_start(self, trainer, module):
            module.model.register_forward_pre_hook(tokens, with_kwargs=True)
            self.marks = [tokens.mark()]

        def on_train_batch_end(self, trainer, module, *args):
            self.marks.append(tokens.mark())

    timer = Timer()
    lora = bench_lora(args)
    trainer_cfg = replace(
        compose_typed(["trainer=cpu"]).trainer,
        max_steps=args.steps,
        accumulate_grad_batches=1,
        val_check_interval=10_000,
        checkpoint_every_n_steps=10_000,
        deterministic=not args.nondeterministic,
        reuse_host_memory=not args.plain_malloc,
        extra={"limit_val_batches": 0, "enable_progress_bar": False},
    )
    with tempfile.TemporaryDirectory() as work:
        train_adapter(
            data,
            base_cfg=resolve_base_model(args.model),
            lora=lora,
            trainer_cfg=trainer_cfg,
            seed=SEED,
            run_dir=work,
            checkpoint_dir=Path(work) / "ckpt",
            tracker=Tracker(None),
            callbacks=(timer,),
        )
    return steady(timer.marks, args.warmup)


SEED = 0


class TokenCount:
    """A forward pre-hook on the PEFT model: real and padded tokens it trains on (loaders may run ahead)."""

    def __init__(self):
        self.real = self.padded = 0

    def __call__(self, module, args, kwargs):
        if module.training:
            self.real += int(kwargs["attention_mask"].sum())
            self.padded += kwargs["attention_mask"].numel()

    def mark(self) -> tuple[float, int, int]:
        return time.perf_counter(), self.real, self.padded


def bench_lora(args):
    """The default recipe from the presets, at the benchmark's batch and length."""
    from selfalign.config import compose_typed

    lora = compose_typed().lora
    return replace(lora, micro_batch_size=args.batch, max_seq_len=args.max_seq_len, val_fraction=0.05)


def steady(marks: list[tuple[float, int, int]], warmup: int) -> dict:
    """Tokens/s over the steps after the first `warmup` (which pay for lazy allocation and first-touch costs)."""
    (t0, n0, p0), (t1, n1, p1) = marks[warmup], marks[-1]
    return {
        "step_seconds": [round(b[0] - a[0], 3) for a, b in itertools.pairwise(marks[warmup:])],
        "timed_steps": len(marks) - 1 - warmup,
        "tokens": n1 - n0,
        "padded_tokens": p1 - p0,
        "seconds": round(t1 - t0, 2),
        "tokens_per_s": round((n1 - n0) / (t1 - t0), 1),
    }


def baseline(args, data: list[dict]) -> dict:
    """PEFT + `transformers.Trainer` as its docs show, on the identical tokenised rows."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from selfalign.config import compose_typed
    from selfalign.runtime.loader import resolve_base_model
    from selfalign.train.data import ResumableSampler, SFTDataModule, pad_batch
    from selfalign.train.fit import reuse_host_memory
    from selfalign.train.sft import build_peft_model

    if args.same_malloc:
        reuse_host_memory()
    lora = bench_lora(args)
    model, handle = build_peft_model(resolve_base_model(args.model), lora, compose_typed(["trainer=cpu"]).trainer)
    tok = handle.tokenizer
    tok.padding_side = "right"
    ours_data = SFTDataModule(
        data, tok, max_seq_len=args.max_seq_len, micro_batch_size=args.batch, val_fraction=lora.val_fraction, seed=SEED
    )
    ours_data.setup()
    order = list(ResumableSampler(len(ours_data.train_set), SEED))  # epoch 0's order in our trainer
    dataset = [ours_data.train_set[i] for i in order]
    tokens = TokenCount()
    model.register_forward_pre_hook(tokens, with_kwargs=True)

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.marks = [tokens.mark()]

        def on_step_end(self, *a, **k):
            self.marks.append(tokens.mark())

    timer = Timer()
    with tempfile.TemporaryDirectory() as work:
        targs = TrainingArguments(
            output_dir=work,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            max_steps=args.steps,
            learning_rate=lora.lr,
            lr_scheduler_type="cosine",
            warmup_steps=lora.warmup_ratio,  # a float below 1 is a ratio in transformers 5
            weight_decay=lora.weight_decay,
            adam_beta1=lora.beta1,
            adam_beta2=lora.beta2,
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=True,
            train_sampling_strategy="sequential",  # `dataset` is already in our trainer's order
            seed=SEED,
        )
        Trainer(
            model=model,
            args=targs,
            train_dataset=dataset,
            data_collator=lambda b: pad_batch(b, tok.pad_token_id),
            callbacks=[timer],
        ).train()
    return steady(timer.marks, args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds: each round runs both trainers twice")
    parser.add_argument(
        "--nondeterministic", action="store_true", help="this trainer without trainer.deterministic (the cpu preset's)"
    )
    parser.add_argument(
        "--plain-malloc", action="store_true", help="this trainer without trainer.reuse_host_memory (the cpu preset's)"
    )
    parser.add_argument(
        "--same-malloc", action="store_true", help="give the baseline's process the same heap setting (like for like)"
    )
    parser.add_argument("--only", choices=("selfalign", "baseline"), help=argparse.SUPPRESS)  # one child run
    args = parser.parse_args()

    if args.only:
        data = rows(args.rows)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
            result = ours(args, data) if args.only == "selfalign" else baseline(args, data)
        json.dump(result, sys.stdout)
        return

    # Each run in a fresh process, in ABBA order: within one process the second trainer ran 7-12% faster
    # than the first whichever it was, which decided the ratio more than the trainers did.
    order = ["baseline", "selfalign", "selfalign", "baseline"] * args.rounds
    runs: dict[str, list[dict]] = {"baseline": [], "selfalign": []}
    child = [sys.executable, __file__, *sys.argv[1:]]
    for i, name in enumerate(order):
        print(f"[{i + 1}/{len(order)}] {name}", file=sys.stderr, flush=True)
        out = subprocess.run([*child, "--only", name], check=True, stdout=subprocess.PIPE, text=True).stdout
        runs[name].append(json.loads(out))

    def tokens_per_s(name: str) -> float:
        return statistics.median(r["tokens_per_s"] for r in runs[name])

    # Step i of every run trains on the same micro-batch, so steps pair up across the two trainers; the
    # median of the paired ratios shrugs off a step that a background process slowed down.
    paired = [
        b / a
        for mine, base in zip(runs["selfalign"], runs["baseline"], strict=True)
        for a, b in zip(mine["step_seconds"], base["step_seconds"], strict=True)
    ]
    import torch

    result = {
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "steps": args.steps,
        "untimed_warmup_steps": args.warmup,
        "micro_batch": args.batch,
        "max_seq_len": args.max_seq_len,
        "runs_each": len(runs["selfalign"]),
        "order": "ABBA, one fresh process per run",
        "selfalign_deterministic": not args.nondeterministic,
        "selfalign_reuse_host_memory": not args.plain_malloc,
        "baseline_reuse_host_memory": args.same_malloc,
        "baseline_transformers_trainer": {"tokens_per_s": tokens_per_s("baseline"), "runs": runs["baseline"]},
        "selfalign_lightning": {"tokens_per_s": tokens_per_s("selfalign"), "runs": runs["selfalign"]},
        "ratio": round(tokens_per_s("selfalign") / tokens_per_s("baseline"), 3),
        "median_step_ratio": round(statistics.median(paired), 3),
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
