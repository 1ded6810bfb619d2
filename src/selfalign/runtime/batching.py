"""Continuous batching for the server: waiting chat requests, for the base and any resident adapters, decode together.

One worker thread owns generation. Each iteration it
1. takes waiting requests into free batch slots (up to `max_batch` rows; when the batch is empty it first waits
   `wait_ms` for batch-mates);
2. runs one decode step for every running row in a single forward pass, each row on its own adapter;
3. prefills newcomers, at most `prefill_chunk` prompt tokens per step: whole prompts together, left-padded, up to
   that many tokens (rows x padded width), and one longer prompt a chunk of that size per step, on its own cache,
   until its last chunk gives its first token. So a long prompt never stalls the running streams for more than a
   chunk's prefill per token (DECISIONS.md "Chunked prefill"); `None` (offline jobs: eval, the teacher) prefills
   every newcomer at once. A prompt prefills only what follows its known prefix: in a server, the longest prefix
   a recent prompt on the same adapter shared (`runtime/prefix.py`); in `drain`, the prefix all its jobs share;
4. picks each row's next token with that row's own settings (greedy, or temperature/top-p with a generator seeded
   from the request), streams the new text, and retires rows that hit end-of-sequence, `max_tokens`, a stop
   string, or whose client went away; their slots are free at the next iteration. A row that cannot go on
   (its seed or sampling fails, its logits are not finite) is retired with its own error; its batch-mates go on.

Rows on different adapters share the forward pass (`runtime/lora.py`): a hook on each served layer adds every row's
delta from its adapter's slot in four tensor ops, whatever the mix. Adapters on PEFT's path (LoRA variants) are
named per row through PEFT's `adapter_names` in the same pass.

The key/value cache of the running batch is one left-padded `DynamicCache`: newcomers are merged in by padding the
shorter side on the left, and retired rows are cut out (and the all-padding columns dropped). Each row keeps its
own position ids, so a row's tokens never depend on its batch-mates beyond floating-point rounding; tests check
greedy answers token for token against one-at-a-time generation.

Adapter safety: a request names its adapter and that adapter's attach id when it arrives. Adapter management happens
between decode steps, never inside one: in the worker thread itself (`Batcher.call`). A request whose adapter was
unloaded or replaced before it started fails with 409; `unload` waits for the rows already decoding on that adapter and
fails the queued ones with 409. The queue is bounded: `submit` raises `QueueFull` (the server's 429).

One thread computes. OpenMP (PyTorch's CPU threads, and MKL's) keeps a pool of helper threads for every thread that
has run a parallel operator, and libgomp stops its helpers spinning between operators once it manages more threads
than there are cores; then every operator waits for its helpers to wake. A server whose model was loaded in the main
thread and decoded in this worker decoded 8 rows 1.6x slower for it (DECISIONS.md "One thread computes"). So in a
server all tensor work runs in the worker: the model is loaded in a thread that ends with the load (`in_own_thread`),
and adapters are attached and unloaded through `Batcher.call`. `drain` computes in the calling thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from selfalign.runtime.loader import BaseModelHandle, unload_adapter
from selfalign.runtime.lora import route
from selfalign.runtime.prefix import PrefixCache

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The wait queue is at `max_queue`: the client should retry later."""


class Rejected(Exception):
    """A request the scheduler will not run; `status` and `code` for the HTTP error."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Event:
    kind: str  # "delta" (text), "done" (finish, usage), "error" (status, code, message)
    text: str = ""
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 0
    code: str = ""


_GONE = Event("error", status=499, code="client_closed", text="the client closed the connection")


@dataclass(eq=False)
class Job:
    """One chat completion: prompt ids, its adapter (None: the base) fixed on arrival, and its own settings."""

    ids: list[int]
    adapter: str | None
    attach_id: int | None  # the adapter's attach id on arrival; a different one later means it was replaced
    max_new_tokens: int
    emit: Callable[[Event], None]  # called from the worker thread; must be thread-safe and quick
    min_new_tokens: int = 0  # end-of-sequence is not picked before this many tokens (vLLM's `min_tokens`)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    until: Callable[[str], bool] | None = None  # ends the row (finish "stop") once it holds for the text so far
    stream: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    # worker state
    out: list[int] = field(default_factory=list)
    skip: int = 0  # leading prompt tokens whose keys and values are already known (`prefix`): not prefilled again
    prefix: list | None = None  # per layer, (keys, values) of those tokens, shape (1, kv heads, skip, head dim)
    sent: str = ""
    generator: Any = None
    failed: Event | None = None  # set when this row alone cannot go on; it is retired with this error


def in_own_thread(fn: Callable[..., Any], /, *args, **kwargs) -> Any:
    """`fn(*args, **kwargs)` run in a thread that ends with it; its result, or its exception raised here. For the work
    a server does before its `Batcher` starts (loading the model), so that no other thread keeps an OpenMP pool (see
    the module docstring)."""
    future: Future = Future()
    threading.Thread(
        target=_settle, args=(future, partial(fn, *args, **kwargs)), name="selfalign-load", daemon=True
    ).start()
    return future.result()


def _settle(future: Future, work: Callable[[], Any]) -> None:
    """Run `work` and put its result, or its exception, in `future` (for the thread waiting on it)."""
    try:
        future.set_result(work())
    except BaseException as exc:
        future.set_exception(exc)


def split_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` cut before the first stop string it contains, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _safe_prefix(text: str, stops: list[str]) -> str:
    """What can be streamed now: no trailing whitespace (the final text is stripped, and the tokenizer's clean-up
    may fold a space into the next piece), no half-decoded character, and no tail that may begin a stop string."""
    text = text.rstrip()
    if text.endswith("\ufffd"):
        text = text.rstrip("\ufffd").rstrip()
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold].rstrip()


class Batcher:
    """The scheduler and decode loop behind `stage=serve`; `start()` launches its worker thread."""

    def __init__(
        self,
        handle: BaseModelHandle,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        wait_ms: float = 5.0,
        prefill_chunk: int | None = None,
        prefix_cache_tokens: int = 0,
    ):
        self.handle = handle
        self.max_batch, self.max_queue, self.wait_s = max_batch, max_queue, wait_ms / 1000.0
        self.prefill_chunk = prefill_chunk  # prompt tokens prefilled per step; None: every newcomer at once
        # the server's prefix cache (`runtime/prefix.py`); None (offline jobs): prompts share only `drain`'s prefix
        self.prefixes = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self.prompt_tokens = self.hit_tokens = 0
        self.cv = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []  # rows in the decode state, in its row order
        self.pending: list[Job] = []  # taken from the queue, not yet prefilled to their first token
        self.draining: set[str] = set()
        self.calls: deque[tuple[Future, Callable[[], Any]]] = deque()  # work for the worker, between decode steps
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="selfalign-batcher", daemon=True)
        # decode state of the running batch, touched by the worker only
        self._cache = None
        self._mask = None  # (rows, columns) long: 1 for real tokens, left padding 0
        self._pos = None  # (rows,) the next position id of each row
        self._last = None  # (rows,) the last token of each row
        self._filling: list[Job] = []  # admitted, waiting for (the rest of) their prefill, in arrival order
        self._long: tuple[Job, Any, int] | None = None  # the prompt prefilled a chunk per step: job, cache, tokens run
        tok = handle.tokenizer
        eos = getattr(handle.model.generation_config, "eos_token_id", None)
        self.eos = {tok.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # ------------------------------------------------------------------ called from request handlers
    def start(self) -> Batcher:
        self.thread.start()
        return self

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        self.thread.join(timeout=30)

    def call(self, fn: Callable[..., Any], /, *args, **kwargs) -> Any:
        """`fn(*args, **kwargs)` run by the worker between two decode steps (see the module docstring); its result, or
        its exception raised here. Runs it in the calling thread when no worker runs or the caller is the worker."""
        if threading.current_thread() is self.thread or not self.thread.is_alive():
            return fn(*args, **kwargs)
        future: Future = Future()
        with self.cv:
            if self.closed:
                raise Rejected(503, "shutting_down", "the server is shutting down")
            self.calls.append((future, partial(fn, *args, **kwargs)))
            self.cv.notify_all()
        return future.result()

    def submit(self, req: Job) -> None:
        with self.cv:
            if self.closed:
                raise Rejected(503, "shutting_down", "the server is shutting down")
            if req.adapter in self.draining:
                raise Rejected(409, "adapter_unloading", f"adapter {req.adapter!r} is being unloaded")
            if len(self.waiting) >= self.max_queue + self._free_slots():  # the next step fills the free slots first
                raise QueueFull(f"{len(self.waiting)} requests are waiting (serve.max_queue={self.max_queue})")
            self.waiting.append(req)
            self.cv.notify_all()

    def stats(self) -> dict:
        with self.cv:
            return {
                "waiting": len(self.waiting),
                "running": len(self.running),
                "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                "prompt_tokens": self.prompt_tokens,  # prefilled so far, and how many of them came from a known prefix
                "prefix_hit_tokens": self.hit_tokens,
            }

    def unload(self, name: str, timeout: float = 600.0) -> None:
        """Unload a resident adapter once no running row uses it; queued requests for it fail with 409."""
        with self.cv:
            self.draining.add(name)
            try:
                for req in [r for r in self.waiting if r.adapter == name]:
                    self.waiting.remove(req)
                    req.emit(Event("error", status=409, code="adapter_unloaded", text=f"adapter {name!r} was unloaded"))
                deadline = time.monotonic() + timeout
                while any(r.adapter == name for r in [*self.running, *self.pending]):
                    if not self.cv.wait(timeout=max(0.0, deadline - time.monotonic())):
                        raise Rejected(409, "adapter_busy", f"adapter {name!r} is still in use after {timeout:.0f} s")
            except BaseException:
                self.draining.discard(name)
                raise
        # Nothing can start on `name` now (the queue holds none and submit refuses it).
        try:
            self.call(self._unload, name)
        finally:
            with self.cv:
                self.draining.discard(name)

    def _unload(self, name: str) -> None:
        unload_adapter(self.handle, name)
        if self.prefixes is not None:
            self.prefixes.drop(name)

    def drain(self, jobs: list[Job], share_prefix: int = 32) -> None:
        """Run `jobs` to the end in the calling thread (no worker): at every step the free slots take the next jobs
        in order, so the schedule, and with it every row's tokens, depends on nothing but the jobs.

        When all jobs open with the same `share_prefix` or more tokens (a teacher's system prompt), that prefix is
        run once and its keys and values are copied into each newcomer, which then prefills only the rest."""
        import torch
        from transformers import DynamicCache

        queue = deque(jobs)
        one_adapter = len({j.adapter for j in jobs}) == 1  # a prefix's keys and values depend on the adapter
        common = _common_prefix([j.ids for j in jobs]) if len(jobs) > 1 and one_adapter else 0
        if common >= share_prefix:
            with self.handle.lock, torch.inference_mode():
                ids = torch.tensor([jobs[0].ids[:common]], device=self._device())
                positions, cache = torch.arange(common, device=ids.device)[None], DynamicCache()
                self._forward(ids, torch.ones_like(ids), positions, [jobs[0]], cache)
            for j in jobs:
                j.skip, j.prefix = common, [(layer.keys, layer.values) for layer in cache.layers]
        while queue or self.running or self.pending:
            self._iterate(self._take(queue))

    def _free_slots(self) -> int:
        """Batch slots no running or pending row holds: what the next step takes from the queue."""
        return max(0, self.max_batch - len(self.running) - len(self.pending))

    def _take(self, queue: deque) -> list[Job]:
        """Jobs moved from the head of `queue` into `pending`, in order, while slots are free and they may join."""
        new = []
        while queue and self._free_slots() and self._may_join(queue[0]):
            new.append(queue.popleft())
            self.pending.append(new[-1])
        return new

    def _may_join(self, req: Job) -> bool:
        """Whether `req` may join the running and pending rows: rows on an adapter PEFT cannot batch with others
        (`handle.solo`, DoRA) decode only with rows on the same adapter; the queue waits behind them in order."""
        rows = [*self.running, *self.pending]
        if not rows or not self.handle.solo:
            return True
        first = rows[0].adapter
        return req.adapter == first or (req.adapter not in self.handle.solo and first not in self.handle.solo)

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        while True:
            with self.cv:
                while not (self.waiting or self.running or self.pending or self.calls or self.closed):
                    self.cv.wait()
                if self.closed:
                    for req in [*self.waiting, *self.pending, *self.running]:
                        req.emit(Event("error", status=503, code="shutting_down", text="the server is shutting down"))
                    for future, _ in self.calls:
                        future.set_exception(Rejected(503, "shutting_down", "the server is shutting down"))
                    self.waiting.clear()
                    self.pending.clear()
                    self.running.clear()
                    self.calls.clear()
                    return
                calls = list(self.calls)
                self.calls.clear()
                if not calls:
                    if not self.running and not self.pending and len(self.waiting) < self.max_batch:
                        self.cv.wait(timeout=self.wait_s)  # an idle batch: let batch-mates arrive
                    new = self._take(self.waiting)
            if calls:
                for future, work in calls:
                    _settle(future, work)
                continue
            try:
                self._iterate(new)
            except Exception as exc:  # a failed forward pass fails its rows, never the server
                log.exception("batch step failed")
                with self.cv:
                    rows, self.running, self.pending = [*self.running, *self.pending], [], []
                    self.cv.notify_all()
                message = f"generation failed: {type(exc).__name__}: {exc}"
                for req in rows:
                    req.emit(Event("error", status=500, code="generation_failed", text=message))
                self._cache = self._mask = self._pos = self._last = self._long = None
                self._filling = []

    def _iterate(self, new: list[Job]) -> None:
        import torch

        handle = self.handle
        with handle.lock, torch.inference_mode():
            self._filling.extend(r for r in new if self._admissible(r))
            if self.running:
                self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.running), 1)], dim=1)
                logits = self._forward(self._last[:, None], self._mask, self._pos[:, None], self.running, self._cache)
                self._pos = self._pos + 1
                self._last = self._pick(logits, self.running)
            ready = self._prefill()
        with self.cv:
            self.running.extend(ready)  # their rows follow the running ones in the decode state
            self.pending = list(self._filling)
            self._retire()
            self.cv.notify_all()

    def _admissible(self, req: Job) -> bool:
        if req.cancel.is_set():
            req.emit(_GONE)
            return False
        if req.adapter is not None and self.handle.attach_ids.get(req.adapter) != req.attach_id:
            req.emit(
                Event(
                    "error",
                    status=409,
                    code="adapter_replaced",
                    text=f"adapter {req.adapter!r} was unloaded or replaced after this request arrived; send it again",
                )
            )
            return False
        return True

    def _forward(self, input_ids, mask, positions, rows: list[Job], cache):
        inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "cache": cache}
        inputs |= {"use_cache": True, "logits_to_keep": 1}
        with route(self.handle, [r.adapter for r in rows]) as (model, extra):
            out = model(**inputs, **extra)
        return out.logits[:, -1, :].float()

    def _prefill(self) -> list[Job]:
        """This step's prefill (see the module docstring); the jobs that now have their first token, merged into the
        decode state in the returned order. Jobs cancelled while waiting for their prefill are dropped here."""
        for r in [r for r in self._filling if r.cancel.is_set()]:
            self._filling.remove(r)
            r.emit(_GONE)
            if self._long is not None and self._long[0] is r:
                self._long = None
        budget = self.prefill_chunk
        long_job = self._long[0] if self._long else None
        if self.prefixes is not None:  # looked up again while a job waits: an earlier group may have added its prefix
            for r in self._filling:
                if r.prefix is None and r is not long_job:
                    r.skip, r.prefix = self.prefixes.find((r.adapter, r.attach_id), r.ids)
        group: list[Job] = []
        width = 0
        for r in self._filling:
            need = len(r.ids) - r.skip
            if r is long_job or (budget is not None and need > budget):
                continue
            if budget is not None and group and (len(group) + 1) * max(width, need) > budget:
                break
            group.append(r)
            width = max(width, need)
        if group:
            self._prefill_group(group)
        if budget is not None and self._long is None:
            long_job = next((r for r in self._filling if len(r.ids) - r.skip > budget), None)
            if long_job is not None:
                self._long = (long_job, self._prefix_cache([long_job]), long_job.skip)
        ready = group + ([long_job] if long_job is not None and self._prefill_chunk() else [])
        for r in ready:
            self._filling.remove(r)
            self.prompt_tokens, self.hit_tokens = self.prompt_tokens + len(r.ids), self.hit_tokens + r.skip
        return ready

    def _prefix_cache(self, rows: list[Job]):
        """A cache holding each row's known prefix (`Job.prefix`), left-padded to the longest (empty: none has one)."""
        import torch
        from transformers import DynamicCache

        cache, width = DynamicCache(), max(r.skip for r in rows)
        known = next((r.prefix for r in rows if r.skip), [])
        for layer, (keys, values) in enumerate(known):
            blank = (  # a row with no known prefix
                keys.new_zeros((1, keys.shape[1], width, keys.shape[3])),
                values.new_zeros((1, values.shape[1], width, values.shape[3])),
            )
            rows_kv = [
                (_pad_left(r.prefix[layer][0], width - r.skip), _pad_left(r.prefix[layer][1], width - r.skip))
                if r.skip
                else blank
                for r in rows
            ]
            cache.update(torch.cat([k for k, _ in rows_kv]), torch.cat([v for _, v in rows_kv]), layer)
        return cache

    def _prefill_group(self, new: list[Job]) -> None:
        """Prefill whole prompts together, after each one's known prefix ([left padding | prefix | left padding |
        rest], as `generate` pads), merge them into the running batch, and keep their keys and values in the prefix
        cache."""
        import torch

        known, width = max(r.skip for r in new), max(len(r.ids) - r.skip for r in new)
        ids = torch.full((len(new), width), self.pad, dtype=torch.long)
        rest = torch.zeros((len(new), width), dtype=torch.long)
        before = torch.zeros((len(new), known), dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, width - len(r.ids) + r.skip :] = torch.tensor(r.ids[r.skip :])
            rest[i, width - len(r.ids) + r.skip :] = 1
            before[i, known - r.skip :] = 1
        skips = torch.tensor([r.skip for r in new])[:, None]
        positions = skips + (rest.cumsum(-1) - 1).masked_fill(rest == 0, 1)
        mask = torch.cat([before, rest], dim=1)
        device = self._device()
        cache = self._prefix_cache(new)
        logits = self._forward(ids.to(device), mask.to(device), positions.to(device), new, cache)
        mask = mask.to(device)
        if self.prefixes is not None:
            for i, r in enumerate(new):
                columns = mask[i].nonzero()[:, 0]
                layers = [
                    (layer.keys[i : i + 1, :, columns], layer.values[i : i + 1, :, columns]) for layer in cache.layers
                ]
                self.prefixes.add((r.adapter, r.attach_id), r.ids, layers)
        for r in new:
            r.prefix = None  # the running cache holds it now
        self._join(cache, mask, mask.sum(-1), self._first_tokens(logits, new))

    def _prefill_chunk(self) -> bool:
        """Run the next chunk of the long prompt on its own cache; True once its last chunk gave its first token."""
        import torch

        job, cache, done = self._long
        n = min(self.prefill_chunk, len(job.ids) - done)
        device = self._device()
        ids = torch.tensor([job.ids[done : done + n]], device=device)
        positions = torch.arange(done, done + n, device=device)[None]
        mask = torch.ones((1, done + n), dtype=torch.long, device=device)
        logits = self._forward(ids, mask, positions, [job], cache)
        if done + n < len(job.ids):
            self._long = (job, cache, done + n)
            return False
        self._long, job.prefix = None, None
        if self.prefixes is not None:
            layers = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
            self.prefixes.add((job.adapter, job.attach_id), job.ids, layers)
        self._join(cache, mask, mask.sum(-1), self._first_tokens(logits, [job]))
        return True

    def _first_tokens(self, logits, new: list[Job]):
        """Seed each sampling row's generator, then pick every newcomer's first token."""
        import torch

        for r in new:
            if r.temperature > 0:
                r.generator = torch.Generator(device=logits.device)
                try:  # the server checks seeds at the door; a row that still fails here fails alone
                    r.generator.manual_seed(r.seed if r.seed is not None else int.from_bytes(os.urandom(6)))
                except (RuntimeError, ValueError, OverflowError, TypeError) as exc:
                    r.failed = _row_error(400, "invalid_request", f"seed {r.seed!r}: {exc}")
        return self._pick(logits, new)

    def _join(self, cache, mask, pos, last) -> None:
        """Append prefilled rows (their cache, mask, next positions and first tokens) to the running decode state."""
        import torch

        if self._mask is None:
            self._cache, self._mask, self._pos, self._last = cache, mask, pos, last
            return
        old_width, new_width = self._mask.shape[1], mask.shape[1]
        grow_old, grow_new = max(0, new_width - old_width), max(0, old_width - new_width)
        for old_layer, new_layer in zip(self._cache.layers, cache.layers, strict=True):
            old_layer.keys = torch.cat([_pad_left(old_layer.keys, grow_old), _pad_left(new_layer.keys, grow_new)])
            old_layer.values = torch.cat([_pad_left(old_layer.values, grow_old), _pad_left(new_layer.values, grow_new)])
        self._mask = torch.cat([_pad_left(self._mask, grow_old, dim=1), _pad_left(mask, grow_new, dim=1)])
        self._pos = torch.cat([self._pos, pos])
        self._last = torch.cat([self._last, last])

    def _device(self):
        return next(self.handle.model.parameters()).device

    def _pick(self, logits, rows: list[Job]):
        """Each row's next token with its own settings, appended to the row; the tokens as a tensor."""
        import torch

        finite = torch.isfinite(logits).all(dim=-1).tolist()
        early = [i for i, r in enumerate(rows) if len(r.out) < r.min_new_tokens]
        if early:
            index = (
                torch.tensor(early, device=logits.device)[:, None],
                torch.tensor(sorted(self.eos), device=logits.device),
            )
            logits[index] = -float("inf")
        tokens = logits.argmax(dim=-1)
        for i, r in enumerate(rows):
            if r.failed is None and not finite[i]:
                r.failed = _row_error(500, "generation_failed", NON_FINITE)
            if r.failed is None and r.temperature > 0:
                try:
                    tokens[i] = _sample(logits[i], r)
                except RuntimeError as exc:  # a row whose sampling fails fails alone; its batch-mates go on
                    r.failed = _row_error(500, "generation_failed", f"sampling failed: {exc}")
            if r.failed is not None:
                tokens[i] = self.pad  # a placeholder until `_retire` drops the row, before the next step
                continue
            r.out.append(int(tokens[i]))
        return tokens

    def _retire(self) -> None:
        """Emit new text; drop finished or cancelled rows from the batch (called with `cv` held)."""
        import torch

        keep = []
        for i, r in enumerate(self.running):
            if r.failed is not None:
                r.emit(r.failed)
                continue
            if r.cancel.is_set():
                r.emit(_GONE)  # ends the handler still waiting on it, if any
                continue
            finish = self._advance(r)
            if finish is None:
                keep.append(i)
        if len(keep) == len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._pos = self._last = None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask, self._pos, self._last = self._mask[index], self._pos[index], self._last[index]
        start = int((self._mask.cumsum(-1) == 0).sum(-1).min())  # columns that are padding in every row
        if start:
            self._mask = self._mask[:, start:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def _advance(self, r: Job) -> str | None:
        """Stream what row `r` may show now; its finish reason when it is done, else None."""
        tok = self.handle.tokenizer
        ended = r.out[-1] in self.eos
        done = ended or len(r.out) >= r.max_new_tokens
        if not (r.stream or r.stop or r.until or done):
            return None
        text = tok.decode(r.out, skip_special_tokens=True).lstrip()
        text, stopped = split_at_stop(text, r.stop)
        stopped = stopped or (r.until is not None and r.until(text))
        if stopped or done:
            text = text.rstrip()
            if r.stream and text.startswith(r.sent) and len(text) > len(r.sent):
                r.emit(Event("delta", text=text[len(r.sent) :]))
            finish = "stop" if stopped or ended else "length"
            r.emit(Event("done", text=text, finish=finish, prompt_tokens=len(r.ids), completion_tokens=len(r.out)))
            return finish
        if r.stream:
            safe = _safe_prefix(text, r.stop)
            if len(safe) > len(r.sent) and safe.startswith(r.sent):
                r.emit(Event("delta", text=safe[len(r.sent) :]))
                r.sent = safe
        return None


NON_FINITE = "the model gave this request non-finite scores (NaN or inf): its adapter's weights may be corrupt"


def _row_error(status: int, code: str, text: str) -> Event:
    return Event("error", status=status, code=code, text=text)


def _sample(logits, r: Job):
    """One token for row `r` from its float32 logits, with its temperature and top-p and its own generator."""
    import torch

    scores = logits / r.temperature
    if r.top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        ordered, order = scores.sort(descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs >= r.top_p
        scores = scores.clone()
        scores[order[drop]] = -float("inf")
    return torch.multinomial(scores.softmax(-1), 1, generator=r.generator)[0]


def _common_prefix(seqs: list[list[int]]) -> int:
    """Tokens all of `seqs` start with, leaving each at least one of its own (its prefill yields its first token)."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return max(n, 0)


def _pad_left(t, n: int, dim: int = 2):
    """`t` with `n` zero columns prepended along `dim` (the sequence axis: 2 for cache tensors, 1 for masks)."""
    import torch

    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)
