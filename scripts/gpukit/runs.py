"""The `python -m selfalign` command lines the check runs, and the numbers it reads back from their run dirs."""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from datetime import datetime
from pathlib import Path

from gpukit.procs import ROOT


def selfalign(stage: str, preset: str, models: Path, root: Path, *extra: str, adapters: Path | None = None) -> list:
    """`stage` on a conf/base_model preset whose weights are the random model of its shape under `models`.
    Only what a user with a local copy of the model would override changes: that it is local and where, its name
    (so no manifest claims the real model) and, for the CPU preset, the GPU's dtype."""
    base = [
        f"base_model={preset}",
        "base_model.source=local",
        f"base_model.path={models / preset}",
        f"base_model.name={preset}-shape-random",
        "base_model.dtype=bfloat16",
    ]
    paths = [
        f"paths.output_dir={root}/outputs",
        f"paths.adapters_dir={adapters or root / 'adapters'}",
        f"paths.reports_dir={root}/reports",
        f"paths.cache_dir={root}/cache",
        f"paths.data_dir={root}/data",
        f"paths.mlruns_dir={root}/mlruns",
        f"hydra.run.dir={root}/run",
    ]
    head = [sys.executable, "-m", "selfalign", f"stage={stage}", "tracking=none", "persona=neutral_concise", "seed=42"]
    return [*head, *base, *paths, *extra]


def trainer(steps: int, dry: bool, extra: list[str]) -> list[str]:
    """`trainer=gpu` for `steps` optimizer steps (a dry run: `trainer=cpu` at the GPU preset's precision)."""
    preset = ["trainer=cpu", "trainer.precision=bf16-mixed"] if dry else ["trainer=gpu"]
    common = [f"trainer.max_steps={steps}", "trainer.max_epochs=20", "trainer.accumulate_grad_batches=1"]
    return [*preset, *common, "trainer.log_every_n_steps=1", "+trainer.extra.enable_progress_bar=false", *extra]


def _ts(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def train_numbers(run_dir: Path) -> dict:
    """What a training run wrote: its summary, the loss per step and the steady seconds per step."""
    out: dict = {}
    summary = run_dir / "train_summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        keep = ("steps", "epochs", "seconds", "tokens_per_s", "train_tokens", "val_loss", "train_loss", "rows")
        out |= {k: s.get(k) for k in keep}
    metrics = run_dir / "train_metrics.jsonl"
    if metrics.is_file():
        events = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        steps = [e for e in events if e["event"] == "train_step"]
        out["losses"] = [None if e.get("loss") is None else round(e["loss"], 4) for e in steps]
        out["val_losses"] = [round(e["val_loss"], 4) for e in events if e["event"] == "validation"]
        deltas = [b - a for a, b in itertools.pairwise(_ts(e["ts"]) for e in steps)]
        if len(deltas) >= 3:
            per_step = statistics.median(deltas[1:])  # the first step pays for warm-up; validations are outliers
            out["s_per_step_median"] = round(per_step, 4)
            if out.get("train_tokens") and out.get("steps"):
                out["tokens_per_step"] = round(out["train_tokens"] / out["steps"], 1)
                out["steady_tokens_per_s"] = round(out["tokens_per_step"] / per_step, 1)
    return out


def prefer_numbers(run_dir: Path) -> dict:
    """What a preference run wrote: its summary (pairs, losses, held-out discrimination) and its steps."""
    out = train_numbers(run_dir)
    summary = run_dir / "prefer_summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        out |= {k: s.get(k) for k in ("steps", "val_loss", "train_loss", "rows", "heldout_roc_auc", "adapter_sha256")}
        out["pairs_dropped"] = (s.get("pairs") or {}).get("dropped")
    return out


def eval_numbers(report_file: Path) -> dict:
    """The first adapter's attach time, speed and gates from an eval report (random weights: gates fail).
    Read as JSON: this runs in the parent, which imports nothing of the project."""
    if not report_file.is_file():
        return {}
    report = json.loads(report_file.read_text())
    out = {"n_prompts": (report.get("evalset") or {}).get("n"), "base_speed": report["base"]["speed"]}
    if report["adapters"]:
        a = report["adapters"][0]
        out |= {"attach_ms": a["attach_ms"], "adapter_speed": a["speed"], "gates_passed": a["gates"]["passed"]}
    return out


def eval_set(size: str, work: Path) -> list[str]:
    """The eval overrides: `full`, the Golden 100 and the policy set as a user runs them; `small`, a stratified
    24-prompt slice of the Golden 100 as a custom set (the eval accepts no other file as `eval.golden`) and no
    policy set."""
    if size == "full":
        return []
    src = ROOT / "golden" / "golden_v0.jsonl"
    rows = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    chosen = []
    for cat, n in {"style": 8, "qa": 4, "safety": 4, "neutrality": 4}.items():
        chosen += [r for r in rows if r["tags"][0] == cat][:n]
    for tag in ("should-refuse", "should-answer"):
        chosen += [r for r in rows if r["tags"][0] == "refusal" and tag in r["tags"]][:2]
    dest = work / "golden_small.jsonl"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
    return [f"eval.custom_set={dest}", "eval.policy=null"]
