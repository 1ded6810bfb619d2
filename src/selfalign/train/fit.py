"""The one fitting path: a LightningModule and its DataModule -> Lightning fit with validation, early stopping,
resumable checkpoints and the best-validation adapter weights.

SFT (`train/sft.py`) and preference training (`train/preference.py`) build their module and data and hand them
here; run bookkeeping (versions, work dirs, run hashes) lives in `train/run.py`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, RichProgressBar
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from selfalign.config import TrainerConfig
from selfalign.errors import SelfAlignError
from selfalign.train.run import LAST_CKPT
from selfalign.utils.logging import EventLog


def _no_tips(record: logging.LogRecord) -> bool:
    """Lightning advertises its cloud products on every Trainer ("💡 Tip: ..."): noise in every training log."""
    return not str(record.msg).startswith("💡 Tip")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_tips)

METRICS_FILE = "train_metrics.jsonl"


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
        # the seed's fields first; a module's further numbers (preference rewards, margins) ride along
        if "val_loss" in values:
            extra = {k: v for k, v in values.items() if k.startswith("val_") and k != "val_loss"}
            self.events.event("validation", step=step, val_loss=values["val_loss"], **extra)
        else:
            extra = {k: v for k, v in values.items() if k.startswith("train_") and k != "train_loss"}
            self.events.event("train_step", step=step, loss=values.get("train_loss"), lr=values.get("lr"), **extra)
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

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
        if step == 0 or step == self.saved_step or step % self.every:  # step 0: nothing trained to keep yet
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
        # The whole training state (optimizer, scheduler, loops), said explicitly: Lightning logs "`weights_only`
        # was not set, defaulting to `False`" on every save otherwise. That line is about what is saved, not how
        # anything is loaded; a resume loads it with weights_only=True (`fit_adapter`).
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self.saved_step = trainer.global_step


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
    module: pl.LightningModule,
    data: pl.LightningDataModule,
    *,
    trainer_cfg: TrainerConfig,
    run_dir: str | Path,
    checkpoint_dir: str | Path,
    tracker,
    resume: bool = False,
    callbacks: tuple[Callback, ...] = (),
    oom_hint: str = ": lower lora.micro_batch_size or lora.max_seq_len",
) -> dict[str, float]:
    """Fit `module` on `data`; the module ends holding its best-validation adapter weights. Returns the run's
    numbers (val/train loss, steps, tokens). The module provides `adapter_state()` and `tokens_seen`. The caller
    seeds before it builds the model (LoRA init draws from the same generator as dropout)."""
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
                f"out of memory while training {oom_hint} (raise trainer.accumulate_grad_batches to keep the "
                "step size), or set lora.qlora=true on a GPU"
            ) from exc
        raise
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
    seconds = time.perf_counter() - start
    if best.weights is None:  # validation switched off (limit_val_batches=0): keep the final weights
        best.weights, best.best_step = module.adapter_state(), trainer.global_step
    module.load_state_dict(best.weights, strict=False)
    return {
        "val_loss": best.best_loss if best.best_loss < float("inf") else float("nan"),
        "best_step": best.best_step,
        "train_loss": float(final_train) if final_train is not None else float("nan"),
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "stopped_early": bool(stop.stopped_epoch),
        "train_tokens": module.tokens_seen,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(module.tokens_seen / max(seconds, 1e-9), 1),
    }
