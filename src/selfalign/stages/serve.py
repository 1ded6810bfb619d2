"""`stage=serve`: the OpenAI-compatible server, bound to 127.0.0.1 unless `serve.host` says otherwise."""

from __future__ import annotations

import os
import socket

from selfalign.config import SelfAlignConfig, is_loopback
from selfalign.errors import SelfAlignError
from selfalign.runtime.batching import in_own_thread
from selfalign.runtime.loader import BaseModelHandle, apply_adapter, load_base
from selfalign.utils.console import console
from selfalign.utils.logging import EventLog


def api_key(env_name: str | None) -> str | None:
    if not env_name:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise SelfAlignError(f"serve.api_key_env={env_name} but ${env_name} is empty; export it or unset the option")
    return key


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model loads: a busy port fails in milliseconds, and nothing can take
    the port between this check and the server starting (uvicorn serves on this very socket)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as exc:
        raise SelfAlignError(
            f"serve.port={port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
            "pick another serve.port or stop what holds it"
        ) from None
    return sock


def preflight(cfg: SelfAlignConfig) -> str | None:
    """The checks that need no model, before the 7-12 s load: the API key, adapter paths and formats."""
    from selfalign.runtime.adapters import preflight as adapter_preflight

    key = api_key(cfg.serve.api_key_env)
    if key is None and not is_loopback(cfg.serve.host):
        raise SelfAlignError(
            f"serve.host={cfg.serve.host} is reachable from other machines: set serve.api_key_env=<VAR> and export "
            "a key in $VAR (clients send it as a Bearer token), or keep the default serve.host=127.0.0.1"
        )
    for path in cfg.serve.adapters:
        adapter_preflight(path, cfg.paths.adapters_dir, cfg.base_model.name)
    return key


def load(cfg: SelfAlignConfig) -> BaseModelHandle:
    """The base model with `serve.adapters` resident."""
    handle = load_base(
        cfg.base_model,
        cache_dir=cfg.paths.cache_dir,
        qlora=cfg.lora.qlora,
        lora_slots=cfg.serve.max_adapters,
        max_lora_rank=cfg.serve.max_lora_rank,
    )
    for path in cfg.serve.adapters:
        apply_adapter(
            handle,
            path,
            root=cfg.paths.adapters_dir,
            activate=False,
            reserved=(cfg.serve.model_alias,),
            max_adapters=cfg.serve.max_adapters,
        )
    return handle


def run(cfg: SelfAlignConfig) -> dict:
    key = preflight(cfg)
    sock = bind(cfg.serve.host, cfg.serve.port)
    try:
        import uvicorn

        from selfalign.runtime.server import create_app

        handle = in_own_thread(load, cfg)  # the batch worker is to be the one thread that computes
    except BaseException:
        sock.close()
        raise
    app = create_app(handle, cfg.paths.adapters_dir, cfg.serve, api_key=key)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
    events = EventLog(cfg.paths.run_dir)
    events.event("serve_start", url=url, base_model=handle.name, adapters=list(handle.adapters))
    console.print(f"[bold green]serving[/] {handle.name} at {url} (adapters root {cfg.paths.adapters_dir})")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    events.event("serve_stop")
    return {"passed": True, "url": url}
