"""An OpenAI-compatible chat server over one loaded base model with hot-swappable LoRA adapters.

- `GET /v1/models`: the base, every resident adapter, and the alias that follows the active adapter.
- `POST /v1/chat/completions`: `model=<adapter name | base name | alias>`, streaming or not.
- `GET/POST /v1/adapters`, `POST /v1/adapters/swap`, `DELETE /v1/adapters/{name}`: manage adapters
  at runtime, loaded only from inside the adapter root.
- `GET /v1/status`: the base, the resident adapters and the queue.
- `GET /health`: a bare liveness check, `{"status": "ok"}`: the one endpoint that needs no key and names nothing.
  With a key set, the API schema (`/openapi.json`) needs it too, and the browsable docs (`/docs`, `/redoc`) are off.

Chat requests are batched across adapters (`runtime/batching.py`): concurrent requests for the base and for
any resident adapters decode together, each row on its own adapter and with its own settings. A request's
adapter is fixed when it arrives, so a swap never changes a request already in flight; unloading an adapter
waits for the rows decoding on it. A full queue answers 429 with Retry-After. Errors are JSON
`{"error": {"message", "type", "code"}}` with a 4xx/5xx status; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
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
from pydantic import BaseModel, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from selfalign.config import ServeConfig, sampling_problem
from selfalign.errors import SelfAlignError
from selfalign.runtime.batching import Batcher, Job, QueueFull, Rejected
from selfalign.runtime.chat import render_prompt
from selfalign.runtime.loader import BaseModelHandle, apply_adapter, check_context, names_base, set_active

log = logging.getLogger(__name__)


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]  # a list of parts, as OpenAI clients send: text parts only

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[ContentPart]) -> str:
        if isinstance(content, list):
            for i, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise ValueError(f"part {i} has type {part.type!r}: this server takes text parts only")
            content = "".join(part.text for part in content)
        try:  # JSON may carry a lone surrogate ("\ud800"), which is no Unicode text a tokenizer can read
            content.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"holds {content[exc.start]!r} at character {exc.start}: not valid Unicode text") from None
        return content


class ChatRequest(BaseModel):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    min_tokens: int = Field(default=0, ge=0)  # vLLM's extension: no end-of-sequence before this many tokens
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None

    @model_validator(mode="after")
    def _sampling(self) -> ChatRequest:  # the rule `infer.*` follows on the CLI
        problem = sampling_problem(self.temperature, self.top_p, self.seed)
        if problem:
            raise ValueError(problem)
        return self


class AdapterLoad(BaseModel):
    path: str
    name: str | None = None
    activate: bool = False


class AdapterSwap(BaseModel):
    name: str | None = None  # a resident adapter, or None / "base" for the base model
    path: str | None = None  # load from the adapter root first (then activate)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")


def _error(
    status: int, message: str, code: str, kind: str = "invalid_request_error", headers: dict | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a JSON 413 before anything reads or parses it, and
    before authentication: by its Content-Length when it declares one, else as soon as the bytes received pass it.

    Before answering, the rest of the body is read and dropped, up to `DISCARD_LIMITS` times `limit`: a server that
    answers and closes while the client is still sending makes the client's kernel see a reset, and the client loses
    the 413 it was sent (seen in 1 of 3 runs of a 2 MiB upload). A larger body is cut off after that much."""

    DISCARD_LIMITS = 8

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit
        self.message = f"request body is over {limit:,} bytes (serve.max_body_bytes)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(receive, send)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(413, self.message)
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(receive, send)

    async def _refuse(self, receive, send):
        dropped = 0
        while dropped <= self.DISCARD_LIMITS * self.limit:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nobody to answer
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = json.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": "invalid_request_error",
                    "code": "body_too_large",
                }
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(StarletteHTTPException):
    """Raised from `receive` once the body passes the limit: FastAPI re-raises HTTP exceptions while it reads a body,
    so this reaches the JSON error handler (or the middleware, when nothing has answered yet)."""


def create_app(
    handle: BaseModelHandle,
    adapters_root: str | Path,
    settings: ServeConfig,
    *,
    api_key: str | None = None,
) -> FastAPI:
    alias, max_tokens_limit = settings.model_alias, settings.max_tokens_limit
    batcher = Batcher(
        handle,
        max_batch=settings.max_batch,
        max_queue=settings.max_queue,
        wait_ms=settings.batch_wait_ms,
        prefill_chunk=settings.prefill_chunk,
        prefix_cache_tokens=settings.prefix_cache_tokens,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.close)

    docs = {"openapi_url": None, "docs_url": None, "redoc_url": None} if api_key is not None else {}
    app = FastAPI(title="SelfAlign", version="1", lifespan=lifespan, **docs)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.state.batcher = batcher
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
        return _error(exc.status, exc.message, exc.code, exc.kind, exc.headers)

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

    @app.exception_handler(Exception)
    async def _unexpected(_, exc: Exception):  # a bug, never a plain-text 500: JSON like every other error
        log.exception("request failed")
        return _error(500, f"internal error ({type(exc).__name__})", "internal_error", "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        code = {404: "not_found", 413: "body_too_large"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, str(exc.detail), code)

    def route(model: str) -> tuple[str | None, int | None]:
        """The adapter a request uses (None: the base model) and its attach id, both fixed now.

        Read without `handle.lock`, which the batch worker holds for a whole token step: the event loop must not
        wait on it. The reads are single dict lookups; an id gone stale by an unload in between is caught by the
        scheduler (409)."""
        name = handle.active if model == alias else None if model == handle.name else model
        if name is None:
            return None, None
        attach_id = handle.attach_ids.get(name)
        if attach_id is not None and name in handle.adapters:
            return name, attach_id
        known = [handle.name, alias, *list(handle.adapters)]
        raise ApiError(404, f"model {model!r} not found; available: {', '.join(known)}", "model_not_found")

    def adapter_info(name: str) -> dict:
        m = handle.manifests[name]
        return {
            "name": name,
            "path": str(handle.adapters[name]),
            "adapter_id": m["adapter_id"],
            "version": m["version"],
            "base_model": m["base_model"],
            "lora": f"peft: {handle.peft[name]}" if name in handle.peft else "slots",  # how its rows are computed
        }

    def model_card(model_id: str, **extra) -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "selfalign", **extra}

    if api_key is not None:  # the schema behind the key; the docs pages would fetch it without one

        @app.get("/openapi.json", dependencies=guard, include_in_schema=False)
        async def openapi():
            return app.openapi()

    @app.get("/health")
    async def health():  # liveness only: says nothing about what is loaded
        return {"status": "ok"}

    @app.get("/v1/status", dependencies=guard)
    async def status():  # no handle.lock here either: a status check must answer while a batch decodes
        return {
            "status": "ok",
            "base_model": handle.name,
            "active": handle.active,
            "adapters": list(handle.adapters),
            "queue": batcher.stats(),
        }

    @app.get("/v1/models", dependencies=guard)
    async def models():  # names only, read without handle.lock as `route` does
        data = [model_card(handle.name, kind="base"), model_card(alias, kind="alias", active=handle.active)]
        data += [model_card(n, kind="adapter", parent=handle.name) for n in list(handle.adapters)]
        return {"object": "list", "data": data}

    tokenizing = threading.Lock()  # one call at a time: a fast tokenizer may reset its state inside a call

    def tokenize(messages: list[dict]) -> list[int]:
        with tokenizing:
            return handle.tokenizer(render_prompt(handle.tokenizer, messages), add_special_tokens=False)["input_ids"]

    @app.post("/v1/chat/completions", dependencies=guard)
    async def chat(req: ChatRequest, request: Request):
        adapter, attach_id = route(req.model)
        max_new = req.max_completion_tokens or req.max_tokens or settings.max_new_tokens
        if max_new > max_tokens_limit:  # one request must not hold a batch slot for long
            raise ApiError(
                400,
                f"max_tokens={max_new} is above this server's limit of {max_tokens_limit} (serve.max_tokens_limit)",
                "max_tokens_too_large",
            )
        if req.min_tokens > max_new:
            raise ApiError(400, f"min_tokens={req.min_tokens} is above max_tokens={max_new}", "invalid_request")
        messages = [m.model_dump() for m in req.messages]
        ids = await run_in_threadpool(tokenize, messages)  # a long prompt must not stall the event loop
        check_context(handle, len(ids), max_new)  # a SelfAlignError: 400
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(
            ids=ids,
            adapter=adapter,
            attach_id=attach_id,
            max_new_tokens=max_new,
            min_new_tokens=req.min_tokens,
            emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=[req.stop] if isinstance(req.stop, str) else [s for s in req.stop or [] if s],
            stream=req.stream,
        )
        try:
            batcher.submit(job)
        except QueueFull as exc:
            busy = f"server busy: {exc}; retry shortly"
            raise ApiError(429, busy, "queue_full", headers={"Retry-After": "1"}) from None
        except Rejected as exc:
            raise ApiError(exc.status, exc.message, exc.code) from None
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        headers = {"x-selfalign-adapter": adapter or "base"}
        if req.stream:
            return StreamingResponse(
                stream(job, events, req.model, rid, created, request), media_type="text/event-stream", headers=headers
            )
        async with watching(request, job):
            while (event := await events.get()).kind == "delta":
                pass
        if event.kind == "error":
            raise ApiError(event.status, event.text, event.code)
        body = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": event.text}, "finish_reason": event.finish}
            ],
            "usage": {
                "prompt_tokens": event.prompt_tokens,
                "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens,
            },
        }
        return JSONResponse(body, headers=headers)

    @contextlib.asynccontextmanager
    async def watching(request: Request, job: Job):
        """While the body runs, a watcher waits on the connection (as Starlette's own disconnect listener does):
        a client that goes away cancels its row, which frees its batch slot at the next decode step. Chunks alone
        are no signal: a write to a closed socket is not always an error."""

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel.set()

        watcher = asyncio.create_task(watch())
        try:
            yield
        finally:
            job.cancel.set()  # a no-op for a finished row; otherwise (client gone, task cancelled) it frees the slot
            watcher.cancel()

    async def stream(job: Job, events: asyncio.Queue, model: str, rid: str, created: int, request: Request):
        """SSE chunks: the role, the text as the batch decodes it, then the finish reason (or an error event)."""

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(body)}\n\n"

        async with watching(request, job):
            yield chunk({"role": "assistant", "content": ""})
            while (event := await events.get()).kind == "delta":
                yield chunk({"content": event.text})
            if event.kind == "error":
                error = {"message": event.text, "type": "server_error", "code": event.code}
                yield f"data: {json.dumps({'error': error})}\n\n"
            else:
                yield chunk({}, event.finish)
            yield "data: [DONE]\n\n"

    @app.get("/v1/adapters", dependencies=guard)
    async def list_adapters():
        with handle.lock:
            return {"active": handle.active, "adapters": [adapter_info(n) for n in handle.adapters]}

    def load(path: str, name: str | None, activate: bool) -> dict:
        """Attach in the batch worker, between two decode steps; `attach_ms` counts the wait for the step in hand."""
        t0 = time.perf_counter()
        loaded = batcher.call(
            apply_adapter,
            handle,
            path,
            root=root,
            name=name,
            activate=activate,
            reserved=(alias,),
            max_adapters=settings.max_adapters,
        )
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
        """Waits for the rows decoding on `name`; its queued requests fail with 409."""
        async with admin:
            if name not in handle.adapters:
                raise ApiError(404, f"adapter {name!r} is not loaded", "adapter_not_found")
            try:
                await run_in_threadpool(batcher.unload, name)
            except Rejected as exc:
                raise ApiError(exc.status, exc.message, exc.code) from None
            return {"unloaded": name, "active": handle.active}

    return app
