"""LoRA/QLoRA SFT on Lightning: base + a fresh PEFT adapter + the SFT rows -> the best adapter weights.

`train_adapter` is the recipe (read it top to bottom: seed, model, data, module, fit); the fitting itself is
`train/fit.py`'s, shared with preference training. `stages/train.py` wraps it with the run's files, MLflow and the
adapter registry, and `train_sft` is the seed's function contract over the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from selfalign.config import BaseModelConfig, LoraConfig, TrainerConfig
from selfalign.train.data import SFTDataModule
from selfalign.train.fit import fit_adapter, reuse_host_memory
from selfalign.train.module import LoRASFTModule
from selfalign.utils.hashing import sha256_file


@dataclass
class FitResult:
    peft_model: Any
    tokenizer: Any
    template_hash: str
    base_name: str
    metrics: dict[str, float] = field(default_factory=dict)


def training_device(qlora: bool, trainer_cfg: TrainerConfig) -> str:
    """Where the base loads: CPU for Lightning to move, except QLoRA on GPU (bitsandbytes places it)."""
    if qlora and trainer_cfg.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
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

    device = training_device(lora.qlora, trainer_cfg)
    handle = load_for_training(base_cfg, device, cache_dir=cache_dir, qlora=lora.qlora)
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


def train_adapter(
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
    """The SFT recipe: seed, a fresh LoRA on the base, the SFT data, fit; returns the best-validation adapter."""
    pl.seed_everything(seed, workers=True, verbose=False)
    if trainer_cfg.reuse_host_memory:
        reuse_host_memory()
    peft_model, handle = build_peft_model(base_cfg, lora, trainer_cfg, cache_dir)
    data = SFTDataModule(
        rows,
        handle.tokenizer,
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
    metrics = fit_adapter(
        module,
        data,
        trainer_cfg=trainer_cfg,
        run_dir=run_dir,
        checkpoint_dir=checkpoint_dir,
        tracker=tracker,
        resume=resume,
        callbacks=callbacks,
        oom_hint=f"(micro-batch {lora.micro_batch_size}, max_seq_len {lora.max_seq_len}): lower lora.micro_batch_size "
        "or lora.max_seq_len",
    )
    stats = data.stats
    metrics |= {"rows": stats.rows, "rows_truncated": stats.truncated, "rows_dropped": stats.dropped}
    return FitResult(peft_model, handle.tokenizer, handle.template_hash, handle.name, metrics)


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

    The recipe is the one `stage=train` composes from the YAML presets (`conf/lora/default.yaml` or `qlora.yaml`,
    `conf/trainer/cpu.yaml` or `gpu.yaml`, the base model's own `lora_lr`); no tracking. Returns the manifest.
    """
    import tempfile

    from selfalign.config import compose_typed
    from selfalign.persona.schema import load_persona
    from selfalign.runtime.adapters import save_adapter
    from selfalign.runtime.loader import preset_stem
    from selfalign.tracking import Tracker
    from selfalign.train.data import load_sft_rows

    persona, persona_hash = load_persona(persona_yaml)
    trainer = "gpu" if torch.cuda.is_available() else "cpu"
    recipe = "qlora" if use_qlora else "default"
    cfg = compose_typed([f"base_model={preset_stem(base_model_id)}", f"trainer={trainer}", f"lora={recipe}"])
    base_cfg, lora, trainer_cfg = cfg.base_model, cfg.lora, cfg.trainer
    rows = load_sft_rows(data_path, persona["id"])
    with tempfile.TemporaryDirectory(prefix="selfalign-train-") as work:
        result = train_adapter(
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
