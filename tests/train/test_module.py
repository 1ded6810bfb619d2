"""The LoRA module: the LR schedule (linear warmup over 5% of the steps, then cosine to zero) and the
optimizer and forward it trains with."""

from __future__ import annotations

import math
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch

from selfalign.config import LoraConfig
from selfalign.runtime.loader import load_base, resolve_base_model
from selfalign.tracking import Tracker
from selfalign.train.module import warmup_cosine
from selfalign.train.sft import train_adapter
from tests.conftest import preset
from tests.train.helpers import sft_rows


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(100, 0.05)
    assert [f(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f(5) == pytest.approx(1.0)
    assert f(52) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(5, 100))


def test_constant_schedule_and_no_warmup():
    assert warmup_cosine(10, 0.2, "constant")(9) == 1.0
    f = warmup_cosine(10, 0.0)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5)


class Probe(pl.Callback):
    """Records the optimizer, torch's memory-fill flag and what the model's training forward returned."""

    def on_train_start(self, trainer, module):
        self.optimizer = trainer.optimizers[0]
        self.fill = torch.utils.deterministic.fill_uninitialized_memory
        self.caches = []
        module.model.register_forward_hook(lambda m, a, out: self.caches.append(out.past_key_values))


def fit_tiny(run_dir, cache_dir, *, rows: int = 8, lora: LoraConfig | None = None, probe=None, **trainer):
    """Two-step-sized training of the tiny Llama on CPU; `trainer` holds `TrainerConfig` fields."""
    return train_adapter(
        sft_rows(rows),
        base_cfg=resolve_base_model("tiny_llama"),
        lora=lora or preset("lora", micro_batch_size=2),
        trainer_cfg=preset("trainer", "cpu", extra={"enable_progress_bar": False}, **trainer),
        seed=0,
        run_dir=run_dir,
        checkpoint_dir=run_dir / "ckpt",
        tracker=Tracker(None),
        cache_dir=str(cache_dir),
        callbacks=(probe,) if probe else (),
    )


def test_training_skips_work_that_buys_nothing(tmp_path):
    """The single-tensor AdamW took 19 ms a step vs 5 ms fused on SmolLM2's 420 LoRA tensors; the KV cache
    cost ~4% of a step; deterministic mode's NaN-fill, 0.10 ms per 6 MB tensor (DECISIONS.md, Throughput)."""
    probe = Probe()
    result = fit_tiny(tmp_path, tmp_path / "cache", rows=12, probe=probe, max_steps=2, deterministic=True)
    assert result.metrics["steps"] == 2
    assert probe.optimizer.defaults["fused"] is True
    assert probe.optimizer.defaults["betas"] == (0.9, 0.95) and probe.optimizer.defaults["weight_decay"] == 0.1
    assert len(probe.caches) >= 2 and all(c is None for c in probe.caches)
    assert probe.fill is False and torch.utils.deterministic.fill_uninitialized_memory is True  # restored


def test_mixed_precision_with_clipping_trains(tmp_path):
    """`trainer=gpu` is bf16-mixed with clip 1.0: Lightning refuses to clip a fused optimizer there, so the
    module takes the multi-tensor AdamW (this crashed at the first step before). bf16 autocast on CPU here."""
    probe = Probe()
    result = fit_tiny(
        tmp_path,
        tmp_path / "cache",
        probe=probe,
        precision="bf16-mixed",
        gradient_clip_val=1.0,
        max_steps=2,
        log_every_n_steps=1,
    )
    assert result.metrics["steps"] == 2 and math.isfinite(result.metrics["train_loss"])
    assert probe.optimizer.defaults["fused"] is None and probe.optimizer.defaults["foreach"] is True


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path):
    """`lora.gradient_checkpointing=true` recomputes activations (same dropout masks: torch keeps the RNG
    state), so the adapter matches a run without it; only memory and time change."""
    load_base("tiny_llama", device="cpu", cache_dir=tmp_path / "cache")  # both runs then load the same cache
    plain, recomputed = (
        fit_tiny(
            tmp_path / str(on),
            tmp_path / "cache",
            max_steps=2,
            lora=preset("lora", micro_batch_size=2, gradient_checkpointing=on),
        )
        for on in (False, True)
    )
    assert not plain.peft_model.is_activation_checkpointing and recomputed.peft_model.is_activation_checkpointing
    a, b = (dict(r.peft_model.named_parameters()) for r in (plain, recomputed))
    trained = [n for n, p in a.items() if p.requires_grad]
    assert trained and all(b[n].requires_grad for n in trained)
    for name in trained:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


REUSE_PROBE = """
import resource, sys, torch
from selfalign.train.fit import reuse_host_memory

def faults_for_one_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 << 20)  # 256 MiB, written through and freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_for_one_buffer()
plain = faults_for_one_buffer()  # glibc maps anything this large afresh each time
applied = reuse_host_memory()
faults_for_one_buffer()  # the heap grows to hold it
# the least of three: a small object left at the heap's top between two buffers can make it grow once more
print(plain, applied, min(faults_for_one_buffer() for _ in range(3)))
"""


def test_glibc_keeps_freed_memory_for_the_next_step():
    """After `reuse_host_memory`, a freed 256 MiB buffer is handed out again without new page faults.
    In a fresh process, as in `stage=train`: a long-lived test process has a fragmented heap."""
    out = subprocess.run([sys.executable, "-c", REUSE_PROBE], check=True, capture_output=True, text=True).stdout
    plain, applied, reused = out.split()
    assert applied == "True"  # glibc (Linux) in CI
    assert int(plain) >= 60_000 and int(reused) < 1000  # 65,536 pages when mapped afresh
