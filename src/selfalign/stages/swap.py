"""`stage=swap adapter=<dir>`: ask a running server to load and activate an adapter (`adapter=base`: the base)."""

from __future__ import annotations

import os

from selfalign.config import SelfAlignConfig
from selfalign.errors import SelfAlignError
from selfalign.runtime.loader import BASE_ALIASES
from selfalign.utils.console import console
from selfalign.utils.logging import EventLog


def post(base_url: str, path: str, body: dict, key: str | None, timeout: float) -> dict:
    """POST `body` to the server's `path` with the `openai` client (no retries: a swap is not repeated behind the
    user's back); a refusal or no server at all is one line."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=key or "none", timeout=timeout, max_retries=0)
    try:
        return client.post(path, body=body, cast_to=object)
    except openai.APIStatusError as exc:
        error = exc.body if isinstance(exc.body, dict) else {}
        message = error.get("message") or exc.response.reason_phrase
        raise SelfAlignError(f"server refused the swap ({exc.status_code}): {message}") from None
    except openai.APIConnectionError as exc:
        raise SelfAlignError(f"no server answering at {base_url}{path} ({exc}); start one with stage=serve") from None


def run(cfg: SelfAlignConfig) -> dict:
    if cfg.adapter is None:  # never a silent switch back to the base
        raise SelfAlignError(
            "stage=swap needs adapter=<dir under paths.adapters_dir>, or adapter=base for the base model"
        )
    base_url, path = f"http://{cfg.serve.host}:{cfg.serve.port}/v1", "/adapters/swap"
    body = {"name": None} if cfg.adapter in BASE_ALIASES else {"path": cfg.adapter}
    key = os.environ.get(cfg.serve.api_key_env) if cfg.serve.api_key_env else None
    reply = post(base_url, path, body, key, cfg.serve.timeout_s)
    active = reply.get("active")
    timing = f" in {reply['attach_ms']} ms" if "attach_ms" in reply else ""
    console.print(f"active adapter: [bold]{active or 'base'}[/]{timing}")
    EventLog(cfg.paths.run_dir).event("swap", url=base_url + path, active=active)
    return {"passed": True, "active": active}
