"""LoRA/QLoRA SFT on Lightning: base + PEFT adapter -> fit with early stopping -> the best adapter weights.

`fit_adapter` is the recipe (read it top to bottom: seed, data, model, callbacks, logger, trainer, fit);
`stages/train.py` wraps it with the run's files, MLflow and the adapter registry, and `train_sft` is the
seed's function contract over the same code.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, RichProgressBar
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from selfalign.config import BaseModelConfig, LoraConfig, TrainerConfig
from selfalign.errors import SelfAlignError
from selfalign.train.data import SFTDataModule
from selfalign.train.module import LoRASFTModule
from selfalign.utils.hashing import sha256_file
from selfalign.utils.logging import EventLog

METRICS_FILE = "train_metrics.jsonl"
LAST_CKPT = "last.ckpt"


class RunLogger(Logger):
    """Lightning's metrics to the run's `train_metrics.jsonl` (seed §10 events) and to the MLflow run."""

    def __init__(self, run_dir: str | Path, tracker):
        super().__init__()
        self.events = EventLog(run_dir, METRICS_FILE)
        self.tracker = tracker

    @property
    def name(self) -> str:
        return "selfalign"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        values = {k: float(v) for k, v in metrics.items() if k != "epoch"}
        if not values:
            return
        if "val_loss" in values:
            self.events.event("validation", step=step, val_loss=values["val_loss"])
        else:
            self.events.event("train_step", step=step, loss=values.get("train_loss"), lr=values.get("lr"))
        self.tracker.metrics(values, step=step)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The flattened run config is logged as MLflow params when the run opens."""


class BestAdapter(Callback):
    """Keeps the adapter weights with the lowest validation loss; its state rides in every checkpoint."""

    def __init__(self) -> None:
        self.best_loss = float("inf")
        self.best_step = -1
        self.weights: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: LoRASFTModule) -> None:
        loss = trainer.callback_metrics.get("val_loss")
        if trainer.sanity_checking or loss is None or not float(loss) < self.best_loss:
            return
        self.best_loss, self.best_step = float(loss), trainer.global_step
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.adapter_state().items()}

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_step, self.weights = state["best_loss"], state["best_step"], state["weights"]


class ResumeCheckpoint(Callback):
    """`last.ckpt` every N optimizer steps, written atomically (a kill mid-write leaves the previous one).

    A step that ends an epoch is saved at the end of that epoch instead, after its validation, so a
    resumed run neither repeats nor skips a validation and reaches the same weights.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int):
        self.path = Path(dirpath) / LAST_CKPT
        self.every = every_n_steps
        self.saved_step = -1
        self.pending = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.saved_step or step % self.every:
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            self.pending = True
        else:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self.pending:
            self.pending = False
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self.saved_step = trainer.global_step


@dataclass
class FitResult:
    peft_model: Any
    tokenizer: Any
    template_hash: str
    base_name: str
    metrics: dict[str, float] = field(default_factory=dict)


def _training_device(lora: LoraConfig, trainer_cfg: TrainerConfig) -> str:
    """Where the base loads: CPU for Lightning to move, except QLoRA on GPU (bitsandbytes places it)."""
    if lora.qlora and trainer_cfg.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def build_peft_model(
    base_cfg: BaseModelConfig, lora: LoraConfig, trainer_cfg: TrainerConfig, cache_dir: str | None = None
):
    """The base (4-bit NF4 when `lora.qlora`) with a fresh LoRA adapter named `default`; and its handle."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    from selfalign.runtime.families import lora_target_modules
    from selfalign.runtime.loader import load_for_training

    handle = load_for_training(base_cfg, _training_device(lora, trainer_cfg), cache_dir=cache_dir, qlora=lora.qlora)
    model = handle.model
    checkpointing = lora.gradient_checkpointing
    if checkpointing is None:
        checkpointing = lora.qlora and torch.cuda.is_available()
    if lora.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        # non-reentrant: gradients reach the LoRA weights inside a block whose input needs no grad
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_modules(base_cfg.family, lora.targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config), handle


def reuse_host_memory() -> bool:
    """Make glibc keep freed memory for reuse: allocations under 1 GiB come from the heap, which is never
    trimmed. Left to its dynamic thresholds, glibc handed each CPU training step ~240k freshly mapped pages
    (page faults and zero-fill: 6.59 vs 5.55 s a step on SmolLM2, 2 cores). The cost is that the process
    keeps its peak heap until it exits. Returns False where this is not glibc (nothing is changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    settings = ((m_mmap_threshold, 1 << 30), (m_trim_threshold, 2**31 - 1), (m_top_pad, 64 << 20))
    return all(mallopt(option, value) == 1 for option, value in settings)


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(exc).lower()


def fit_adapter(
    rows: list[dict],
    *,
    base_cfg: BaseModelConfig,
    lora: LoraConfig,
    trainer_cfg: TrainerConfig,
    seed: int,
    run_dir: str | Path,
    checkpoint_dir: str | Path,
    tracker,
    cache_dir: str | None = None,  # None: the runtime's default model cache
    resume: bool = False,
    callbacks: tuple[Callback, ...] = (),
) -> FitResult:
    """Train one LoRA adapter on `rows`; returns the PEFT model holding the best-validation weights."""
    pl.seed_everything(seed, workers=True, verbose=False)
    if trainer_cfg.reuse_host_memory:
        reuse_host_memory()
    peft_model, handle = build_peft_model(base_cfg, lora, trainer_cfg, cache_dir)
    tokenizer = handle.tokenizer
    data = SFTDataModule(
        rows,
        tokenizer,
        max_seq_len=min(lora.max_seq_len, handle.context_window),
        micro_batch_size=lora.micro_batch_size,
        val_fraction=lora.val_fraction,
        seed=seed,
        policy_repeat=lora.policy_repeat,
    )
    module = LoRASFTModule(
        peft_model,
        lr=lora.lr,
        betas=(lora.beta1, lora.beta2),
        weight_decay=lora.weight_decay,
        warmup_ratio=lora.warmup_ratio,
        scheduler=lora.scheduler,
    )
    best = BestAdapter()
    periodic = ResumeCheckpoint(checkpoint_dir, trainer_cfg.checkpoint_every_n_steps)
    stop = EarlyStopping(
        monitor="val_loss",
        mode="min",
        patience=trainer_cfg.early_stop_patience,
        min_delta=trainer_cfg.early_stop_min_delta,
        check_finite=True,
        check_on_train_epoch_end=False,  # judge after each validation, never on an epoch cut short by max_steps
    )
    kwargs = trainer_cfg.lightning_kwargs()
    bar = [RichProgressBar(leave=True)] if kwargs.get("enable_progress_bar", True) else []
    trainer = pl.Trainer(
        **kwargs,
        default_root_dir=str(run_dir),
        logger=RunLogger(run_dir, tracker),
        callbacks=[best, periodic, stop, *bar, *callbacks],
        enable_model_summary=False,
        enable_checkpointing=False,  # ResumeCheckpoint above is the one checkpointing callback
    )
    last = Path(checkpoint_dir) / LAST_CKPT
    # The datamodule's state_dict makes mid-epoch resume exact (tested); Lightning only checks the loader.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # `trainer.deterministic` turned on torch's deterministic algorithms, which also NaN-fill every new
    # tensor (a guard for kernels that read uninitialised memory): 0.10 ms per 6 MB tensor on CPU, where
    # a step allocates thousands; same-seed weights stay bit-identical without it (tested).
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    start = time.perf_counter()
    try:
        # weights_only: a resume checkpoint holds tensors, numbers, strings and containers only (tested), so
        # torch's safe unpickler needs no allowlist; a file holding anything else is refused, never run.
        trainer.fit(module, datamodule=data, ckpt_path=str(last) if resume else None, weights_only=True)
        final_train = trainer.callback_metrics.get("train_loss")  # `validate` below clears callback_metrics
        if best.weights is None:  # stopped (max_steps) before any validation: validate the final weights
            trainer.validate(module, datamodule=data, verbose=False)
            best.on_validation_end(trainer, module)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1][:200]
        raise SelfAlignError(
            f"{last}: refused to load this resume checkpoint: it holds more than tensors and plain values ({reason}); "
            "delete it (or the unfinished run's folder) to start over"
        ) from None
    except Exception as exc:
        if _out_of_memory(exc):
            raise SelfAlignError(
                f"out of memory while training (micro-batch {lora.micro_batch_size}, max_seq_len {lora.max_seq_len}): "
                "lower lora.micro_batch_size or lora.max_seq_len (raise trainer.accumulate_grad_batches to keep the "
                "step size), or set lora.qlora=true on a GPU"
            ) from exc
        raise
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
    seconds = time.perf_counter() - start
    if best.weights is None:  # validation switched off (limit_val_batches=0): keep the final weights
        best.weights, best.best_step = module.adapter_state(), trainer.global_step
    module.load_state_dict(best.weights, strict=False)
    stats = data.stats
    metrics = {
        "val_loss": best.best_loss if best.best_loss < float("inf") else float("nan"),
        "best_step": best.best_step,
        "train_loss": float(final_train) if final_train is not None else float("nan"),
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "stopped_early": bool(stop.stopped_epoch),
        "train_tokens": module.tokens_seen,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(module.tokens_seen / max(seconds, 1e-9), 1),
        "rows": stats.rows,
        "rows_truncated": stats.truncated,
        "rows_dropped": stats.dropped,
    }
    return FitResult(peft_model, tokenizer, handle.template_hash, handle.name, metrics)


def adapter_manifest(
    result: FitResult,
    *,
    persona_id: str,
    persona_hash: str,
    version: str,
    base_cfg: BaseModelConfig,
    lora: LoraConfig,
    seed: int,
    dataset_sha256: str,
    **extra: Any,
) -> dict:
    """The seed's manifest plus provenance: persona, dataset, chat template and base-model revision."""
    from selfalign.runtime.adapters import build_manifest
    from selfalign.runtime.models import model_revision

    metrics = {k: result.metrics[k] for k in ("val_loss", "train_loss")}
    return build_manifest(
        persona_id,
        version,
        result.base_name,
        result.template_hash,
        {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets), "qlora": lora.qlora},
        seed,
        metrics=metrics,
        persona_hash=persona_hash,
        dataset_sha256=dataset_sha256,
        base_model_revision=model_revision(base_cfg),
        training={
            "lr": lora.lr,
            "scheduler": lora.scheduler,
            "warmup_ratio": lora.warmup_ratio,
            "betas": [lora.beta1, lora.beta2],
            "weight_decay": lora.weight_decay,
            "micro_batch_size": lora.micro_batch_size,
            "max_seq_len": lora.max_seq_len,
            **{
                k: result.metrics[k] for k in ("steps", "best_step", "epochs", "train_tokens", "rows", "rows_truncated")
            },
        },
        **extra,
    )


def train_sft(
    base_model_id: str,
    data_path: str,
    persona_yaml: str,
    out_dir: str,
    seed: int,
    use_qlora: bool = True,
) -> dict:
    """The seed's contract: train a LoRA/QLoRA adapter from JSONL SFT data into `out_dir` (adapter + manifest).

    Uses the recipe defaults (`conf/lora/default.yaml`, `conf/trainer/cpu.yaml` or `gpu.yaml`), no tracking,
    and returns the manifest.
    """
    import tempfile

    from selfalign.persona.schema import load_persona
    from selfalign.runtime.adapters import save_adapter
    from selfalign.runtime.loader import resolve_base_model
    from selfalign.tracking import Tracker
    from selfalign.train.data import load_sft_rows

    persona, persona_hash = load_persona(persona_yaml)
    base_cfg = resolve_base_model(base_model_id)
    lora = LoraConfig(qlora=use_qlora)
    gpu = torch.cuda.is_available()
    trainer_cfg = TrainerConfig(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        precision="bf16-mixed" if gpu else "32-true",
        accumulate_grad_batches=8 if gpu else 4,
        deterministic=not gpu,
        reuse_host_memory=not gpu,
    )
    rows = load_sft_rows(data_path, persona["id"])
    with tempfile.TemporaryDirectory(prefix="selfalign-train-") as work:
        result = fit_adapter(
            rows,
            base_cfg=base_cfg,
            lora=lora,
            trainer_cfg=trainer_cfg,
            seed=seed,
            run_dir=work,
            checkpoint_dir=Path(work) / "checkpoints",
            tracker=Tracker(None),
        )
    manifest = adapter_manifest(
        result,
        persona_id=persona["id"],
        persona_hash=persona_hash,
        version=Path(out_dir).name,
        base_cfg=base_cfg,
        lora=lora,
        seed=seed,
        dataset_sha256=sha256_file(data_path),
    )
    save_adapter(result.peft_model, "default", out_dir, manifest)
    return manifest
