"""`stage=serve`: the OpenAI-compatible server, bound to 127.0.0.1 unless `serve.host` says otherwise."""

from __future__ import annotations

import os

from selfalign.config import SelfAlignConfig
from selfalign.errors import SelfAlignError
from selfalign.runtime.loader import apply_adapter, load_base
from selfalign.utils.console import console
from selfalign.utils.logging import EventLog


def api_key(env_name: str | None) -> str | None:
    if not env_name:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise SelfAlignError(f"serve.api_key_env={env_name} but ${env_name} is empty; export it or unset the option")
    return key


def run(cfg: SelfAlignConfig) -> dict:
    import uvicorn

    from selfalign.runtime.server import create_app

    key = api_key(cfg.serve.api_key_env)
    handle = load_base(cfg.base_model, cache_dir=cfg.paths.cache_dir, qlora=cfg.lora.qlora)
    for path in cfg.serve.adapters:
        apply_adapter(handle, path, root=cfg.paths.adapters_dir, activate=False)
    app = create_app(
        handle,
        cfg.paths.adapters_dir,
        api_key=key,
        alias=cfg.serve.model_alias,
        default_max_tokens=cfg.serve.max_new_tokens,
    )
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
    events = EventLog(cfg.paths.run_dir)
    events.event("serve_start", url=url, base_model=handle.name, adapters=list(handle.adapters))
    console.print(f"[bold green]serving[/] {handle.name} at {url} (adapters root {cfg.paths.adapters_dir})")
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning")
    events.event("serve_stop")
    return {"passed": True, "url": url}
