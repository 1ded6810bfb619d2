"""Per-architecture facts, in one place: each family's LoRA target modules; and the documented chat templates.

`base_model.family` selects a row. `lora.targets` names groups (`attn`, `mlp`), mapped here to the family's module
names; the config schema validates the groups against `LORA_TARGET_GROUPS`. A chat template belongs to a checkpoint,
not an architecture (SmolLM2 is a Llama that speaks ChatML, Llama 3 is not): a tokenizer whose source ships none
gets the one its preset names in `base_model.chat_template` (`ensure_chat_template`), else the model is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfalign.errors import SelfAlignError

# ChatML as SmolLM2 and Qwen2 document it (no default system line: the GGUF's own template adds one).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


CHAT_TEMPLATES = {"chatml": CHATML}  # what `base_model.chat_template` may name


@dataclass(frozen=True)
class Family:
    lora_targets: dict[str, tuple[str, ...]]  # `lora.targets` group -> the architecture's module names


_SEPARATE = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
FAMILIES: dict[str, Family] = {
    "llama": Family(_SEPARATE),
    "qwen2": Family(_SEPARATE),
    "mistral": Family(_SEPARATE),
    "gemma2": Family(_SEPARATE),
    "phi3": Family({"attn": ("qkv_proj", "o_proj"), "mlp": ("gate_up_proj", "down_proj")}),  # fused projections
}
LORA_TARGET_GROUPS = ("attn", "mlp")  # every family maps both


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise SelfAlignError(f"no LoRA target map for family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def lora_target_modules(family_name: str, groups: list[str]) -> list[str]:
    """The module names PEFT targets for `groups` on this family."""
    targets = family(family_name).lora_targets
    unknown = sorted(set(groups) - set(targets))
    if unknown:
        raise SelfAlignError(f"unknown LoRA target group(s) {unknown}; use {sorted(targets)}")
    return [name for group in groups for name in targets[group]]
