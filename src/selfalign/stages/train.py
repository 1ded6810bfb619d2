"""`stage=train`: SFT JSONL -> `adapters/<persona-id>/<version>/` (safetensors + manifest), MLflow run, registry.

Checkpoints live in `<adapter dir>.partial/` until the adapter is written; `resume=true` continues an
interrupted run from its last checkpoint, and the finished adapter replaces the partial dir atomically.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from selfalign.config import SelfAlignConfig, git_short_sha
from selfalign.errors import SelfAlignError
from selfalign.persona.schema import load_persona
from selfalign.runmode import sweep_job_label
from selfalign.tracking import tracked_run
from selfalign.utils.console import console
from selfalign.utils.hashing import sha256_file, sha256_json
from selfalign.utils.io import write_json
from selfalign.utils.logging import EventLog

RUN_STATE = "run.json"


def adapter_version(cfg: SelfAlignConfig) -> str:
    """`train.version`; inside a sweep each job adds `+<sweep>.<job>` so jobs never overwrite each other."""
    label = sweep_job_label() if cfg.train.suffix_sweep_jobs else None
    return f"{cfg.train.version}+{label}" if label else cfg.train.version


def adapter_dir(cfg: SelfAlignConfig, persona_id: str) -> Path:
    return Path(cfg.paths.adapters_dir) / persona_id / adapter_version(cfg)


def partial_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


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


def finished_run(out: Path, run_hash: str) -> dict | None:
    """The summary of the adapter at `out` when it was trained with exactly this config, else None."""
    manifest_file, weights = out / "manifest.json", out / "adapter_model.safetensors"
    if not (manifest_file.is_file() and weights.is_file()):
        return None
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("run_hash") != run_hash:
        return None
    return {
        "adapter_dir": str(out),
        "adapter_version": manifest["version"],
        "adapter_sha256": sha256_file(weights),
        "registry_version": (manifest.get("registry") or {}).get("version"),
        "objective": manifest["metrics"]["val_loss"],
        "val_loss": manifest["metrics"]["val_loss"],
        "train_loss": manifest["metrics"]["train_loss"],
    }


def prepare_work_dir(out: Path, run_hash: str, *, resume: bool, overwrite: bool) -> bool:
    """Refuse to clobber a finished adapter or someone else's unfinished run; True when resuming."""
    if out.exists() and not overwrite:
        raise SelfAlignError(
            f"{out} already holds an adapter of this version trained with another config; "
            "pass train.overwrite=true to replace it "
            "or train.version=<next> to keep both"
        )
    work = partial_dir(out)
    state_file = work / RUN_STATE
    if work.exists():
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        last = work / "checkpoints" / "last.ckpt"
        if resume and state.get("run_hash") == run_hash and last.exists():
            return True
        if resume and state.get("run_hash") != run_hash:
            raise SelfAlignError(
                f"{work} is an unfinished run with another config or dataset; resume needs the same settings "
                "(or pass train.overwrite=true to discard it)"
            )
        if not resume and not overwrite:
            raise SelfAlignError(
                f"{work} holds an unfinished training run; pass resume=true to continue it "
                "or train.overwrite=true to start over"
            )
        shutil.rmtree(work)
    work.mkdir(parents=True)
    write_json({"run_hash": run_hash}, state_file)
    return False


def run(cfg: SelfAlignConfig, callbacks: tuple = ()) -> dict:
    from selfalign.runtime.adapters import save_adapter
    from selfalign.train.data import load_sft_rows
    from selfalign.train.sft import adapter_manifest, fit_adapter

    persona, persona_hash = load_persona(cfg.persona.path)
    data = Path(cfg.data).resolve()
    rows = load_sft_rows(data, persona["id"])
    data_sha = sha256_file(data)
    version = adapter_version(cfg)
    out = adapter_dir(cfg, persona["id"])
    run_hash = training_run_hash(cfg, data_sha, persona_hash)
    done = None if cfg.train.overwrite else finished_run(out, run_hash)
    if done:
        console.print(f"[green]train:[/] {out} already holds this exact run (same data, config, seed); skipped")
        EventLog(cfg.paths.run_dir).event("train_skip", **done)
        return {"passed": True, "skipped": True, **done}
    resuming = prepare_work_dir(out, run_hash, resume=cfg.resume, overwrite=cfg.train.overwrite)
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
    with tracked_run(cfg.tracking, run_name=f"train-{persona['id']}-{version}", tags=tags, params=params) as tracker:
        result = fit_adapter(
            rows,
            base_cfg=cfg.base_model,
            lora=cfg.lora,
            trainer_cfg=cfg.trainer,
            seed=cfg.seed,
            run_dir=cfg.paths.run_dir,
            checkpoint_dir=work / "checkpoints",
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
        save_adapter(result.peft_model, "default", out, manifest)
        weights_sha = sha256_file(out / "adapter_model.safetensors")
        totals = {k: float(v) for k, v in result.metrics.items() if k not in ("val_loss", "train_loss")}
        tracker.metrics(totals | {"best_val_loss": result.metrics["val_loss"]})  # the histories keep their names
        tracker.tags({"adapter_dir": str(out), "adapter_sha256": weights_sha})
        tracker.artifacts(out, "adapter")
        tracker.artifact(Path(cfg.paths.run_dir) / "train_metrics.jsonl")
        registry_version = None
        if cfg.train.register:
            registry_version = tracker.register(
                persona["id"],
                "adapter",
                {"adapter_version": version, "persona_hash": persona_hash, "adapter_sha256": weights_sha},
            )
            if registry_version:
                manifest["registry"] = {"name": persona["id"], "version": registry_version}
                write_json(manifest, out / "manifest.json")
    shutil.rmtree(work, ignore_errors=True)
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
