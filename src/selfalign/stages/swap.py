"""`stage=swap adapter=<dir>`: ask a running server to load and activate an adapter (`adapter=base`: the base)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from selfalign.config import SelfAlignConfig
from selfalign.errors import SelfAlignError
from selfalign.runtime.loader import BASE_ALIASES
from selfalign.utils.console import console
from selfalign.utils.logging import EventLog


def post(url: str, body: dict, key: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise SelfAlignError(f"server refused the swap ({exc.code}): {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SelfAlignError(f"no server answering at {url} ({exc}); start one with stage=serve") from None


def run(cfg: SelfAlignConfig) -> dict:
    if cfg.adapter is None:  # never a silent switch back to the base
        raise SelfAlignError(
            "stage=swap needs adapter=<dir under paths.adapters_dir>, or adapter=base for the base model"
        )
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1/adapters/swap"
    body = {"name": None} if cfg.adapter in BASE_ALIASES else {"path": cfg.adapter}
    key = os.environ.get(cfg.serve.api_key_env) if cfg.serve.api_key_env else None
    reply = post(url, body, key, cfg.serve.timeout_s)
    active = reply.get("active")
    timing = f" in {reply['attach_ms']} ms" if "attach_ms" in reply else ""
    console.print(f"active adapter: [bold]{active or 'base'}[/]{timing}")
    EventLog(cfg.paths.run_dir).event("swap", url=url, active=active)
    return {"passed": True, "active": active}
