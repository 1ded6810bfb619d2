"""The LoRA slots on the tiny model: which adapters they hold and why the others take PEFT's path, the one-pass
NaN check, and slots that widen for a higher rank without changing a resident adapter's answers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from selfalign.runtime.adapters import write_random_adapter
from selfalign.runtime.generate import infer
from selfalign.runtime.loader import apply_adapter, load_base
from selfalign.runtime.lora import read_slot_weights, unsupported

PLAIN = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", "use_dora": False, "rank_pattern": {}}


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny_llama")


def pair(tiny, module="model.layers.0.self_attn.q_proj", r=4):
    layer = dict(tiny.model.named_modules())[module]
    key = f"base_model.model.{module}"
    return {
        f"{key}.lora_A.weight": torch.ones(r, layer.in_features),
        f"{key}.lora_B.weight": torch.ones(layer.out_features, r),
    }


def test_what_the_slots_hold_and_why_not(tiny):
    modules = dict(tiny.model.named_modules())
    ok = pair(tiny)
    assert unsupported(PLAIN, ok, modules, max_rank=64) is None
    for change, reason in [
        ({"use_dora": True}, "use_dora=True"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern={'q_proj': 8}"),
        ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern={'q_proj': 8}"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head']"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"lora_bias": True}, "lora_bias=True"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out=True"),
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not LORA"),
    ]:
        assert unsupported(PLAIN | change, ok, modules, max_rank=64) == reason
    assert unsupported(PLAIN, ok, modules, max_rank=2) == "rank 4 is above the slots' maximum 2"
    embed = {"base_model.model.model.embed_tokens.lora_A.weight": torch.ones(4, 8)}
    embed["base_model.model.model.embed_tokens.lora_B.weight"] = torch.ones(8, 4)
    assert "is not a linear layer" in unsupported(PLAIN, embed, modules, max_rank=64)
    half = {k: v for k, v in ok.items() if "lora_A" in k}
    assert unsupported(PLAIN, half, modules, max_rank=64).endswith("has no LoRA B weight")
    assert "do not fit r=8" in unsupported(PLAIN | {"r": 8}, ok, modules, max_rank=64)
    assert unsupported(PLAIN, {"base_model.model.x.weight": torch.ones(1)}, modules, max_rank=64).startswith("tensor")
    assert unsupported(PLAIN, {}, modules, max_rank=64) == "no LoRA weights"


def test_the_one_pass_nan_check_and_its_fallback(tiny):
    tensors = pair(tiny)
    assert read_slot_weights(PLAIN, tensors, save(tensors)).scaling == 2.0
    assert read_slot_weights(PLAIN | {"use_rslora": True}, tensors, save(tensors)).scaling == 4.0  # 8 / sqrt(4)
    huge = {k: torch.full_like(v, 3e38) for k, v in tensors.items()}  # finite, but their sum overflows to inf
    assert read_slot_weights(PLAIN, huge, save(huge)).rank == 4  # the tensor-by-tensor check accepts them
    bad = {k: v.clone() for k, v in tensors.items()}
    next(iter(bad.values()))[1, 2] = float("inf")
    for data in (save(bad), None):
        with pytest.raises(ValueError, match="1 of 2 weight tensors hold NaN or inf"):
            read_slot_weights(PLAIN, bad, data)


def test_a_higher_rank_widens_the_slots_and_resident_answers_stay(tmp_path):
    handle = load_base("tiny_llama", lora_slots=2)
    write_random_adapter(handle, tmp_path / "r8", "r8", r=8, seed=1)
    write_random_adapter(handle, tmp_path / "r32", "r32", r=32, seed=2)
    apply_adapter(handle, "r8", root=tmp_path)
    before = infer(handle, "Name a river.", max_new_tokens=10)
    assert handle.slots.rank == 8
    apply_adapter(handle, "r32", root=tmp_path, activate=False)
    assert handle.slots.rank == 32 and handle.slots.slots == {"r8": 0, "r32": 1} and not handle.peft
    assert infer(handle, "Name a river.", max_new_tokens=10, adapter="r8") == before
    assert infer(handle, "Name a river.", max_new_tokens=10, adapter="r32") != before
