"""Preference training on Lightning: the persona's SFT adapter, trained further on chosen/rejected pairs.

`train_preference` is the recipe (seed, model from the SFT adapter, pairs, reference log-probs once, module, fit);
the loss is `train/losses.py`'s and the fitting `train/fit.py`'s. The reference model is the SFT adapter itself: the
trained adapter starts from it, so its log-probs of every pair are computed once, before the first step, with the
adapter in eval mode (no dropout) and stored beside the pair.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from selfalign.config import BaseModelConfig, PreferConfig, TrainerConfig
from selfalign.errors import SelfAlignError
from selfalign.runtime.chat import render_example
from selfalign.runtime.scoring import sequence_logps
from selfalign.train.data import ResumableBatches
from selfalign.train.fit import fit_adapter, reuse_host_memory
from selfalign.train.losses import preference_loss
from selfalign.train.module import LoRASFTModule
from selfalign.train.sft import FitResult, training_device


def tokenize_answer(tokenizer, prompt: str, answer: str, max_len: int) -> tuple[list[int], int]:
    """Token ids of prompt + answer (cut at `max_len`) and where the answer starts."""
    head, full = render_example(tokenizer, prompt, answer)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    if start >= max_len:
        raise SelfAlignError(f"a pair's prompt is longer than lora.max_seq_len={max_len} tokens; raise it")
    return ids[:max_len], start


def pad_pairs(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of the chosen sequences, then the rejected ones, right-padded; `answer` marks answer tokens."""
    seqs = [(r[f"{side}_ids"], r[f"{side}_start"]) for side in ("chosen", "rejected") for r in rows]
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    answer = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (seq, start) in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        answer[i, start : len(seq)] = 1
    ref = torch.tensor([[r["ref_chosen"], r["ref_rejected"]] for r in rows], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "answer": answer, "ref": ref}


class PairDataModule(ResumableBatches, pl.LightningDataModule):
    """Pairs tokenised once, split by seed into train and validation; batches in a resumable order."""

    def __init__(self, pairs: list[dict], tokenizer, *, max_seq_len: int, micro_batch_size: int, val_fraction, seed):
        super().__init__()
        if len(pairs) < 2:
            raise SelfAlignError(f"need at least 2 preference pairs to hold out a validation split (got {len(pairs)})")
        self.tokenizer, self.micro_batch_size, self.seed = tokenizer, micro_batch_size, seed
        rows, self.truncated = [], 0
        for p in pairs:
            c_ids, c_start = tokenize_answer(tokenizer, p["prompt"], p["chosen"], max_seq_len)
            r_ids, r_start = tokenize_answer(tokenizer, p["prompt"], p["rejected"], max_seq_len)
            self.truncated += any(len(x) == max_seq_len for x in (c_ids, r_ids))
            rows.append(
                {"id": p["id"], "chosen_ids": c_ids, "chosen_start": c_start, "rejected_ids": r_ids}
                | {"rejected_start": r_start, "ref_chosen": 0.0, "ref_rejected": 0.0}
            )
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, round(len(rows) * val_fraction))
        self.val_rows = [rows[i] for i in order[:n_val]]
        self.train_rows = [rows[i] for i in order[n_val:]]

    @property
    def all_rows(self) -> list[dict]:
        return self.train_rows + self.val_rows

    def _loader(self, rows: list[dict], sampler=None) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        return DataLoader(
            rows,
            batch_size=self.micro_batch_size,
            sampler=sampler,
            collate_fn=lambda b: pad_pairs(b, pad),
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._resumable_loader(self.train_rows, self.seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_rows)


@torch.no_grad()
def fill_reference(model, data: PairDataModule, batch_size: int = 4) -> None:
    """Each pair's chosen and rejected log-probs under `model` as it is now (the SFT adapter), in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = data.all_rows
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = {k: v.to(device) for k, v in pad_pairs(chunk, data.tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = sequence_logps(logits, batch["input_ids"], batch["answer"]).cpu()
        for i, row in enumerate(chunk):
            row["ref_chosen"], row["ref_rejected"] = float(logps[i]), float(logps[len(chunk) + i])
    model.train(was_training)


class PreferenceModule(LoRASFTModule):
    """The preference loss on each batch of pairs; logs reward accuracy, margins and chosen/rejected log-probs."""

    def __init__(self, model, *, prefer: PreferConfig, betas, weight_decay: float, warmup_ratio: float, scheduler):
        super().__init__(
            model, lr=prefer.lr, betas=betas, weight_decay=weight_decay, warmup_ratio=warmup_ratio, scheduler=scheduler
        )
        self.loss_name, self.beta, self.sft_weight, self.gamma = (
            prefer.loss,
            prefer.beta,
            prefer.sft_weight,
            prefer.simpo_gamma,
        )

    def _terms(self, batch: dict):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logps = sequence_logps(out.logits, batch["input_ids"], batch["answer"])
        tokens = batch["answer"][:, 1:].sum(-1).float()
        n = batch["ref"].shape[0]
        terms = preference_loss(
            logps[:n],
            logps[n:],
            batch["ref"][:, 0],
            batch["ref"][:, 1],
            chosen_tokens=tokens[:n],
            rejected_tokens=tokens[n:],
            loss=self.loss_name,
            beta=self.beta,
            sft_weight=self.sft_weight,
            simpo_gamma=self.gamma,
        )
        return terms, logps[:n].detach(), logps[n:].detach()

    def _log_terms(self, prefix: str, terms, chosen, rejected, n: int, **kw) -> None:
        margin = terms.chosen_rewards - terms.rejected_rewards
        values = {
            "reward_accuracy": (margin > 0).float().mean(),
            "reward_margin": margin.mean(),
            "chosen_reward": terms.chosen_rewards.mean(),
            "rejected_reward": terms.rejected_rewards.mean(),
            "chosen_logp": chosen.mean(),
            "rejected_logp": rejected.mean(),
            "sft_nll": terms.sft.detach(),
        }
        for key, value in values.items():
            self.log(f"{prefix}{key}", value, batch_size=n, **kw)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms, chosen, rejected = self._terms(batch)
        n = batch["ref"].shape[0]
        self.tokens_seen += int(batch["attention_mask"].sum())
        self.log("train_loss", terms.loss, on_step=True, prog_bar=True, batch_size=n)
        self.log("lr", self.lr_schedulers().get_last_lr()[0], on_step=True, prog_bar=False)
        self._log_terms("train_", terms, chosen, rejected, n, on_step=True)
        return terms.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        terms, chosen, rejected = self._terms(batch)
        n = batch["ref"].shape[0]
        self.log("val_loss", terms.loss, on_epoch=True, prog_bar=True, batch_size=n)
        self._log_terms("val_", terms, chosen, rejected, n, on_epoch=True)


def load_sft_for_training(base_cfg: BaseModelConfig, sft_dir: Path, qlora: bool, trainer_cfg, cache_dir):
    """The base with the SFT adapter loaded as the trainable adapter `default`; and the base handle."""
    from peft import PeftModel, prepare_model_for_kbit_training

    from selfalign.runtime.loader import load_for_training

    handle = load_for_training(base_cfg, training_device(qlora, trainer_cfg), cache_dir=cache_dir, qlora=qlora)
    model = handle.model
    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=torch.cuda.is_available())
    return PeftModel.from_pretrained(model, str(sft_dir), is_trainable=True), handle


def train_preference(
    pairs: list[dict],
    *,
    sft_dir: Path,
    sft_manifest: dict,
    base_cfg: BaseModelConfig,
    prefer: PreferConfig,
    optim,  # the LoraConfig whose optimiser settings (betas, weight decay, warmup, schedule, max_seq_len) apply
    trainer_cfg: TrainerConfig,
    seed: int,
    run_dir: str | Path,
    checkpoint_dir: str | Path,
    tracker,
    cache_dir: str | None = None,
    resume: bool = False,
    callbacks: tuple[Callback, ...] = (),
) -> FitResult:
    """The preference recipe: seed, the SFT adapter as the starting point, the pairs with their reference log-probs,
    fit; returns the best-validation adapter."""
    pl.seed_everything(seed, workers=True, verbose=False)
    if trainer_cfg.reuse_host_memory:
        reuse_host_memory()
    qlora = bool(sft_manifest.get("lora", {}).get("qlora", False))
    peft_model, handle = load_sft_for_training(base_cfg, sft_dir, qlora, trainer_cfg, cache_dir)
    data = PairDataModule(
        pairs,
        handle.tokenizer,
        max_seq_len=min(optim.max_seq_len, handle.context_window),
        micro_batch_size=prefer.micro_batch_size,
        val_fraction=prefer.val_fraction,
        seed=seed,
    )
    fill_reference(peft_model, data, batch_size=max(1, prefer.micro_batch_size))
    module = PreferenceModule(
        peft_model,
        prefer=prefer,
        betas=(optim.beta1, optim.beta2),
        weight_decay=optim.weight_decay,
        warmup_ratio=optim.warmup_ratio,
        scheduler=optim.scheduler,
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
        oom_hint=f"(micro-batch {prefer.micro_batch_size} pairs): lower prefer.micro_batch_size or lora.max_seq_len",
    )
    metrics |= {"rows": len(pairs), "rows_truncated": data.truncated}
    metrics |= {"pairs_train": len(data.train_rows), "pairs_val": len(data.val_rows)}
    return FitResult(peft_model, handle.tokenizer, handle.template_hash, handle.name, metrics)
