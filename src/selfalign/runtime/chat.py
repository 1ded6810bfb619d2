"""The one chat rendering used by synth, train, eval and serve, and the template's hash.

Prompts are rendered with the tokenizer's own chat template. Where a source ships none, the family's
documented template is set explicitly (ChatML for SmolLM2 / Qwen2). A user turn without a system
message is rendered as is: the template's own default system prompt (if it has one) then applies the
same way at training and at inference.
"""

from __future__ import annotations

from selfalign.runtime.families import FAMILIES
from selfalign.utils.hashing import sha256_bytes


def ensure_chat_template(tokenizer, family: str) -> str:
    """Give the tokenizer a chat template if its source lacks one; return the template in use."""
    if not tokenizer.chat_template:
        template = FAMILIES[family].chat_template if family in FAMILIES else None
        if template is None:
            raise ValueError(f"tokenizer has no chat template and family {family!r} has no documented default")
        tokenizer.chat_template = template
    return tokenizer.chat_template


def chat_template_hash(tokenizer) -> str:
    """sha256 of the template text: adapters record it, and attaching checks it matches."""
    return sha256_bytes(tokenizer.chat_template.encode("utf-8"))


def as_messages(prompt: str | list[dict], system: str | None = None) -> list[dict]:
    if isinstance(prompt, list):
        return prompt
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": prompt}]


def render_prompt(tokenizer, prompt: str | list[dict], system: str | None = None) -> str:
    """The text the model sees before its answer: a user prompt (or a message list) plus the generation cue."""
    return tokenizer.apply_chat_template(as_messages(prompt, system), tokenize=False, add_generation_prompt=True)


def render_example(tokenizer, prompt: str | list[dict], answer: str, system: str | None = None) -> tuple[str, str]:
    """(prompt text, full text) for SFT: the loss covers only what the full text adds to the prompt."""
    head = render_prompt(tokenizer, prompt, system)
    full = tokenizer.apply_chat_template(
        [*as_messages(prompt, system), {"role": "assistant", "content": answer}], tokenize=False
    )
    if not full.startswith(head):
        raise ValueError("chat template renders the assistant turn inconsistently with the generation prompt")
    return head, full
