"""`stage=train`: SFT JSONL -> `adapters/<persona-id>/<version>/` (safetensors + manifest), MLflow run, registry.

The recipe is `train/sft.py`; the run's bookkeeping (work dir, resume, publishing) is `train/run.py`'s.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from selfalign.config import SelfAlignConfig, git_short_sha
from selfalign.persona.schema import load_persona
from selfalign.tracking import tracked_run
from selfalign.train.run import (
    adapter_version,
    check_accelerator,
    checkpoint_dir,
    discarded_unless_resumable,
    finished_run,
    partial_dir,
    prepare_work_dir,
    publish_adapter,
)
from selfalign.utils.console import console
from selfalign.utils.hashing import sha256_file, sha256_json
from selfalign.utils.io import write_json
from selfalign.utils.logging import EventLog


def adapter_dir(cfg: SelfAlignConfig, persona_id: str) -> Path:
    return Path(cfg.paths.adapters_dir) / persona_id / adapter_version(cfg.train.version, cfg.train.suffix_sweep_jobs)


def training_run_hash(cfg: SelfAlignConfig, data_sha: str, persona_hash: str) -> str:
    """What makes two training runs the same run: an adapter trained with it is not trained again."""
    recipe = asdict(cfg.lora)
    if recipe["policy_repeat"] == 1:  # at its neutral value it hashes as before it existed: older adapters still match
        del recipe["policy_repeat"]
    return sha256_json(
        {
            "data": data_sha,
            "persona": persona_hash,
            "base_model": asdict(cfg.base_model),
            "lora": recipe,
            "trainer": cfg.trainer.lightning_kwargs(),
            "seed": cfg.seed,
        }
    )


def run(cfg: SelfAlignConfig, callbacks: tuple = ()) -> dict:
    from selfalign.train.data import load_sft_rows
    from selfalign.train.sft import adapter_manifest, train_adapter

    persona, persona_hash = load_persona(cfg.persona.path)
    data = Path(cfg.data).resolve()
    rows = load_sft_rows(data, persona["id"])
    data_sha = sha256_file(data)
    version = adapter_version(cfg.train.version, cfg.train.suffix_sweep_jobs)
    out = adapter_dir(cfg, persona["id"])
    run_hash = training_run_hash(cfg, data_sha, persona_hash)
    done = None if cfg.train.overwrite else finished_run(out, run_hash)
    if done:
        console.print(f"[green]train:[/] {out} already holds this exact run (same data, config, seed); skipped")
        EventLog(cfg.paths.run_dir).event("train_skip", **done)
        return {"passed": True, "skipped": True, **done}
    check_accelerator(cfg.trainer)
    resuming = prepare_work_dir(
        out, run_hash, resume=cfg.resume, overwrite=cfg.train.overwrite, overwrite_key="train.overwrite"
    )
    work = partial_dir(out)
    events = EventLog(cfg.paths.run_dir)
    events.event("train_start", persona_id=persona["id"], rows=len(rows), dataset_sha256=data_sha, resume=resuming)
    tags = {
        "stage": "train",
        "persona_id": persona["id"],
        "persona_hash": persona_hash,
        "dataset_sha256": data_sha,
        "base_model": cfg.base_model.name,
        "git_sha": git_short_sha(),
        "run_dir": cfg.paths.run_dir,
        "adapter_version": version,
    }
    params = {
        "lora": asdict(cfg.lora),
        "trainer": cfg.trainer.lightning_kwargs() | {"early_stop_patience": cfg.trainer.early_stop_patience},
        "base_model": cfg.base_model.name,
        "persona": cfg.persona.name,
        "data": str(data),
        "seed": cfg.seed,
        "version": version,
    }
    with (
        discarded_unless_resumable(work),
        tracked_run(cfg.tracking, run_name=f"train-{persona['id']}-{version}", tags=tags, params=params) as tracker,
    ):
        tracker.dataset(data, f"sft-{persona['id']}", "training")
        result = train_adapter(
            rows,
            base_cfg=cfg.base_model,
            lora=cfg.lora,
            trainer_cfg=cfg.trainer,
            seed=cfg.seed,
            run_dir=cfg.paths.run_dir,
            checkpoint_dir=checkpoint_dir(work),
            tracker=tracker,
            cache_dir=cfg.paths.cache_dir,
            resume=resuming,
            callbacks=callbacks,
        )
        manifest = adapter_manifest(
            result,
            persona_id=persona["id"],
            persona_hash=persona_hash,
            version=version,
            base_cfg=cfg.base_model,
            lora=cfg.lora,
            seed=cfg.seed,
            dataset_sha256=data_sha,
            run_hash=run_hash,
            mlflow_run_id=tracker.run_id,
        )
        totals = {k: float(v) for k, v in result.metrics.items() if k not in ("val_loss", "train_loss")}
        tracker.metrics(totals | {"best_val_loss": result.metrics["val_loss"]})  # the histories keep their names
        weights_sha, registry_version = publish_adapter(
            result.peft_model,
            manifest,
            out,
            tracker,
            register=cfg.train.register,
            run_dir=cfg.paths.run_dir,
            registry_tags={"adapter_version": version, "persona_hash": persona_hash},
        )
    summary = {
        "adapter_dir": str(out),
        "adapter_sha256": weights_sha,
        "adapter_version": version,
        "registry_version": registry_version,
        "objective": result.metrics["val_loss"],
        **result.metrics,
    }
    write_json(summary, Path(cfg.paths.run_dir) / "train_summary.json")
    events.event("train_done", **summary)
    m = result.metrics
    console.print(
        f"[green]train:[/] {persona['id']} {version} -> {out}\n"
        f"  val_loss {m['val_loss']:.4f} (best at step {m['best_step']}), {m['steps']} steps, "
        f"{m['train_tokens']} tokens at {m['tokens_per_s']:.0f} tok/s, "
        f"{m['rows_truncated']} of {m['rows']} rows truncated"
        + (f", registry version {registry_version}" if registry_version else "")
    )
    return {"passed": True, **summary}
