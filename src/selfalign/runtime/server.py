"""An OpenAI-compatible chat server over one loaded base model with hot-swappable LoRA adapters.

- `GET /v1/models`: the base, every resident adapter, and the alias that follows the active adapter.
- `POST /v1/chat/completions`: `model=<adapter name | base name | alias>`, streaming or not.
- `GET/POST /v1/adapters`, `POST /v1/adapters/swap`, `DELETE /v1/adapters/{name}`: manage adapters
  at runtime, loaded only from inside the adapter root.

A request's adapter is fixed when it arrives, so a swap never changes a request already in flight.
Errors are JSON `{"error": {"message", "type", "code"}}` with a 4xx status; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from selfalign.errors import SelfAlignError
from selfalign.runtime.loader import (
    BaseModelHandle,
    apply_adapter,
    generate,
    names_base,
    set_active,
    unload_adapter,
)


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]  # a list of parts, as OpenAI clients send: text parts only

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[ContentPart]) -> str:
        if isinstance(content, str):
            return content
        for i, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise ValueError(f"part {i} has type {part.type!r}: this server takes text parts only")
        return "".join(part.text for part in content)


class ChatRequest(BaseModel):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None


class AdapterLoad(BaseModel):
    path: str
    name: str | None = None
    activate: bool = False


class AdapterSwap(BaseModel):
    name: str | None = None  # a resident adapter, or None / "base" for the base model
    path: str | None = None  # load from the adapter root first (then activate)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind


def _error(status: int, message: str, code: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


def _apply_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else stop or []
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def create_app(
    handle: BaseModelHandle,
    adapters_root: str | Path,
    *,
    api_key: str | None = None,
    alias: str = "selfalign",
    default_max_tokens: int = 256,
    max_tokens_limit: int = 1024,
) -> FastAPI:
    app = FastAPI(title="SelfAlign", version="1")
    root = Path(adapters_root)
    admin = asyncio.Lock()  # one adapter-management call at a time

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(
                401, "missing or wrong API key (Authorization: Bearer <key>)", "invalid_api_key", "authentication_error"
            )

    guard = [Depends(check_key)]

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return _error(exc.status, exc.message, exc.code, exc.kind)

    @app.exception_handler(SelfAlignError)
    async def _user_error(_, exc: SelfAlignError):
        return _error(400, str(exc), "invalid_request")

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # loc is ("body", <character offset>)
            at = first.get("loc", ("body", "?"))[-1]
            detail = (first.get("ctx") or {}).get("error", "")
            return _error(
                400, f"request body is not valid JSON (at character {at}: {detail})".replace(": )", ")"), "invalid_json"
            )
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return _error(400, f"{where}: {message}".strip(": "), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error")

    def route(model: str) -> str | None:
        """The adapter a request uses, fixed now: None is the base model."""
        with handle.lock:
            if model == alias:
                return handle.active
            if model == handle.name:
                return None
            if model in handle.adapters:
                return model
            known = [handle.name, alias, *handle.adapters]
        raise ApiError(404, f"model {model!r} not found; available: {', '.join(known)}", "model_not_found")

    def adapter_info(name: str) -> dict:
        m = handle.manifests[name]
        return {
            "name": name,
            "path": str(handle.adapters[name]),
            "adapter_id": m["adapter_id"],
            "version": m["version"],
            "base_model": m["base_model"],
        }

    def model_card(model_id: str, **extra) -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "selfalign", **extra}

    @app.get("/health")
    async def health():
        return {"status": "ok", "base_model": handle.name, "active": handle.active}

    @app.get("/v1/models", dependencies=guard)
    async def models():
        with handle.lock:
            data = [model_card(handle.name, kind="base"), model_card(alias, kind="alias", active=handle.active)]
            data += [model_card(n, kind="adapter", parent=handle.name) for n in handle.adapters]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", dependencies=guard)
    async def chat(req: ChatRequest, request: Request):
        adapter = route(req.model)
        max_new = req.max_completion_tokens or req.max_tokens or default_max_tokens
        if max_new > max_tokens_limit:  # one request must not hold the model for every other client
            raise ApiError(
                400,
                f"max_tokens={max_new} is above this server's limit of {max_tokens_limit} (serve.max_tokens_limit)",
                "max_tokens_too_large",
            )
        messages = [m.model_dump() for m in req.messages]
        options = dict(
            max_new_tokens=max_new,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            adapter=adapter or "base",
        )
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        headers = {"x-selfalign-adapter": adapter or "base"}
        if req.stream:
            return StreamingResponse(
                stream(messages, options, req, rid, created, request),
                media_type="text/event-stream",
                headers=headers,
            )
        result = await run_in_threadpool(generate, handle, [messages], **options)
        text, stopped = _apply_stop(result.texts[0], req.stop)
        finish = "length" if result.completion_tokens[0] >= max_new and not stopped else "stop"
        usage = {
            "prompt_tokens": result.prompt_tokens[0],
            "completion_tokens": result.completion_tokens[0],
            "total_tokens": result.prompt_tokens[0] + result.completion_tokens[0],
        }
        body = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage,
        }
        return JSONResponse(body, headers=headers)

    async def stream(messages, options, req: ChatRequest, rid: str, created: int, request: Request):
        """SSE chunks. While the model generates, a watcher waits on the connection (as Starlette's own disconnect
        listener does): when the client goes away it sets `cancel`, and the generation stops after the token step
        in progress, freeing the model for the next request. Chunks alone are no signal: the streamer holds text
        back until a word ends, and a write to a closed socket is not always an error."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(handle.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        outcome: dict = {}
        cancel = threading.Event()

        def work():
            try:
                outcome["result"] = generate(handle, [messages], streamer=streamer, cancel=cancel, **options)
            except Exception as exc:  # surfaced to the client as an error event
                outcome["error"] = str(exc)
                streamer.end()

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(body)}\n\n"

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            cancel.set()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        watcher = asyncio.create_task(watch())
        try:
            yield chunk({"role": "assistant", "content": ""})
            sent, stopped = "", False
            pieces = iter(streamer)
            while (piece := await run_in_threadpool(next, pieces, None)) is not None:
                if cancel.is_set():
                    break
                if stopped:
                    continue
                text, stopped = _apply_stop(sent + piece, req.stop)
                if len(text) > len(sent):
                    yield chunk({"content": text[len(sent) :]})
                    sent = text
        finally:
            cancel.set()  # a no-op after a normal end; after a disconnect (or a cancelled task) it stops generation
            watcher.cancel()
        await run_in_threadpool(thread.join)
        if await request.is_disconnected():
            return
        if "error" in outcome:
            yield f"data: {json.dumps({'error': {'message': outcome['error'], 'type': 'server_error'}})}\n\n"
        else:
            result = outcome["result"]
            limit = options["max_new_tokens"]
            yield chunk({}, "length" if result.completion_tokens[0] >= limit and not stopped else "stop")
        yield "data: [DONE]\n\n"

    @app.get("/v1/adapters", dependencies=guard)
    async def list_adapters():
        with handle.lock:
            return {"active": handle.active, "adapters": [adapter_info(n) for n in handle.adapters]}

    def load(path: str, name: str | None, activate: bool) -> dict:
        t0 = time.perf_counter()
        loaded = apply_adapter(handle, path, root=root, name=name, activate=activate)
        return {
            **adapter_info(loaded),
            "active": handle.active,
            "attach_ms": round((time.perf_counter() - t0) * 1e3, 1),
        }

    @app.post("/v1/adapters", dependencies=guard)
    async def load_adapter(body: AdapterLoad):
        async with admin:
            return await run_in_threadpool(load, body.path, body.name, body.activate)

    @app.post("/v1/adapters/swap", dependencies=guard)
    async def swap(body: AdapterSwap):
        async with admin:
            if body.path is not None:
                return await run_in_threadpool(load, body.path, body.name, True)
            name = None if body.name is None or names_base(handle, body.name) else body.name
            if name is not None and name not in handle.adapters:
                raise ApiError(404, f"adapter {name!r} is not loaded; load it with a path", "adapter_not_found")
            set_active(handle, name)
            return {"active": handle.active}

    @app.delete("/v1/adapters/{name}", dependencies=guard)
    async def unload(name: str):
        async with admin:
            if name not in handle.adapters:
                raise ApiError(404, f"adapter {name!r} is not loaded", "adapter_not_found")
            await run_in_threadpool(unload_adapter, handle, name)
            return {"unloaded": name, "active": handle.active}

    return app
