"""Load a base model once, and keep LoRA adapters resident on it: attach, switch, detach, unload.

An adapter of plain LoRA shape is copied into a slot of the handle's `LoraSlots` (`runtime/lora.py`); one with a
LoRA variant, or a rank or targets the slots cannot hold, is attached with PEFT's `load_adapter` instead, and the
reason is kept in `handle.peft` and logged. Generation (`runtime/generate.py`) names each row's adapter, so
switching the active adapter never changes what a call already made sees. `handle.lock` serialises adapter
changes and forward passes.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from selfalign.config import CONF_DIR, BaseModelConfig
from selfalign.errors import SelfAlignError
from selfalign.runtime.adapters import CONFIG, check_compatible, read_manifest, read_weights, resolve_adapter_dir
from selfalign.runtime.chat import chat_template_hash, ensure_chat_template
from selfalign.runtime.lora import BASE, DEFAULT_MAX_RANK, LoraSlots, read_slot_weights
from selfalign.runtime.models import drop_cache, local_weights_dir
from selfalign.utils.io import read_json, read_yaml

log = logging.getLogger(__name__)
BASE_ALIASES = (BASE, "base", "none", "null")  # what users may write for "no adapter"
_ATTACH_IDS = itertools.count(1)  # one id per attach, so a reloaded name is told apart from its predecessor


@dataclass
class BaseModelHandle:
    """A loaded base model, its tokenizer, and the adapters resident on it."""

    cfg: BaseModelConfig
    model: Any
    tokenizer: Any
    device: str
    template_hash: str
    slots: LoraSlots  # the slot adapters' weights; built on the unwrapped model at load
    adapters: dict[str, Path] = field(default_factory=dict)  # name -> dir it was loaded from
    manifests: dict[str, dict] = field(default_factory=dict)
    active: str | None = None  # the adapter calls use when they name none; None = the base
    attach_ids: dict[str, int] = field(default_factory=dict)  # name -> id of the attach that put it there
    peft: dict[str, str] = field(default_factory=dict)  # adapters on PEFT's path -> why the slots can't hold them
    solo: set[str] = field(default_factory=set)  # adapters on PEFT's path it cannot batch with others (DoRA)
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or self.cfg.max_seq_len)


def base_model_presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted((CONF_DIR / "base_model").glob("*.yaml"))}


def _preset(model_id: str) -> tuple[str, dict]:
    """The file stem and contents of the base-model preset named by stem (`smollm2_135m`) or by model name
    (`smollm2-135m-instruct`); each file is read once, capped and alias-free (`read_yaml`)."""
    presets = base_model_presets()
    for stem, path in presets.items():
        try:
            node = read_yaml(path)
        except ValueError as exc:
            raise SelfAlignError(str(exc)) from None
        if model_id in (stem, node.get("name")):
            return stem, node
    raise SelfAlignError(f"unknown base model {model_id!r}; choose one of: {', '.join(presets)}")


def preset_stem(model_id: str) -> str:
    """The preset's file stem for a stem or a model name: what `base_model=` takes."""
    return _preset(model_id)[0]


def resolve_base_model(model_id: str) -> BaseModelConfig:
    """A preset by file stem (`smollm2_135m`) or by its `name` (`smollm2-135m-instruct`), validated."""
    from omegaconf import OmegaConf

    node = OmegaConf.create(_preset(model_id)[1])
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BaseModelConfig), node))


def pick_device(requested: str) -> str:
    import torch

    if requested in ("auto", ""):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SelfAlignError(f"base_model.device={requested} but no CUDA device is visible; use device=cpu")
    return requested


def load_base(
    model_id: str | BaseModelConfig,
    device: str = "auto",
    *,
    cache_dir: str | os.PathLike | None = None,
    qlora: bool = False,
    lora_slots: int = 2,
    max_lora_rank: int = DEFAULT_MAX_RANK,
) -> BaseModelHandle:
    """The base model for inference (eval, serve, synth's teacher, demo): eval mode, the tokenizer left-padded so
    a batch's prompts end where generation starts, and LoRA slots for `lora_slots` adapters (they double when
    full and widen for a higher rank; an adapter of rank above `max_lora_rank` takes PEFT's path)."""
    handle = _load(model_id, device, cache_dir, qlora, partial(LoraSlots, capacity=lora_slots, max_rank=max_lora_rank))
    handle.model.eval()
    handle.tokenizer.padding_side = "left"
    return handle


def load_for_training(
    model_id: str | BaseModelConfig,
    device: str = "auto",
    *,
    cache_dir: str | os.PathLike | None = None,
    qlora: bool = False,
) -> BaseModelHandle:
    """The base model to put a LoRA adapter on and train: train mode (dropout live), the tokenizer right-padded
    (labels follow the text; padding is masked out of the loss)."""
    handle = _load(model_id, device, cache_dir, qlora, LoraSlots)
    handle.model.train()
    handle.tokenizer.padding_side = "right"
    return handle


def _load(model_id: str | BaseModelConfig, device: str, cache_dir, qlora: bool, slots) -> BaseModelHandle:
    """Weights (from the local cache, built once), tokenizer with a pad token and a chat template, on `device`, and
    `slots(model)` for LoRA adapters; no mode or padding side: the two public loaders set those for their use."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = resolve_base_model(model_id) if isinstance(model_id, str) else model_id
    device = pick_device(device if device != "auto" else cfg.device)
    cache_dir = cache_dir or os.environ.get("SELFALIGN_CACHE") or Path.home() / ".cache" / "selfalign"
    kwargs: dict[str, Any] = {"revision": cfg.revision} if cfg.revision else {}
    if cfg.dtype != "auto":
        kwargs["dtype"] = getattr(torch, cfg.dtype)  # the schema allows float32, bfloat16, float16
    if qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    if device.startswith("cuda"):
        kwargs["device_map"] = "auto" if device == "cuda" else {"": device}

    def from_cache():
        weights = local_weights_dir(cfg, cache_dir)
        return AutoModelForCausalLM.from_pretrained(weights, **kwargs), AutoTokenizer.from_pretrained(weights)

    try:
        model, tokenizer = from_cache()
    except SelfAlignError:
        raise
    except Exception as exc:  # a corrupt cache is rebuilt once; anything else is reported in one line
        if not drop_cache(cfg, cache_dir):
            raise SelfAlignError(f"cannot load base model {cfg.name!r}: {type(exc).__name__}: {exc}") from exc
        try:
            model, tokenizer = from_cache()
        except Exception as exc2:
            raise SelfAlignError(
                f"cannot load base model {cfg.name!r} even after rebuilding its cache: {exc2}"
            ) from exc2
    if "device_map" not in kwargs:
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer, cfg)
    return BaseModelHandle(cfg, model, tokenizer, device, chat_template_hash(tokenizer), slots(model))


# --------------------------------------------------------------------------- adapters


def apply_adapter(
    handle: BaseModelHandle,
    adapter_dir: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    name: str | None = None,
    activate: bool = True,
    reserved: Collection[str] = (),
    max_adapters: int | None = None,
) -> str:
    """Load an adapter from disk next to the resident ones (checked first), optionally make it active. Its name is a
    slug that is not the base model's, one of `BASE_ALIASES` or one of `reserved` (a server's alias); one path is
    resident under one name; at most `max_adapters` are resident."""
    path = resolve_adapter_dir(adapter_dir, root if root is not None else Path(adapter_dir).parent)
    manifest = read_manifest(path, hash_weights=False)
    check_compatible(manifest, path, handle.name, handle.template_hash)
    name = name or manifest["adapter_id"]
    check_adapter_name(handle, name, reserved)
    with handle.lock:
        if name in handle.adapters:
            if handle.adapters[name] != path:
                raise SelfAlignError(f"an adapter named {name!r} is already loaded from {handle.adapters[name]}")
        else:
            other = next((n for n, p in handle.adapters.items() if p == path), None)
            if other is not None:
                raise SelfAlignError(f"{path} is already loaded as {other!r}: one copy per adapter, use that name")
            if max_adapters is not None and len(handle.adapters) >= max_adapters:
                raise SelfAlignError(
                    f"{len(handle.adapters)} adapters are resident, the most this server holds (serve.max_adapters); "
                    "unload one first"
                )
            _attach(handle, path, name, read_weights(path, manifest))
            handle.attach_ids[name] = next(_ATTACH_IDS)
        handle.adapters[name] = path
        handle.manifests[name] = manifest
        if activate:
            handle.active = name
    return name


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_adapter_name(handle: BaseModelHandle, name: str, reserved: Collection[str] = ()) -> None:
    """A SelfAlignError unless `name` can name an adapter: a slug of 1-64 letters, digits, `-` and `_`, and not a
    name that already means something else (the base model, its aliases, `reserved`)."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        shown = repr(name) if len(str(name)) <= 80 else f"{str(name)[:80]!r}... ({len(name)} characters)"
        raise SelfAlignError(
            f"adapter name {shown} is not a slug: 1-64 letters, digits, '-' or '_', starting with a letter or digit"
        )
    if names_base(handle, name) or name in reserved:
        what = "the base model" if names_base(handle, name) else "the server's alias for the active adapter"
        raise SelfAlignError(f"adapter name {name!r} already names {what}; choose another")


def module_name(manifest: dict) -> str:
    """A PEFT adapter name for id+version (module names may not contain dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{manifest['adapter_id']}-{manifest['version']}")


def attach_timed(handle, planned: list, root: str) -> list[tuple[str, float]]:
    """Attach each (path, manifest, ...) to the loaded base; its PEFT name and attach time in ms."""
    import peft  # noqa: F401  (imported before timing: attach time excludes the one-off module import)

    attached = []
    for path, manifest, *_ in planned:
        start = time.perf_counter()
        name = apply_adapter(handle, path, root=root, name=module_name(manifest), activate=False)
        attached.append((name, round((time.perf_counter() - start) * 1000, 1)))
    return attached


def _attach(handle: BaseModelHandle, path: Path, name: str, data: bytes) -> None:
    """Copy the adapter (`data`: its checked safetensors bytes) into a slot, or, when the slots cannot hold it,
    attach it with PEFT (the reason kept in `handle.peft` and logged). Nothing is changed when the weights fail to
    load."""
    from safetensors.torch import load

    config = read_json(path / CONFIG)
    if not isinstance(config, dict):
        raise SelfAlignError(f"{path / CONFIG}: not a JSON object")
    try:
        tensors = load(data)
        reason = handle.slots.unsupported(config, tensors)
        if reason is None:
            handle.slots.load(name, read_slot_weights(config, tensors, data))
            return
    except Exception as exc:  # a foreign or corrupt file: one line, nothing changed
        raise SelfAlignError(f"{path}: adapter failed to load ({type(exc).__name__}: {exc})") from exc
    log.warning("adapter %s takes PEFT's path, not a slot: %s", name, reason)
    _attach_peft(handle, path, name)
    handle.peft[name] = reason
    if config.get("use_dora"):  # PEFT's per-row `adapter_names` refuses DoRA
        handle.solo.add(name)


@contextlib.contextmanager
def _gc_paused():
    """Attaching through PEFT builds ~2,000 small modules; a GC pass in the middle doubled p95 attach (480 vs 230
    ms)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _attach_peft(handle: BaseModelHandle, path: Path, name: str) -> None:
    """Inject the adapter's layers with PEFT and load its weights; on failure take the layers out again.

    PEFT injects LoRA layers before it reads the weights, so a failed load would otherwise leave the
    base model changed. The first adapter is wrapped in two steps (as `PeftModel.from_pretrained`
    does) so the wrapper exists to unload when the weights fail.
    """
    from peft import PeftConfig, PeftModel

    with _gc_paused():
        if isinstance(handle.model, PeftModel):
            wrapped, fresh = handle.model, False
        else:
            config = PeftConfig.from_pretrained(str(path))
            config.inference_mode = True
            wrapped, fresh = PeftModel(handle.model, config, adapter_name=name, low_cpu_mem_usage=True), True
        try:
            wrapped.load_adapter(str(path), adapter_name=name, low_cpu_mem_usage=True)
            _check_finite(wrapped, name)
        except Exception as exc:
            if fresh:
                wrapped.unload()
            elif name in wrapped.peft_config:
                wrapped.delete_adapter(name)
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            detail = " ".join(lines[:2])[:300] + (f" (+{len(lines) - 2} more)" if len(lines) > 2 else "")
            raise SelfAlignError(f"{path}: adapter failed to load ({type(exc).__name__}: {detail})") from exc
    handle.model = wrapped


def _check_finite(model, name: str) -> None:
    """A ValueError when adapter `name`'s weights hold NaN or inf (see `read_slot_weights`)."""
    import torch

    tensors = [p for n, p in model.named_parameters() if f".{name}." in n]
    bad = sum(not bool(torch.isfinite(p).all()) for p in tensors)
    if bad:
        raise ValueError(f"{bad} of {len(tensors)} weight tensors hold NaN or inf values")


def set_active(handle: BaseModelHandle, name: str | None) -> None:
    """Make a resident adapter (or the base, for None) the one calls use by default."""
    with handle.lock:
        if name is not None and name not in handle.adapters:
            raise SelfAlignError(f"adapter {name!r} is not loaded; loaded: {', '.join(handle.adapters) or 'none'}")
        handle.active = name


def detach(handle: BaseModelHandle) -> None:
    """Serve the base model by default again; adapters stay resident for later switches."""
    set_active(handle, None)


def unload_adapter(handle: BaseModelHandle, name: str) -> None:
    """Remove a resident adapter's weights from the model."""
    with handle.lock:
        if name not in handle.adapters:
            raise SelfAlignError(f"adapter {name!r} is not loaded")
        if name in handle.slots:
            handle.slots.free(name)
        elif len(handle.peft) == 1:
            handle.model = handle.model.unload()  # the last one on PEFT's path: back to the plain base model
        else:
            handle.model.delete_adapter(name)
        handle.peft.pop(name, None)
        handle.solo.discard(name)
        del handle.adapters[name]
        del handle.manifests[name]
        handle.attach_ids.pop(name, None)
        if handle.active == name:
            handle.active = None


def names_base(handle: BaseModelHandle, name: str) -> bool:
    """Whether `name` means the base model: one of `BASE_ALIASES` or the base model's own name."""
    return name in BASE_ALIASES or name == handle.name


def resolve_adapter_name(handle: BaseModelHandle, adapter: str | None) -> str | None:
    """`None` -> the active adapter; `"base"`/`"none"`/`__base__` -> the base; otherwise a resident name."""
    if adapter is None:
        return handle.active
    if names_base(handle, adapter):
        return None
    if adapter not in handle.adapters:
        raise SelfAlignError(f"adapter {adapter!r} is not loaded; loaded: {', '.join(handle.adapters) or 'none'}")
    return adapter


def check_attached(handle: BaseModelHandle, adapter: str | None) -> None:
    """Refuse an adapter name (None: the base) that is not resident on `handle`."""
    if adapter is not None and adapter not in handle.attach_ids:
        raise SelfAlignError(f"adapter {adapter!r} is not attached (resident: {sorted(handle.attach_ids)})")


def check_context(handle: BaseModelHandle, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt that, with `max_new_tokens` more, would overflow the model's context window."""
    if prompt_tokens + max_new_tokens > handle.context_window:
        raise SelfAlignError(
            f"prompt is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
            f"{handle.context_window}-token context window of {handle.name} (shorten it or lower max_new_tokens)"
        )
