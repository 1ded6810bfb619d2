"""`stage=infer`: answer `prompt=...` with the base model or `adapter=<dir>`; writes `infer.json`."""

from __future__ import annotations

from pathlib import Path

from rich.panel import Panel

from selfalign.config import SelfAlignConfig
from selfalign.errors import SelfAlignError
from selfalign.runtime.adapters import preflight
from selfalign.runtime.generate import generate
from selfalign.runtime.loader import BASE_ALIASES, apply_adapter, load_base
from selfalign.utils.console import console
from selfalign.utils.io import write_json
from selfalign.utils.logging import EventLog


def run(cfg: SelfAlignConfig) -> dict:
    if not cfg.prompt:
        raise SelfAlignError('stage=infer needs a prompt: prompt="Explain the Lindy effect."')
    with_adapter = cfg.adapter is not None and cfg.adapter not in BASE_ALIASES
    if with_adapter:  # path, format and base model checked before the 7-12 s load
        preflight(cfg.adapter, cfg.paths.adapters_dir, cfg.base_model.name)
    handle = load_base(cfg.base_model, cache_dir=cfg.paths.cache_dir, qlora=cfg.lora.qlora)
    if with_adapter:
        apply_adapter(handle, cfg.adapter, root=cfg.paths.adapters_dir)
    result = generate(
        handle,
        [cfg.prompt],
        max_new_tokens=cfg.infer.max_new_tokens,
        temperature=cfg.infer.temperature,
        top_p=cfg.infer.top_p,
        seed=cfg.seed,
    )
    who = result.adapter or f"base ({handle.name})"
    tok_s = result.completion_tokens[0] / result.seconds if result.seconds else 0.0
    console.print(Panel(result.texts[0], title=f"[bold]{who}[/]", subtitle=f"{tok_s:.1f} tok/s"))
    record = {
        "prompt": cfg.prompt,
        "adapter": result.adapter,
        "adapter_dir": str(handle.adapters[result.adapter]) if result.adapter else None,
        "base_model": handle.name,
        "output": result.texts[0],
        "completion_tokens": result.completion_tokens[0],
        "seconds": round(result.seconds, 3),
    }
    write_json(record, Path(cfg.paths.run_dir) / "infer.json")
    EventLog(cfg.paths.run_dir).event("infer", adapter=result.adapter, tokens=result.completion_tokens[0])
    return {"passed": True, **record}
