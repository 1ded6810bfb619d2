"""On a CUDA GPU (marker `gpu`, skipped where there is none): QLoRA trains with an NF4 base, bf16-mixed LoRA
trains, and a trained adapter attaches to a CUDA base and changes what it generates.

The base is a tiny random Llama (the `tiny_llama` shape) built here with a SmolLM2 tokenizer: the saved one
at `$SELFALIGN_TEST_TOKENIZER` (scripts/gpu_check.py points it at its copy of `.gpu/a/tok`), else the
bundled GGUF's; the tests skip when neither is present. `SELFALIGN_TEST_GPU_ON_CPU=1` runs them on CPU
instead, to rehearse this file on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

from selfalign.config import BaseModelConfig, LoraConfig, ModelSource, TrainerConfig
from selfalign.errors import SelfAlignError
from selfalign.tracking import Tracker
from tests.conftest import preset
from tests.train.helpers import sft_rows

ON_CPU = os.environ.get("SELFALIGN_TEST_GPU_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_CPU or torch.cuda.is_available()), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    given = os.environ.get("SELFALIGN_TEST_TOKENIZER")
    if given and (Path(given) / "tokenizer_config.json").is_file():
        return Path(given)
    from selfalign.runtime.loader import load_base

    tmp = tmp_path_factory.mktemp("tok")
    try:
        tokenizer = load_base("tiny_llama", device="cpu", cache_dir=tmp / "cache").tokenizer
    except SelfAlignError as exc:  # the bundled GGUF package is not installed
        pytest.skip(f"no SmolLM2 tokenizer: set SELFALIGN_TEST_TOKENIZER ({exc})")
    tokenizer.save_pretrained(tmp / "tok")
    return tmp / "tok"


@pytest.fixture(scope="module")
def base_cfg(tokenizer_dir, tmp_path_factory) -> BaseModelConfig:
    """A tiny random Llama in bf16 as a local HF directory, described the way `base_model.*` overrides do."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from selfalign.runtime.models import TINY_LLAMA

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_LLAMA,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return preset(
        "base_model",
        "tiny_llama",
        name="tiny-llama-gpu",
        source=ModelSource.local,
        path=str(path),
        dtype="bfloat16",
        device="auto",
        max_seq_len=256,
    )


def trainer_cfg(steps: int) -> TrainerConfig:
    return preset(
        "trainer",
        "cpu" if ON_CPU else "gpu",
        accelerator="cpu" if ON_CPU else "gpu",
        precision="bf16-mixed",
        max_steps=steps,
        max_epochs=50,
        accumulate_grad_batches=1,
        log_every_n_steps=1,
        deterministic=False,
        reuse_host_memory=False,
        extra={"enable_progress_bar": False},
    )


class Probe:
    """Where training ran (Lightning moves the module back to CPU when `fit` ends, so look while it runs):
    the parameters' devices and the quantized layers at the start, and what a LoRA-wrapped projection
    computed in (device, dtype of its output) during training steps."""

    def __init__(self):
        self.param_devices: set[str] = set()
        self.quantized: list[tuple[str, str]] = []  # (device, quant type) of each bitsandbytes 4-bit layer
        self.outputs: set[tuple[str, torch.dtype]] = set()

    def callback(self):
        import lightning.pytorch as pl

        probe = self

        class Hook(pl.Callback):
            def on_train_start(self, trainer, module):
                probe.param_devices = {p.device.type for p in module.parameters()}
                with contextlib.suppress(ImportError):
                    import bitsandbytes as bnb

                    probe.quantized = [
                        (m.weight.device.type, m.weight.quant_state.quant_type)
                        for m in module.modules()
                        if isinstance(m, bnb.nn.Linear4bit)
                    ]
                q_proj = next(m for n, m in module.model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
                q_proj.register_forward_hook(probe.record)

        return Hook()

    def record(self, module, args, output):
        if module.training:
            self.outputs.add((output.device.type, output.dtype))


def fit(base_cfg: BaseModelConfig, lora: LoraConfig, run_dir: Path, steps: int = 8):
    from selfalign.train.sft import train_adapter

    probe = Probe()
    result = train_adapter(
        sft_rows(24),
        base_cfg=base_cfg,
        lora=lora,
        trainer_cfg=trainer_cfg(steps),
        seed=0,
        run_dir=run_dir,
        checkpoint_dir=run_dir / "ckpt",
        tracker=Tracker(None),
        cache_dir=str(run_dir / "cache"),
        callbacks=(probe.callback(),),
    )
    events = [json.loads(line) for line in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train_step"]
    return result, losses, probe


def lora_b_norm(peft_model) -> float:
    """LoRA's B matrices start at zero: any norm above it means training moved the adapter."""
    return sum(float(p.detach().float().norm()) for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_qlora_trains_on_cuda_with_an_nf4_base(base_cfg, tmp_path):
    lora = preset("lora", qlora=True, micro_batch_size=4, lr=5e-3, warmup_ratio=0.0)
    result, losses, probe = fit(base_cfg, lora, tmp_path)
    assert probe.quantized == [(DEVICE, "nf4")] * (7 * 2)  # q,k,v,o,gate,up,down in each of the 2 layers
    assert {device for device, _ in probe.outputs} == {DEVICE}  # the training forward ran on the GPU
    assert result.metrics["steps"] == 8 and len(losses) == 8
    assert all(math.isfinite(x) for x in losses) and math.isfinite(result.metrics["val_loss"])
    assert lora_b_norm(result.peft_model) > 0
    assert min(losses[-3:]) < max(losses[:3])  # 8 steps at lr 5e-3 over 24 rows: the loss comes down


@pytest.fixture(scope="module")
def bf16_run(base_cfg, tmp_path_factory):
    lora = preset("lora", micro_batch_size=4, lr=1e-2, warmup_ratio=0.0)
    result, losses, probe = fit(base_cfg, lora, tmp_path_factory.mktemp("bf16"))
    return result, losses, probe, lora


def test_bf16_mixed_lora_trains_on_cuda(bf16_run):
    result, losses, probe, _ = bf16_run
    assert probe.param_devices == {DEVICE} and not probe.quantized
    assert (DEVICE, torch.bfloat16) in probe.outputs  # the projections ran under bf16 autocast on the GPU
    trainable = [p for p in result.peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # the adapter itself stays fp32
    assert result.metrics["steps"] == 8 and all(math.isfinite(x) for x in losses)
    assert lora_b_norm(result.peft_model) > 0
    assert min(losses[-3:]) < max(losses[:3])


def test_adapter_attaches_to_a_cuda_base_and_changes_greedy_output(bf16_run, base_cfg, tmp_path):
    from selfalign.runtime.adapters import save_adapter, write_random_adapter
    from selfalign.runtime.generate import infer
    from selfalign.runtime.loader import apply_adapter, load_base
    from selfalign.runtime.lora import route
    from selfalign.train.sft import adapter_manifest

    result, _, _, lora = bf16_run
    trained = tmp_path / "adapters" / "neutral-concise" / "0.1.0"
    manifest = adapter_manifest(
        result,
        persona_id="neutral-concise",
        persona_hash="0" * 64,
        version="0.1.0",
        base_cfg=base_cfg,
        lora=lora,
        seed=0,
        dataset_sha256="0" * 64,
    )
    save_adapter(result.peft_model, "default", trained, manifest)

    handle = load_base(base_cfg, device=DEVICE)
    assert next(handle.model.parameters()).device.type == DEVICE
    random_dir = write_random_adapter(handle, tmp_path / "adapters" / "random", "random", seed=1)
    prompt = "Explain tides briefly."
    before = infer(handle, prompt, max_new_tokens=12)
    batch = handle.tokenizer([prompt], return_tensors="pt").to(DEVICE)
    with torch.inference_mode():
        base_logits = handle.model(**batch).logits.float()

    name = apply_adapter(handle, trained, root=tmp_path / "adapters")
    assert handle.active == name
    with torch.inference_mode(), route(handle, [name]) as (model, extra):
        adapted_logits = model(**batch, **extra).logits.float()
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the trained weights reach the CUDA forward
    assert name in handle.slots and all(layer.a.device.type == DEVICE for layer in handle.slots.layers.values())

    other = apply_adapter(handle, random_dir, root=tmp_path / "adapters", activate=False)
    assert infer(handle, prompt, max_new_tokens=12, adapter=other) != before  # a random B: visibly different
    assert infer(handle, prompt, max_new_tokens=12, adapter="base") == before  # the base is left as it was
