"""Run bookkeeping shared by every training stage: the adapter's version and folder, the unfinished run's work dir,
the run hash that makes a finished adapter count as done, and publishing a fitted adapter (files, MLflow, registry).

Checkpoints live in `<adapter dir>.partial/` until the adapter is written; `resume=true` continues an
interrupted run from its last checkpoint, and the finished adapter replaces the partial dir atomically.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from selfalign.errors import SelfAlignError
from selfalign.runmode import sweep_job_label
from selfalign.utils.hashing import sha256_file
from selfalign.utils.io import read_json, write_json

RUN_STATE = "run.json"
LAST_CKPT = "last.ckpt"  # the resume checkpoint `train/fit.py` writes in a work dir's `checkpoints/`


def adapter_version(version: str, suffix_sweep_jobs: bool) -> str:
    """`version`; inside a sweep each job adds `+<sweep>.<job>` so jobs never overwrite each other."""
    label = sweep_job_label() if suffix_sweep_jobs else None
    return f"{version}+{label}" if label else version


def partial_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def checkpoint_dir(work: Path) -> Path:
    """Where an unfinished run in `work` keeps its resume checkpoint (`LAST_CKPT`)."""
    return work / "checkpoints"


def finished_run(out: Path, run_hash: str) -> dict | None:
    """The summary of the adapter at `out` when it was trained with exactly this config, else None."""
    manifest_file, weights = out / "manifest.json", out / "adapter_model.safetensors"
    if not (manifest_file.is_file() and weights.is_file()):
        return None
    manifest = read_json(manifest_file)
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


def prepare_work_dir(out: Path, run_hash: str, *, resume: bool, overwrite: bool, overwrite_key: str) -> bool:
    """Refuse to clobber a finished adapter or someone else's unfinished run; True when resuming.
    `overwrite_key` is the setting that allows replacing (`train.overwrite`), named in the refusals."""
    if out.exists() and not overwrite:
        raise SelfAlignError(
            f"{out} already holds an adapter of this version trained with another config; "
            f"pass {overwrite_key}=true to replace it or a new version to keep both"
        )
    work = partial_dir(out)
    state_file = work / RUN_STATE
    if work.exists():
        state = read_json(state_file) if state_file.exists() else {}
        last = checkpoint_dir(work) / LAST_CKPT
        if resume and state.get("run_hash") == run_hash and last.exists():
            return True
        if resume and state.get("run_hash") != run_hash:
            raise SelfAlignError(
                f"{work} is an unfinished run with another config or dataset; resume needs the same settings "
                f"(or pass {overwrite_key}=true to discard it)"
            )
        if not resume and not overwrite:
            raise SelfAlignError(
                f"{work} holds an unfinished training run; pass resume=true to continue it "
                f"or {overwrite_key}=true to start over"
            )
        shutil.rmtree(work)
    work.mkdir(parents=True)
    write_json({"run_hash": run_hash}, state_file)
    return False


def check_accelerator(trainer_cfg) -> None:
    """A trainer that asks for a GPU on a machine without one is one line, before any work dir is made."""
    if trainer_cfg.accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SelfAlignError(
                f"trainer.accelerator={trainer_cfg.accelerator} but no CUDA device is visible; use trainer=cpu"
            )


@contextlib.contextmanager
def discarded_unless_resumable(work: Path):
    """A run that fails before its first checkpoint leaves nothing to resume: its work dir is removed, so it does
    not block the next run. A run with a checkpoint keeps it for `resume=true`."""
    try:
        yield
    except BaseException:
        if not (checkpoint_dir(work) / LAST_CKPT).exists():
            shutil.rmtree(work, ignore_errors=True)
        raise


def publish_adapter(
    peft_model, manifest: dict, out: Path, tracker, *, register: bool, run_dir: str | Path, registry_tags: dict
) -> tuple[str, str | None]:
    """Save the adapter and its manifest at `out`, log it to the run, and register it (when asked and tracking is
    on); drop the unfinished run's work dir. Returns the weights' sha256 and the registry version."""
    from selfalign.runtime.adapters import save_adapter

    save_adapter(peft_model, "default", out, manifest)
    weights_sha = sha256_file(out / "adapter_model.safetensors")
    tracker.tags({"adapter_dir": str(out), "adapter_sha256": weights_sha})
    tracker.artifacts(out, "adapter")
    tracker.artifact(Path(run_dir) / "train_metrics.jsonl")
    registry_version = None
    if register:
        registry_version = tracker.register(
            manifest["adapter_id"], "adapter", registry_tags | {"adapter_sha256": weights_sha}
        )
        if registry_version:
            manifest["registry"] = {"name": manifest["adapter_id"], "version": registry_version}
            write_json(manifest, out / "manifest.json")
    shutil.rmtree(partial_dir(out), ignore_errors=True)
    return weights_sha, registry_version
