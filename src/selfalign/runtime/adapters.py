"""Adapter directories on disk: where they may come from, what they must hold, how they are written.

An adapter dir holds `adapter_config.json`, `adapter_model.safetensors` and `manifest.json` (the
seed's manifest plus the base model name, chat-template hash and weights' sha256 that attaching checks). Only
safetensors load, and only from inside the configured adapter root.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from selfalign import __version__
from selfalign.errors import SelfAlignError
from selfalign.runtime.families import LORA_TARGET_GROUPS, lora_target_modules
from selfalign.utils.hashing import sha256_bytes, sha256_file
from selfalign.utils.io import UMASK, atomic_dir, read_json

MANIFEST = "manifest.json"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def resolve_adapter_dir(adapter_dir: str | os.PathLike, root: str | os.PathLike) -> Path:
    """The real path of an adapter dir, refused unless it lies inside `root` (symlinks followed).

    A relative path is looked up under `root` first, then under the working directory.
    """
    root_real = Path(root).resolve()
    text = os.fspath(adapter_dir)
    if not text.isprintable():  # NUL and every other control character
        raise SelfAlignError(f"adapter path {text[:200]!r} holds a NUL or other control character")
    given = Path(adapter_dir)
    if ".." in given.parts:
        raise SelfAlignError(f"adapter path {str(given)!r} contains '..'; name a directory inside {root_real}")
    candidates = [given] if given.is_absolute() else [root_real / given, Path.cwd() / given]
    for candidate in candidates:
        real = candidate.resolve()
        if not real.is_relative_to(root_real):
            if candidate.exists() or given.is_absolute():
                raise SelfAlignError(f"adapter path {str(given)!r} resolves outside the adapter root {root_real}")
            continue
        if real.is_dir():
            return real
    raise SelfAlignError(f"adapter dir {str(given)!r} not found under {root_real}")


def read_manifest(path: Path, *, hash_weights: bool = True) -> dict:
    """The manifest of an adapter dir that holds everything an attach needs; else a clear refusal. The weights'
    sha256 is checked unless `hash_weights` is false (an attach checks the bytes it loads: `read_weights`)."""
    missing = [name for name in (MANIFEST, CONFIG, WEIGHTS) if not (path / name).is_file()]
    if WEIGHTS in missing and any(path.glob("adapter_model.bin")):
        raise SelfAlignError(f"{path}: adapter weights are a pickle (adapter_model.bin); only safetensors load")
    if missing:
        raise SelfAlignError(f"{path}: not an adapter dir, missing {', '.join(missing)}")
    try:
        from safetensors import safe_open

        with safe_open(str(path / WEIGHTS), framework="pt") as weights:
            if not list(weights.keys()):
                raise ValueError("no tensors")
    except Exception as exc:  # a truncated or foreign file: refuse before PEFT touches the model
        raise SelfAlignError(f"{path / WEIGHTS}: unreadable safetensors ({exc})") from None
    manifest = read_json(path / MANIFEST)
    if not isinstance(manifest, dict):
        raise SelfAlignError(f"{path / MANIFEST}: not a JSON object")
    for key in ("adapter_id", "version", "base_model", "chat_template_hash"):
        if not manifest.get(key):
            raise SelfAlignError(f"{path / MANIFEST}: missing field {key!r}")
    if hash_weights and manifest.get("weights_sha256") is not None:
        _check_sha256(path, manifest, sha256_file(path / WEIGHTS))
    return manifest


def read_weights(path: Path, manifest: dict) -> bytes:
    """The adapter's safetensors bytes, read once and checked against the manifest's sha256, so the bytes checked
    are the bytes loaded."""
    data = (path / WEIGHTS).read_bytes()
    if manifest.get("weights_sha256") is not None:  # absent only in adapters saved before weights were hashed
        _check_sha256(path, manifest, sha256_bytes(data))
    return data


def _check_sha256(path: Path, manifest: dict, actual: str) -> None:
    expected = manifest["weights_sha256"]
    if actual != expected:
        raise SelfAlignError(
            f"{path / WEIGHTS}: sha256 {actual[:12]}... is not the manifest's {str(expected)[:12]}...: the weights "
            "changed after they were saved; retrain or restore them"
        )


def _same_base(manifest: dict, path: Path, base_model: str) -> None:
    if manifest["base_model"] != base_model:
        raise SelfAlignError(
            f"{path}: adapter {manifest['adapter_id']!r} was trained on base model {manifest['base_model']!r}, "
            f"but this runtime serves {base_model!r}"
        )


def check_compatible(manifest: dict, path: Path, base_model: str, template_hash: str) -> None:
    """Refuse an adapter trained on another base or chat template, naming both sides."""
    _same_base(manifest, path, base_model)
    if manifest["chat_template_hash"] != template_hash:
        raise SelfAlignError(
            f"{path}: adapter {manifest['adapter_id']!r} expects chat template {manifest['chat_template_hash'][:12]}…, "
            f"but {base_model!r} renders with {template_hash[:12]}…"
        )


def preflight(adapter_dir: str | os.PathLike, root: str | os.PathLike, base_model: str) -> Path:
    """Every check an attach makes that needs no loaded model (path inside `root`, safetensors, manifest, base
    model name), in milliseconds: run it before loading the base so a bad path fails fast. The chat-template check
    needs the tokenizer and stays in `check_compatible` at attach time."""
    path = resolve_adapter_dir(adapter_dir, root)
    _same_base(read_manifest(path), path, base_model)
    return path


def build_manifest(
    adapter_id: str,
    version: str,
    base_model: str,
    chat_template_hash: str,
    lora: dict,
    seed: int,
    **extra,
) -> dict:
    """The seed's manifest fields plus what attaching and provenance need (`extra`: hashes, metrics)."""
    return {
        "adapter_id": adapter_id,
        "version": version,
        "base_model": base_model,
        "chat_template_hash": chat_template_hash,
        "lora": lora,
        "metrics": extra.pop("metrics", {}),
        "seed": seed,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "selfalign_version": __version__,
        **extra,
    }


def save_adapter(peft_model, adapter_name: str, out_dir: str | os.PathLike, manifest: dict) -> Path:
    """Write one adapter (safetensors) and its manifest; the dir appears whole or not at all."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name], safe_serialization=True)
        nested = tmp / adapter_name  # PEFT nests every adapter but "default" in a subfolder
        if adapter_name != "default" and nested.is_dir():
            for item in nested.iterdir():
                os.replace(item, tmp / item.name)
            nested.rmdir()
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's boilerplate model card; the manifest says it all
        manifest["weights_sha256"] = sha256_file(tmp / WEIGHTS)  # in place: later rewrites of the manifest keep it
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _make_readable(tmp)
    return out


def _make_readable(folder: Path) -> None:
    """mkdtemp makes the dir 0700 and some writers 0600 files; give them the permissions the umask allows."""
    folder.chmod(0o777 & ~UMASK)
    for item in folder.iterdir():
        item.chmod(0o666 & ~UMASK)


def write_random_adapter(
    handle, out_dir: str | os.PathLike, adapter_id: str, *, r: int = 16, alpha: int = 32, seed: int = 0, **options
) -> Path:
    """An untrained LoRA adapter whose B matrices are random (not zero), so it visibly changes outputs.

    For benchmarks and tests that need real adapter files without a training run. It is built on a
    copy-free wrapper of `handle.model` and removed again, leaving the handle as it was. `options` go to PEFT's
    `LoraConfig` (`use_dora=True` writes a DoRA adapter).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    if handle.adapters:
        raise SelfAlignError("write_random_adapter needs a handle with no adapters attached")
    targets = lora_target_modules(handle.cfg.family, list(LORA_TARGET_GROUPS))
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM", **options
    )
    peft_model = get_peft_model(handle.model, config, adapter_name=adapter_id)
    manifest = build_manifest(
        adapter_id,
        "0.0.0",
        handle.name,
        handle.template_hash,
        {"r": r, "alpha": alpha, "dropout": 0.0, "targets": ["attn", "mlp"]},
        seed,
        note="random, untrained: for benchmarks and tests",
    )
    try:
        return save_adapter(peft_model, adapter_id, out_dir, manifest)
    finally:
        handle.model = peft_model.unload()
