"""The one chat rendering used by synth, train, eval and serve, and the template's hash.

Prompts are rendered with the tokenizer's own chat template. Where a source ships none, the template the base
model's preset names (`base_model.chat_template`: ChatML for SmolLM2) is set explicitly; with none named, the model
is refused. A user turn without a system
message is rendered as is: the template's own default system prompt (if it has one) then applies the
same way at training and at inference.
"""

from __future__ import annotations

from selfalign.errors import SelfAlignError
from selfalign.runtime.families import CHAT_TEMPLATES
from selfalign.utils.hashing import sha256_bytes


def ensure_chat_template(tokenizer, cfg) -> str:
    """Give the tokenizer the template `cfg.chat_template` names if its source ships none; return the one in use.
    Neither: a SelfAlignError, never a guess (a Llama 3 rendered in ChatML answers, badly)."""
    if not tokenizer.chat_template:
        if cfg.chat_template is None:
            raise SelfAlignError(
                f"base model {cfg.name!r}: its tokenizer ships no chat template; set base_model.chat_template to "
                f"the one it was trained with ({', '.join(CHAT_TEMPLATES)}) or use a checkpoint that ships one"
            )
        tokenizer.chat_template = CHAT_TEMPLATES[cfg.chat_template]
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
