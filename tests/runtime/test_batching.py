"""The batching scheduler in-process on the tiny model: answers independent of batch-mates, per-request settings,
backpressure, cancellation and adapter safety."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from selfalign.errors import SelfAlignError
from selfalign.runtime.adapters import write_random_adapter
from selfalign.runtime.batching import Batcher, Job, QueueFull, Rejected, _common_prefix, _safe_prefix, in_own_thread
from selfalign.runtime.chat import render_prompt
from selfalign.runtime.generate import complete_all
from selfalign.runtime.loader import apply_adapter, load_base, unload_adapter
from tests.runtime.reference import HFReference

ADAPTERS = (None, "alpha", "beta")
PROMPTS = [
    "Name a colour.",
    "Tell me about rivers and why they always seem to find their way to the sea.",
    "What is two plus two?",
    "Write one line about autumn.",
]


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    h = load_base("tiny_llama")
    write_random_adapter(h, root / "alpha", "alpha", seed=1)
    write_random_adapter(h, root / "beta", "beta", seed=2)
    apply_adapter(h, "alpha", root=root, activate=False)
    apply_adapter(h, "beta", root=root, activate=False)
    h.root = root
    h.reference = HFReference("tiny_llama", {"alpha": root / "alpha", "beta": root / "beta"})
    return h


def generate(handle, prompts, *, max_new_tokens, adapter):
    """The independent reference's greedy answers (`tests/runtime/reference.py`)."""
    return handle.reference(prompts, max_new_tokens=max_new_tokens, adapter=adapter)


class Collector:
    """Events per job, and a way to wait for every job to end."""

    def __init__(self):
        self.events, self.cv = {}, threading.Condition()

    def emit_for(self, key):
        self.events[key] = []

        def emit(event):
            with self.cv:
                self.events[key].append(event)
                self.cv.notify_all()

        return emit

    def final(self, key):
        return self.events[key][-1]

    def wait(self, timeout=120):
        def ended():
            return all(evs and evs[-1].kind in ("done", "error") for evs in self.events.values())

        with self.cv:
            assert self.cv.wait_for(ended, timeout=timeout)


def job(handle, prompt, adapter, collector, key, max_new=12, **kw):
    ids = handle.tokenizer(render_prompt(handle.tokenizer, prompt), add_special_tokens=False)["input_ids"]
    attach = handle.attach_ids.get(adapter) if adapter else None
    return Job(ids, adapter, attach, max_new, collector.emit_for(key), **kw)


def test_batched_greedy_answers_equal_one_at_a_time_token_for_token(handle):
    """Rows on the base and two adapters, arriving at different times with different max_tokens, some streamed."""
    refs = {}
    for adapter in (None, "alpha", "beta"):
        for i, p in enumerate(PROMPTS):
            refs[(adapter, i)] = generate(handle, [p], max_new_tokens=6 + 3 * i, adapter=adapter or "base")
    batcher = Batcher(handle, max_batch=5, wait_ms=2).start()
    try:
        got = Collector()
        for n, (adapter, i) in enumerate(refs):
            batcher.submit(job(handle, PROMPTS[i], adapter, got, (adapter, i), max_new=6 + 3 * i, stream=n % 2 == 0))
            time.sleep(0.02 * (n % 3))  # later arrivals join a batch already decoding
        got.wait()
    finally:
        batcher.close()
    for key, ref in refs.items():
        done = got.final(key)
        assert done.kind == "done", key
        assert (done.text, done.completion_tokens) == (ref.texts[0], ref.completion_tokens[0]), key
        deltas = [e.text for e in got.events[key] if e.kind == "delta"]
        if deltas:  # streamed rows: the pieces add up to the final text
            assert "".join(deltas) == done.text, key
        assert done.finish == ("stop" if ref.completion_tokens[0] < 6 + 3 * key[1] else "length")


def test_seeded_sampling_does_not_depend_on_batch_mates(handle):
    def sampled(companions: int, seed: int) -> str:
        batcher = Batcher(handle, max_batch=8, wait_ms=50).start()
        try:
            got = Collector()
            mine = job(handle, PROMPTS[1], "alpha", got, "me", max_new=16, temperature=0.9, top_p=0.9, seed=seed)
            batcher.submit(mine)
            for c in range(companions):
                batcher.submit(job(handle, PROMPTS[c % 4], "beta", got, c, max_new=20, temperature=1.3, seed=c))
            got.wait()
            return got.final("me").text
        finally:
            batcher.close()

    alone = sampled(0, seed=7)
    assert sampled(5, seed=7) == alone
    assert sampled(0, seed=8) != alone


def test_a_row_that_fails_in_the_batch_step_fails_alone(handle):
    """Rows the server's door would refuse, sent straight to the scheduler: each is retired with its own error, and
    its batch-mates finish with the answers they give alone."""
    refs = {a: generate(handle, [PROMPTS[1]], max_new_tokens=10, adapter=a or "base").texts[0] for a in (None, "alpha")}
    batcher = Batcher(handle, max_batch=8, wait_ms=50).start()
    try:
        got = Collector()
        batcher.submit(job(handle, PROMPTS[1], None, got, "base", max_new=10))
        batcher.submit(job(handle, PROMPTS[0], "alpha", got, "tiny-t", temperature=1e-40, seed=1))  # inf - inf: NaN
        batcher.submit(job(handle, PROMPTS[1], "alpha", got, "alpha", max_new=10))
        batcher.submit(job(handle, PROMPTS[2], "beta", got, "seed", temperature=0.7, seed=2**70))  # over 64 bits
        got.wait()
    finally:
        batcher.close()
    assert got.final("base").kind == "done" and got.final("base").text == refs[None]
    assert got.final("alpha").kind == "done" and got.final("alpha").text == refs["alpha"]
    failed = got.final("tiny-t")
    assert (failed.kind, failed.status, failed.code) == ("error", 500, "generation_failed")
    assert failed.text.startswith("sampling failed: probability tensor contains either `inf`, `nan`")
    bad_seed = got.final("seed")
    assert (bad_seed.kind, bad_seed.status, bad_seed.code) == ("error", 400, "invalid_request")
    assert bad_seed.text.startswith(f"seed {2**70}: ")


def test_stop_strings_cut_the_answer_and_never_stream_past_it(handle):
    ref = generate(handle, [PROMPTS[1]], max_new_tokens=24, adapter="alpha").texts[0]
    words = ref.split()
    assert len(words) > 4
    stop = words[3]
    expected = ref[: ref.find(stop)].rstrip()
    batcher = Batcher(handle).start()
    try:
        got = Collector()
        batcher.submit(job(handle, PROMPTS[1], "alpha", got, "s", max_new=24, stop=[stop], stream=True))
        got.wait()
    finally:
        batcher.close()
    done = got.final("s")
    assert (done.kind, done.finish, done.text) == ("done", "stop", expected)
    assert "".join(e.text for e in got.events["s"] if e.kind == "delta") == expected


def test_safe_prefix_holds_back_what_may_still_change():
    assert _safe_prefix("Hello wor", []) == "Hello wor"
    assert _safe_prefix("Hello ", []) == "Hello"
    assert _safe_prefix("Hello \ufffd", []) == "Hello"
    assert _safe_prefix("The end. ST", ["STOP"]) == "The end."  # "ST" may begin the stop string


def test_admission_counts_free_batch_slots_before_the_queue(handle):
    """Idle, with 4 slots and a queue of 2: six requests fit (the next step takes four), the seventh is refused."""
    batcher = Batcher(handle, max_batch=4, max_queue=2)  # not started: nothing leaves the queue
    got = Collector()
    for i in range(6):
        batcher.submit(job(handle, PROMPTS[0], None, got, i, max_new=2))
    with pytest.raises(QueueFull, match=r"6 requests are waiting \(serve.max_queue=2\)"):
        batcher.submit(job(handle, PROMPTS[0], None, got, "seventh", max_new=2))
    assert batcher.stats()["waiting"] == 6


def test_a_full_queue_refuses_and_a_cancelled_row_frees_its_slot(handle):
    batcher = Batcher(handle, max_batch=1, max_queue=1).start()
    try:
        got = Collector()
        long = job(handle, PROMPTS[1], "alpha", got, "long", max_new=400)
        batcher.submit(long)
        deadline = time.time() + 30
        while batcher.stats()["running"] == 0:  # it holds the only slot
            assert time.time() < deadline
            time.sleep(0.01)
        batcher.submit(job(handle, PROMPTS[0], "beta", got, "queued", max_new=4))
        with pytest.raises(QueueFull):
            batcher.submit(job(handle, PROMPTS[2], None, got, "refused", max_new=4))
        del got.events["refused"]
        long.cancel.set()  # its client went away
        start = time.time()
        got.wait(timeout=60)
        assert got.final("queued").kind == "done" and time.time() - start < 10
        assert (got.final("long").status, got.final("long").code) == (499, "client_closed")  # its handler ends
        stats = batcher.stats()
        assert {k: stats[k] for k in ("waiting", "running", "max_batch", "max_queue")} == {
            "waiting": 0,
            "running": 0,
            "max_batch": 1,
            "max_queue": 1,
        }
        assert stats["prompt_tokens"] > 0 and stats["prefix_hit_tokens"] == 0  # no prefix cache here
    finally:
        batcher.close()


def with_a_running_row(handle, adapter, got, max_new):
    """A started one-row batcher, returned once its row (key "running") decodes."""
    batcher = Batcher(handle, max_batch=1).start()
    batcher.submit(job(handle, PROMPTS[1], adapter, got, "running", max_new=max_new))
    deadline = time.monotonic() + 60
    while batcher.stats()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    return batcher


def test_unload_waits_for_running_rows_and_fails_queued_ones(handle):
    write_random_adapter_once(handle)
    apply_adapter(handle, "gamma", root=handle.root, activate=False)
    got = Collector()
    batcher = with_a_running_row(handle, "gamma", got, max_new=300)
    try:
        batcher.submit(job(handle, PROMPTS[0], "gamma", got, "queued", max_new=4))
        batcher.unload("gamma")  # returns once the running row is done
        assert "gamma" not in handle.adapters
        assert got.final("running").kind == "done" and got.final("running").completion_tokens == 300
        assert (got.final("queued").kind, got.final("queued").status) == ("error", 409)
        late = job(handle, PROMPTS[0], None, got, "late", max_new=2)
        late.adapter, late.attach_id = "gamma", 999  # routed before the unload, submitted after it
        batcher.submit(late)
        got.wait()
        assert (got.final("late").status, got.final("late").code) == (409, "adapter_replaced")
        assert batcher.stats()["running"] == 0
    finally:
        batcher.close()


def test_adapter_work_runs_in_the_worker_between_steps_and_errors_come_back(handle):
    """`Batcher.call` runs in the worker thread while a row decodes, returns its result, raises its error in the
    caller; with no worker it runs in the caller. `in_own_thread` does the same in a thread that ends with the call."""
    got = Collector()
    batcher = with_a_running_row(handle, "alpha", got, max_new=200)
    try:
        ran_in, rows = batcher.call(lambda: (threading.current_thread(), len(batcher.running)))
        assert ran_in is batcher.thread and rows == 1  # between two steps of the running row
        with pytest.raises(SelfAlignError, match="'nobody' is not loaded"):
            batcher.call(unload_adapter, handle, "nobody")
        got.wait()
        assert got.final("running").completion_tokens == 200  # the row went on around the calls
    finally:
        batcher.close()
    assert batcher.call(threading.current_thread) is threading.current_thread()  # no worker: the caller's thread
    ran_in = in_own_thread(threading.current_thread)
    assert ran_in is not threading.current_thread() and not ran_in.is_alive()
    with pytest.raises(ZeroDivisionError):
        in_own_thread(lambda: 1 / 0)


def test_min_new_tokens_holds_back_end_of_sequence(handle):
    """With `min_new_tokens`, end-of-sequence is never picked before that many tokens; up to where it would have
    been picked, the answer is the same. A token the unconstrained answer picks at step 4 is made end-of-sequence."""
    batcher = Batcher(handle)
    free = job(handle, PROMPTS[2], "alpha", Collector(), "free", max_new=12)
    batcher.drain([free])
    end = free.out[3]
    batcher.eos = {end}
    ended, held = (job(handle, PROMPTS[2], "alpha", Collector(), k, max_new=12, min_new_tokens=9) for k in "ab")
    ended.min_new_tokens = 0
    batcher.drain([ended, held])
    first = free.out.index(end)
    assert ended.out == free.out[: first + 1]  # stopped at the first pick of `end`
    assert len(held.out) >= 9 and end not in held.out[:8]
    assert held.out[:first] == free.out[:first]


def test_submit_refuses_an_adapter_being_unloaded(handle):
    batcher = Batcher(handle)
    batcher.draining.add("alpha")
    with pytest.raises(Rejected) as err:
        batcher.submit(job(handle, PROMPTS[0], "alpha", Collector(), "x"))
    assert err.value.status == 409 and "being unloaded" in err.value.message


def write_random_adapter_once(handle):
    if not (handle.root / "gamma").exists():
        from selfalign.runtime.loader import unload_adapter

        names = list(handle.adapters)
        for name in names:  # write_random_adapter needs a bare handle
            unload_adapter(handle, name)
        write_random_adapter(handle, handle.root / "gamma", "gamma", seed=3)
        for name in names:
            apply_adapter(handle, name, root=handle.root, activate=False)


def test_drain_shares_the_prompt_prefix_and_stops_rows_early(handle):
    """`drain` (the local teacher's path): a shared system prompt run once gives the same greedy tokens as running
    every prompt whole, and a row whose `until` test holds ends there, freeing its slot."""
    system = {"role": "system", "content": "You are a careful assistant who answers in plain words. " * 4}
    prompts = [[system, {"role": "user", "content": p}] for p in PROMPTS]

    def run(share_prefix, until=None):
        out = Collector()
        jobs = [job(handle, p, None, out, i, max_new=16, until=until) for i, p in enumerate(prompts)]
        Batcher(handle, max_batch=3).drain(jobs, share_prefix=share_prefix)
        return [out.final(i) for i in range(len(prompts))]

    whole, shared = run(10**9), run(8)
    assert [e.text for e in shared] == [e.text for e in whole]
    assert all(e.completion_tokens == 16 or e.finish == "stop" for e in whole)
    cut = run(8, until=lambda text: len(text.split()) >= 2)
    for full, short in zip(whole, cut, strict=True):
        assert short.finish == "stop" or short.completion_tokens == full.completion_tokens
        assert full.text.startswith(short.text) and short.completion_tokens <= full.completion_tokens
    assert sum(e.completion_tokens for e in cut) < sum(e.completion_tokens for e in whole)


def test_complete_all_equals_one_at_a_time_on_each_adapter(handle):
    """`complete_all` (eval's and the local teacher's path): more prompts than slots, each with its own budget,
    give the greedy text and token count of one-at-a-time generation, on the base and on an adapter."""
    prompts = PROMPTS * 2
    budgets = [5 + 2 * i for i in range(len(prompts))]
    for adapter in (None, "beta"):
        heard = []
        done = complete_all(
            handle, prompts, max_new_tokens=budgets, adapter=adapter, max_batch=3, progress=heard.append
        )
        assert heard == [1] * len(prompts)
        for p, n, c in zip(prompts, budgets, done, strict=True):
            ref = generate(handle, [p], max_new_tokens=n, adapter=adapter or "base")
            assert (c.text, c.completion_tokens) == (ref.texts[0], ref.completion_tokens[0]), (adapter, p)
            assert c.finish == ("length" if c.completion_tokens == n else "stop")
            assert c.prompt_tokens == ref.prompt_tokens[0]


def test_complete_all_names_an_adapter_that_is_not_resident(handle):
    with pytest.raises(SelfAlignError, match="not attached"):
        complete_all(handle, PROMPTS[:1], max_new_tokens=4, adapter="gamma")


class Recording(Batcher):
    """The real scheduler, with a log of its forward passes: (what ran, rows, tokens per row, monotonic time)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.passes = []

    def _forward(self, input_ids, mask, positions, rows, cache):
        logits = super()._forward(input_ids, mask, positions, rows, cache)
        kind = "decode" if input_ids.shape[1] == 1 and rows is self.running else "prefill"
        self.passes.append((kind, [id(r) for r in rows], input_ids.shape[1], time.monotonic()))
        return logits


def long_prompt(handle, tokens: int) -> str:
    """A user message that renders to about `tokens` prompt tokens."""
    words = ["the", "river", "carries", "silt", "past", "the", "old", "mill", "and", "on", "toward", "the", "sea"]
    text = " ".join(words[i % len(words)] for i in range(tokens))
    while len(handle.tokenizer(render_prompt(handle.tokenizer, text), add_special_tokens=False)["input_ids"]) > tokens:
        text = text.rsplit(" ", 1)[0]
    return text


def test_a_long_prompt_is_prefilled_in_chunks_while_a_stream_goes_on(handle):
    """A 230-token prompt arrives while a row is decoding, with `prefill_chunk=32`: no forward pass runs more than
    32 new prompt tokens, the long prompt takes 8 chunks, the running row gets a token between every two of them,
    and both answers equal one-at-a-time generation token for token."""
    prompt = long_prompt(handle, 230)
    refs = {
        "stream": generate(handle, [PROMPTS[1]], max_new_tokens=20, adapter="alpha"),
        "long": generate(handle, [prompt], max_new_tokens=6, adapter="beta"),
    }
    batcher = Recording(handle, max_batch=4, wait_ms=0, prefill_chunk=32).start()
    try:
        got = Collector()
        stream = job(handle, PROMPTS[1], "alpha", got, "stream", max_new=20, stream=True)
        batcher.submit(stream)
        deadline = time.time() + 30
        while not [e for e in got.events["stream"] if e.kind == "delta"]:  # it is streaming
            assert time.time() < deadline
            time.sleep(0.005)
        long = job(handle, prompt, "beta", got, "long", max_new=6)
        batcher.submit(long)
        got.wait()
    finally:
        batcher.close()
    for key, ref in refs.items():
        assert (got.final(key).text, got.final(key).completion_tokens) == (ref.texts[0], ref.completion_tokens[0])
    assert all(len(rows) * width <= 32 for kind, rows, width, _ in batcher.passes if kind == "prefill")
    chunks = [i for i, (kind, rows, _, _) in enumerate(batcher.passes) if kind == "prefill" and rows == [id(long)]]
    assert len(chunks) == -(-len(long.ids) // 32) == 8
    for a, b in itertools.pairwise(chunks):  # the stream decoded a token between every two chunks
        between = batcher.passes[a + 1 : b]
        assert [(kind, id(stream) in rows) for kind, rows, _, _ in between] == [("decode", True)]


def test_whole_prompts_are_prefilled_together_up_to_the_chunk(handle):
    """Eight short prompts at once with `prefill_chunk=64`: each prefill pass holds whole prompts, at most 64 tokens
    (rows x padded width); the rest wait a step; the answers equal one-at-a-time generation."""
    batcher = Recording(handle, max_batch=8, wait_ms=50, prefill_chunk=64)
    got = Collector()
    jobs = [job(handle, PROMPTS[i % 4], None, got, i, max_new=4) for i in range(8)]
    batcher.drain(jobs)
    prefills = [(rows, width) for kind, rows, width, _ in batcher.passes if kind == "prefill"]
    assert len(prefills) > 1 and all(len(rows) * width <= 64 for rows, width in prefills)
    assert sorted(r for rows, _ in prefills for r in rows) == sorted(id(j) for j in jobs)  # each prompt once, whole
    for i in range(8):
        ref = generate(handle, [PROMPTS[i % 4]], max_new_tokens=4, adapter="base")
        assert got.final(i).text == ref.texts[0], i


def test_the_prefix_cache_prefills_only_what_no_recent_prompt_shared(handle):
    """Server mode (`prefix_cache_tokens`): a second wave of prompts that open with the first wave's system prompt,
    on the base and both adapters, prefills only what follows the longest prefix a recent prompt on the same adapter
    held (rows with different known prefixes share one pass), a repeated prompt prefills one token, and every answer
    equals one-at-a-time generation token for token."""
    system = {"role": "system", "content": "You are a careful assistant who answers in plain words. " * 3}
    first = [[system, {"role": "user", "content": p}] for p in PROMPTS[:2]]
    second = [[system, {"role": "user", "content": p}] for p in PROMPTS[2:]] + first[:1]
    batcher = Recording(handle, max_batch=16, wait_ms=0, prefill_chunk=256, prefix_cache_tokens=4096)
    got = Collector()

    def wave(prompts, tag):
        jobs = {
            (tag, a, i): job(handle, p, a, got, (tag, a, i), max_new=8) for a in ADAPTERS for i, p in enumerate(prompts)
        }
        batcher.drain(list(jobs.values()))
        return jobs

    jobs = wave(first, 1)
    shared = _common_prefix([j.ids for j in jobs.values()])  # the system prompt and the user turn's opening
    start = len(batcher.passes)
    jobs |= wave(second, 2)
    for (tag, adapter, i), j in jobs.items():
        prompts = first if tag == 1 else second
        ref = generate(handle, [prompts[i]], max_new_tokens=8, adapter=adapter or "base")
        assert (got.final((tag, adapter, i)).text, len(j.out)) == (ref.texts[0], ref.completion_tokens[0])
        if tag == 2:
            assert j.skip == (len(j.ids) - 1 if prompts[i] is first[0] else shared), (adapter, i)
    widths = [width for kind, _, width, _ in batcher.passes[start:] if kind == "prefill"]
    assert widths and max(widths) == max(len(j.ids) - j.skip for (tag, *_), j in jobs.items() if tag == 2)
    assert batcher.stats()["prefix_hit_tokens"] == sum(j.skip for j in jobs.values())
    assert batcher.stats()["prompt_tokens"] == sum(len(j.ids) for j in jobs.values())
    kept = {(j.adapter, tuple(j.ids)) for j in jobs.values()}  # every prompt once per adapter: the repeat is not
    assert (
        batcher.prefixes.tokens == sum(len(ids) for _, ids in kept) == sum(len(e[1]) for e in batcher.prefixes.entries)
    )


def test_a_long_prompt_is_chunked_after_its_known_prefix(handle):
    """With the prefix cache, a long prompt that opens as a recent one did is prefilled in chunks from where the
    shared prefix ends; its answer equals one-at-a-time generation."""
    system = {"role": "system", "content": "You are a careful assistant who answers in plain words. " * 3}
    batcher = Recording(handle, max_batch=4, wait_ms=0, prefill_chunk=32, prefix_cache_tokens=4096)
    got = Collector()
    batcher.drain([job(handle, [system, {"role": "user", "content": PROMPTS[0]}], "alpha", got, "short", max_new=4)])
    prompt = [system, {"role": "user", "content": long_prompt(handle, 150)}]
    long = job(handle, prompt, "alpha", got, "long", max_new=6)
    start = len(batcher.passes)
    batcher.drain([long])
    ref = generate(handle, [prompt], max_new_tokens=6, adapter="alpha")
    assert (got.final("long").text, got.final("long").completion_tokens) == (ref.texts[0], ref.completion_tokens[0])
    assert long.skip > 0
    chunks = [width for kind, _, width, _ in batcher.passes[start:] if kind == "prefill"]
    assert len(chunks) == -(-(len(long.ids) - long.skip) // 32) and max(chunks) <= 32


def test_slot_and_peft_path_adapters_share_a_batch(tmp_path):
    """Slots for one adapter that double when a second arrives, a DoRA adapter and one of rank 32 over the slots'
    16 on PEFT's path (each reported with its reason), and an r=8 adapter in the slot an r=16 one left: rows on the
    base and every adapter but DoRA decode in one batch (DoRA's, which PEFT cannot mix, in batches of their own),
    and all answer as the independent reference does, token for token."""
    h = load_base("tiny_llama", lora_slots=1, max_lora_rank=16)
    specs = {"a16": {"seed": 1}, "dora": {"seed": 2, "use_dora": True}, "wide": {"seed": 3, "r": 32}}
    specs |= {"b16": {"seed": 4}, "c8": {"seed": 5, "r": 8}}
    for name, spec in specs.items():
        write_random_adapter(h, tmp_path / name, name, **spec)
    for name in ("a16", "dora", "wide", "b16"):
        apply_adapter(h, name, root=tmp_path, activate=False)
    assert h.slots.slots == {"a16": 0, "b16": 1} and h.slots.capacity == 2
    assert h.peft == {"dora": "use_dora=True", "wide": "rank 32 is above the slots' maximum 16"}
    unload_adapter(h, "a16")
    apply_adapter(h, "c8", root=tmp_path, activate=False)
    assert h.slots.slots == {"c8": 0, "b16": 1}
    reference = HFReference("tiny_llama", {n: tmp_path / n for n in ("dora", "wide", "b16", "c8")})
    got = Collector()
    rows = [(p, a) for p in PROMPTS[:2] for a in (None, "dora", "wide", "b16", "c8")]
    batcher = Recording(h, max_batch=len(rows))
    jobs = [job(h, p, a, got, (p, a), max_new=8) for p, a in rows]
    batcher.drain(jobs)
    adapter_of = {id(j): j.adapter for j in jobs}
    mixes = [{adapter_of[i] for i in ids} for _, ids, _, _ in batcher.passes]
    assert {None, "wide", "b16", "c8"} in mixes  # slot, PEFT-path and base rows in one forward pass
    assert all(m == {"dora"} for m in mixes if "dora" in m)  # PEFT cannot mix DoRA rows: they run on their own
    answers = {}
    for p, a in rows:
        ref = reference([p], max_new_tokens=8, adapter=a)
        assert (got.final((p, a)).text, got.final((p, a)).completion_tokens) == (ref.texts[0], ref.completion_tokens[0])
        answers.setdefault(p, set()).add(ref.texts[0])
    assert all(len(texts) == 5 for texts in answers.values())  # every adapter changes the answer
