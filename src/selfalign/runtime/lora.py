"""The LoRA arithmetic of served adapters: weights in pre-allocated slots, and per-row deltas in one forward pass.

Every resident adapter of plain LoRA shape lives in a slot of `LoraSlots`: for each layer an adapter targets, `a`
stacks the slots' A matrices over their ranks (`(capacity x rank, in)`) and `b` puts their B matrices side by side
(`(out, capacity x rank)`), each slot `rank` wide and zero-padded when its adapter's rank is lower. Attaching is
therefore a copy: read the safetensors, check shapes and finiteness, copy into the lowest free slot (the S-LoRA and
vLLM design). PEFT is not involved, and the base model keeps its own modules.

A forward hook on each served `nn.Linear` adds, inside `rows(adapters)`, `B((A x) * gate)` over the occupied slots,
where `gate` holds per row its adapter's scaling on that adapter's slot and 0 elsewhere (all 0 for a base row): four
tensor ops per layer whatever the mix of adapters in the batch. Outside `rows(...)` the hooks add nothing.

Adapters this layout cannot hold are reported by `unsupported` and keep PEFT's path (`runtime/loader.py`): LoRA
variants (DoRA and the like), per-module ranks or alphas, trained biases or extra modules, rank above `max_rank`, or
targets that are not plain linear layers of the base.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
DEFAULT_MAX_RANK = 64  # the widest slot outside a server, which sets its own (`serve.max_lora_rank`)
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])\.weight")
# adapter_config.json settings a slot can hold only at these values: anything else is a variant or an extra
_PLAIN = {
    "use_dora": (False, None),
    "use_qalora": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "alora_invocation_tokens": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_bdlora": (None, False),
}


@dataclass
class SlotWeights:
    """An adapter read for a slot: each target module's (A, B), its rank and its scaling."""

    pairs: dict[str, tuple[Any, Any]]
    rank: int
    scaling: float


def unsupported(config: dict, tensors: dict, model_modules: dict, max_rank: int) -> str | None:
    """Why an adapter (its `adapter_config.json` and tensors) cannot take a slot; None when it can."""
    import torch

    if config.get("peft_type", "LORA") != "LORA":
        return f"peft_type {config.get('peft_type')!r} is not LORA"
    for key, plain in _PLAIN.items():
        if config.get(key) not in plain:
            return f"{key}={config.get(key)!r}"
    rank = int(config.get("r", 0))
    if rank > max_rank:
        return f"rank {rank} is above the slots' maximum {max_rank}"
    halves = _halves(tensors)
    if isinstance(halves, str):
        return halves
    for module, pair in halves.items():
        target = model_modules.get(module)
        if not isinstance(target, torch.nn.Linear):
            return f"target {module!r} is not a linear layer of the base model"
        if set(pair) != {"A", "B"}:
            return f"{module!r} has no LoRA {'B' if 'A' in pair else 'A'} weight"
        a, b = pair["A"], pair["B"]
        if a.shape != (rank, target.in_features) or b.shape != (target.out_features, rank):
            return f"{module!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit r={rank} on that layer"
    return None if halves else "no LoRA weights"


def read_slot_weights(config: dict, tensors: dict, data: bytes | None = None) -> SlotWeights:
    """The per-module (A, B) pairs of an adapter `unsupported` passed, and its scaling (alpha / r, or alpha / sqrt(r)
    with rsLoRA). A ValueError when any weight holds NaN or inf: rows share each layer's matrices, and 0 x NaN is NaN
    in every batch-mate, so such an adapter is refused before anything is copied. `data`, the safetensors bytes the
    tensors view, lets one pass check them all."""
    import torch

    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    pairs = {module: (pair["A"], pair["B"]) for module, pair in _halves(tensors).items()}
    bad = 0 if _all_finite(data) else sum(not bool(torch.isfinite(t).all()) for pair in pairs.values() for t in pair)
    if bad:
        raise ValueError(f"{bad} of {2 * len(pairs)} weight tensors hold NaN or inf values")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return SlotWeights(pairs, rank, scaling)


def _halves(tensors: dict) -> dict[str, dict[str, Any]] | str:
    """Each target module's LoRA weights by half (`{"A": ..., "B": ...}`), or why a tensor is not one of them."""
    halves: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            return f"tensor {key!r} is not a LoRA A or B weight"
        halves.setdefault(match["module"], {})[match["half"]] = tensor
    return halves


def _all_finite(data: bytes | None) -> bool:
    """True when a safetensors file of float32 tensors holds no NaN or inf: its data (which the format packs without
    gaps) sums to a finite number in one pass with no allocation (any NaN or inf makes the sum NaN or inf). False
    when unsure (no data, another dtype, a sum that overflowed), so the caller checks tensor by tensor."""
    import torch

    if not data:
        return False
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    if {v["dtype"] for k, v in header.items() if k != "__metadata__"} != {"F32"}:
        return False
    with warnings.catch_warnings():  # a read-only buffer: torch warns that writes would fail; this only reads
        warnings.simplefilter("ignore", UserWarning)
        values = torch.frombuffer(data, dtype=torch.float32, offset=8 + size)
    return bool(torch.isfinite(values.sum()))


class _Layer:
    """One served linear layer: its slots' stacked weights and the hook that adds them."""

    def __init__(self, module, capacity: int, rank: int, dtype):
        import torch

        device = module.weight.device
        self.module = module
        self.a = torch.zeros((capacity * rank, module.in_features), dtype=dtype, device=device)
        self.b = torch.zeros((module.out_features, capacity * rank), dtype=dtype, device=device)
        self.hook = None


class LoraSlots:
    """The resident slot adapters of one base model and the hooks that route rows to them.

    `capacity` slots of `rank` are allocated for a layer the first time an adapter targets it and kept for the
    handle's life; the slots double when all are taken, and widen (up to `max_rank`) for an adapter of higher rank.
    Both are one-off reallocations; every other attach is a copy into the lowest free slot. The hooks are on only
    while an adapter is resident.
    """

    def __init__(self, model, *, capacity: int = 2, max_rank: int = DEFAULT_MAX_RANK):
        self.capacity, self.rank, self.max_rank = max(1, capacity), 0, max_rank
        self.layers: dict[str, _Layer] = {}
        self.slots: dict[str, int] = {}  # adapter name -> slot
        self.scaling: dict[str, float] = {}
        self._modules = dict(model.named_modules())  # now, before PEFT's path may wrap the layers
        self._gate = None  # (rows, 1, width) inside `rows(...)` when a row needs a delta; None: hooks idle
        self._width = 0  # columns of the occupied slots: what a step multiplies by

    def unsupported(self, config: dict, tensors: dict) -> str | None:
        return unsupported(config, tensors, self._modules, self.max_rank)

    def load(self, name: str, weights: SlotWeights) -> None:
        """Copy an adapter into the lowest free slot (its weights already checked by `read_slot_weights`)."""
        import torch

        if name in self.slots:
            raise ValueError(f"adapter {name!r} already holds slot {self.slots[name]}")
        free = next(i for i in range(self.capacity + 1) if i not in self.slots.values())
        if free == self.capacity or weights.rank > self.rank:
            self._resize(self.capacity if free < self.capacity else 2 * self.capacity, max(self.rank, weights.rank))
        start = free * self.rank
        with torch.no_grad():
            for module, (a, b) in weights.pairs.items():
                layer = self.layers.get(module) or self._add_layer(module, a.dtype)
                layer.a[start : start + weights.rank].copy_(a)
                layer.b[:, start : start + weights.rank].copy_(b)
        for layer in self.layers.values():
            if layer.hook is None:
                layer.hook = layer.module.register_forward_hook(partial(self._add_rows, layer))
        self.slots[name], self.scaling[name] = free, weights.scaling
        self._width = self._occupied()

    def free(self, name: str) -> None:
        """Empty an adapter's slot (zeroed, so a lower-rank successor's padding is zero)."""
        import torch

        slot = self.slots.pop(name)
        self.scaling.pop(name)
        lo, hi = slot * self.rank, (slot + 1) * self.rank
        with torch.no_grad():
            for layer in self.layers.values():
                layer.a[lo:hi].zero_()
                layer.b[:, lo:hi].zero_()
        self._width = self._occupied()
        if not self.slots:  # the slots stay allocated for the next attach; idle hooks would cost every forward pass
            for layer in self.layers.values():
                layer.hook.remove()
                layer.hook = None

    def __contains__(self, name: object) -> bool:
        return name in self.slots

    @contextlib.contextmanager
    def rows(self, adapters: list[str | None]):
        """Route row i through `adapters[i]` for the forward passes inside: a slot adapter's delta is added, any
        other row (the base, or an adapter on PEFT's path) gets none from here."""
        import torch

        values = [[0.0] * self._width for _ in adapters]
        for i, adapter in enumerate(adapters):
            if adapter in self.slots:
                lo = self.slots[adapter] * self.rank
                values[i][lo : lo + self.rank] = [self.scaling[adapter]] * self.rank
        if any(adapter in self.slots for adapter in adapters):
            layer = next(iter(self.layers.values()))
            self._gate = torch.tensor(values, dtype=layer.a.dtype, device=layer.a.device)[:, None, :]
        try:
            yield
        finally:
            self._gate = None

    # ------------------------------------------------------------------ internals
    def _occupied(self) -> int:
        """Columns up to the end of the highest occupied slot (kept in `_width`: the hooks read it at every layer)."""
        return (max(self.slots.values()) + 1) * self.rank if self.slots else 0

    def _add_layer(self, module: str, dtype) -> _Layer:
        layer = self.layers[module] = _Layer(self._modules[module], self.capacity, self.rank, dtype)
        return layer

    def _resize(self, capacity: int, rank: int) -> None:
        """Reallocate every layer's slots for `capacity` adapters of up to `rank`, keeping each slot's weights."""
        import torch

        old = self.rank
        with torch.no_grad():
            for layer in self.layers.values():
                a, b = layer.a, layer.b
                layer.a = a.new_zeros((capacity * rank, a.shape[1]))
                layer.b = b.new_zeros((b.shape[0], capacity * rank))
                for slot in self.slots.values():
                    layer.a[slot * rank : slot * rank + old] = a[slot * old : (slot + 1) * old]
                    layer.b[:, slot * rank : slot * rank + old] = b[:, slot * old : (slot + 1) * old]
        self.capacity, self.rank = capacity, rank

    def _add_rows(self, layer: _Layer, _module, args, output):
        gate = self._gate
        if gate is None:
            return None
        import torch.nn.functional as F

        width = self._width
        if gate.device != layer.a.device:  # a model spread over several devices
            gate = gate.to(layer.a.device)
        hidden = F.linear(args[0].to(layer.a.dtype), layer.a[:width]) * gate
        return output + F.linear(hidden, layer.b[:, :width]).to(output.dtype)


@contextlib.contextmanager
def route(handle, adapters: list[str | None]):
    """The model to call for a batch whose row i runs on `adapters[i]` (None: the base), and the keyword arguments
    it needs: slot adapters through `LoraSlots.rows`, adapters on PEFT's path through PEFT's own per-row
    `adapter_names` (only while one is resident, which wraps the model in a `PeftModel`), or, for an adapter PEFT
    cannot mix (`handle.solo`), as PEFT's active adapter for a batch of its rows alone."""
    kwargs: dict[str, Any] = {}
    solo = handle.solo.intersection(adapters)
    if solo:  # PEFT cannot mix these rows with others (DoRA): the batcher runs them in batches of their own
        if len(solo) > 1 or len(set(adapters)) > 1:
            raise ValueError(f"rows on {sorted(solo)} cannot share a batch with rows on other adapters")
        handle.model.set_adapter(next(iter(solo)))
    elif handle.peft:
        kwargs["adapter_names"] = [a if a in handle.peft else BASE for a in adapters]
    with handle.slots.rows(adapters):
        yield handle.model, kwargs
