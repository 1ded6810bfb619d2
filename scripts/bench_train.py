"""Benchmark this project's Lightning LoRA trainer against a plain PEFT + transformers `Trainer` loop, in one run.

Same base model, same LoRA config, same tokenised rows (our chat rendering and label masks), same
micro-batch, optimizer settings and number of optimizer steps, no validation or checkpoint writes in
the timed part. Prints one JSON object with both tokens/s and the ratio (ours / baseline).

    python scripts/bench_train.py [--model smollm2_135m] [--steps 8] [--batch 4] [--rows 64]
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import contextlib
import json
import sys
import tempfile
import time
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

    from selfalign.config import LoraConfig, TrainerConfig
    from selfalign.runtime.loader import resolve_base_model
    from selfalign.tracking import Tracker
    from selfalign.train.sft import fit_adapter

    class Timer(pl.Callback):
        """Wall time and tokens per optimizer step (one micro-batch per step here)."""

        def on_train_start(self, trainer, module):
            self.marks = [(time.perf_counter(), module.tokens_seen)]

        def on_train_batch_end(self, trainer, module, *args):
            self.marks.append((time.perf_counter(), module.tokens_seen))

    timer = Timer()
    lora = LoraConfig(micro_batch_size=args.batch, max_seq_len=args.max_seq_len, val_fraction=0.05)
    trainer_cfg = TrainerConfig(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        accumulate_grad_batches=1,
        val_check_interval=10_000,
        checkpoint_every_n_steps=10_000,
        deterministic=not args.nondeterministic,
        extra={"limit_val_batches": 0, "enable_progress_bar": False},
    )
    with tempfile.TemporaryDirectory() as work:
        fit_adapter(
            data,
            base_cfg=resolve_base_model(args.model),
            lora=lora,
            trainer_cfg=trainer_cfg,
            seed=0,
            run_dir=work,
            checkpoint_dir=Path(work) / "ckpt",
            tracker=Tracker(None),
            cache_dir=os.environ.get("SELFALIGN_CACHE") or str(Path.home() / ".cache" / "selfalign"),
            callbacks=(timer,),
        )
    return steady(timer.marks, args.warmup)


def steady(marks: list[tuple[float, int]], warmup: int) -> dict:
    """Tokens/s over the steps after the first `warmup` (which pay for lazy allocation and first-touch costs)."""
    (t0, n0), (t1, n1) = marks[warmup], marks[-1]
    return {
        "timed_steps": len(marks) - 1 - warmup,
        "tokens": n1 - n0,
        "seconds": round(t1 - t0, 2),
        "tokens_per_s": round((n1 - n0) / (t1 - t0), 1),
    }


def baseline(args, data: list[dict]) -> dict:
    """PEFT + `transformers.Trainer` as its docs show, on the identical tokenised rows."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from selfalign.config import LoraConfig, TrainerConfig
    from selfalign.runtime.loader import resolve_base_model
    from selfalign.train.data import pad_batch, tokenize_row
    from selfalign.train.sft import build_peft_model

    lora = LoraConfig()
    model, handle = build_peft_model(
        resolve_base_model(args.model),
        lora,
        TrainerConfig(accelerator="cpu"),
        os.environ.get("SELFALIGN_CACHE") or str(Path.home() / ".cache" / "selfalign"),
    )
    tok = handle.tokenizer
    tokenized = [tokenize_row(tok, r, args.max_seq_len) for r in data]
    dataset = [{"input_ids": t["input_ids"], "labels": t["labels"]} for t in tokenized]
    tokens = {"n": 0}

    def count(module, args, kwargs):  # tokens the model actually trains on (the collator may run ahead)
        if module.training:
            tokens["n"] += int(kwargs["attention_mask"].sum())

    model.register_forward_pre_hook(count, with_kwargs=True)

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.marks = [(time.perf_counter(), tokens["n"])]

        def on_step_end(self, *a, **k):
            self.marks.append((time.perf_counter(), tokens["n"]))

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
            seed=0,
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
    parser.add_argument("--ours-first", action="store_true", help="run this trainer first (checks order bias)")
    parser.add_argument(
        "--nondeterministic", action="store_true", help="this trainer without trainer.deterministic (the cpu preset's)"
    )
    args = parser.parse_args()

    import torch

    data = rows(args.rows)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        if args.ours_first:
            mine, first = ours(args, data), baseline(args, data)
        else:
            first, mine = baseline(args, data), ours(args, data)
    result = {
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "steps": args.steps,
        "untimed_warmup_steps": args.warmup,
        "micro_batch": args.batch,
        "max_seq_len": args.max_seq_len,
        "order": "selfalign first" if args.ours_first else "baseline first",
        "selfalign_deterministic": not args.nondeterministic,
        "baseline_transformers_trainer": first,
        "selfalign_lightning": mine,
        "ratio": round(mine["tokens_per_s"] / first["tokens_per_s"], 3),
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
