"""Reference answers from an implementation independent of the project's engine: Hugging Face's own `generate` on
PEFT's `PeftModel`, one prompt at a time, no padding, on a separate copy of the base model. The engine's greedy
answers (batcher, LoRA slots) are checked token for token against these."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from selfalign.runtime.chat import render_prompt
from selfalign.runtime.generate import Generation
from selfalign.runtime.loader import load_base


class HFReference:
    def __init__(self, model_id: str, adapters: dict[str, Path]):
        base = load_base(model_id)  # its own copy: nothing the engine does to its handle reaches this one
        self.tok = base.tokenizer
        self.model = base.model
        for name, path in adapters.items():
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos = sorted({self.tok.eos_token_id, *eos})
        self.memo: dict = {}

    def __call__(self, prompts: list, *, max_new_tokens: int, adapter: str | None = None) -> Generation:
        """Greedy answers on `adapter` (None or "base": the base), as a `Generation` like the engine's."""
        texts, prompt_tokens, completion = [], [], []
        for prompt in prompts:
            key = (str(prompt), max_new_tokens, adapter)
            if key not in self.memo:
                self.memo[key] = self._one(prompt, max_new_tokens, None if adapter in (None, "base") else adapter)
            text, n_prompt, n_new = self.memo[key]
            texts.append(text)
            prompt_tokens.append(n_prompt)
            completion.append(n_new)
        return Generation(texts, prompt_tokens, completion, 0.0, adapter)

    def _one(self, prompt, max_new_tokens: int, adapter: str | None) -> tuple[str, int, int]:
        ids = self.tok(render_prompt(self.tok, prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "eos_token_id": self.eos}
        kwargs |= {"pad_token_id": self.tok.pad_token_id, "temperature": None, "top_p": None, "top_k": None}
        with torch.inference_mode():
            if adapter is None and isinstance(self.model, PeftModel):
                with self.model.disable_adapter():
                    out = self.model.generate(input_ids=ids, **kwargs)
            else:
                if adapter is not None:
                    self.model.set_adapter(adapter)
                out = self.model.generate(input_ids=ids, **kwargs)
        new = out[0, ids.shape[1] :].tolist()
        n_new = next((i + 1 for i, t in enumerate(new) if t in self.eos), len(new))
        return self.tok.decode(new[:n_new], skip_special_tokens=True).strip(), ids.shape[1], n_new
