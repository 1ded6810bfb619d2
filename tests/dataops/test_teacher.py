"""Teacher backends against real HTTP servers on 127.0.0.1: our own serve stage, and a broken stand-in."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from selfalign.dataops.teacher import Ask, LocalTeacher, OpenAITeacher, Sampling, TeacherUnavailable
from selfalign.runtime.generate import generate
from selfalign.runtime.loader import load_base
from tests.servers import Server, free_port

ASKS = [Ask([{"role": "user", "content": f"Say something about number {i}."}], 8) for i in range(6)]
GREEDY = Sampling(0.0, 1.0, 3)


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny_llama")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    (tmp / "adapters").mkdir()
    server = Server(tmp / "adapters", tmp)
    yield server
    server.stop()


def test_local_teacher_batches_and_matches_direct_generation(tiny):
    teacher = LocalTeacher(tiny, batch_size=4)
    texts = teacher.complete(ASKS, GREEDY)
    assert len(texts) == 6 and all(texts)
    direct = generate(tiny, [a.messages for a in ASKS[:4]], max_new_tokens=8).texts
    assert texts[:4] == direct
    sampled = Sampling(0.9, 0.9, 5)
    assert teacher.complete(ASKS, sampled) == teacher.complete(ASKS, sampled)


def test_openai_teacher_against_the_serve_stage(served, tiny):
    teacher = OpenAITeacher(f"{served.url}/v1", "tiny-llama", None, max_concurrency=3, timeout_s=60, max_retries=1)
    texts = teacher.complete(ASKS, GREEDY)
    assert texts == LocalTeacher(tiny, batch_size=1).complete(ASKS, GREEDY)  # same model, greedy: same text
    assert teacher.failures == 0


def test_openai_teacher_unknown_model_is_counted_not_raised(served):
    teacher = OpenAITeacher(f"{served.url}/v1", "no-such-model", None, max_concurrency=2, timeout_s=30, max_retries=2)
    assert teacher.complete(ASKS[:3], GREEDY) == [None, None, None]
    assert teacher.failures == 3


class Broken(BaseHTTPRequestHandler):
    """Answers chat completions with garbage, empty content, or a 503 the first time."""

    calls = 0

    def do_POST(self):
        Broken.calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        word = body["messages"][0]["content"]
        if "flaky" in word and Broken.calls % 2 == 1:
            self.send_response(503)
            self.end_headers()
            return
        payload = {
            "garbage": b"not json at all",
            "empty": json.dumps({"choices": [{"message": {"content": ""}}]}).encode(),
            "missing": json.dumps({"choices": []}).encode(),
        }.get(word)
        if payload is None:
            payload = json.dumps({"choices": [{"message": {"content": f"ok {word}"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def broken():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_garbage_empty_and_flaky_replies(broken):
    teacher = OpenAITeacher(broken, "m", "key", max_concurrency=2, timeout_s=5, max_retries=2)
    asks = [Ask([{"role": "user", "content": w}], 4) for w in ("garbage", "empty", "missing", "flaky", "fine")]
    assert teacher.complete(asks, GREEDY) == [None, "", None, "ok flaky", "ok fine"]
    assert teacher.failures == 2


def test_unreachable_endpoint_raises_after_retries():
    port = free_port()  # nothing listens here
    teacher = OpenAITeacher(f"http://127.0.0.1:{port}/v1", "m", None, max_concurrency=1, timeout_s=2, max_retries=2)
    start = time.perf_counter()
    with pytest.raises(TeacherUnavailable, match=rf"127\.0\.0\.1:{port}/v1/chat/completions unreachable after 3 tries"):
        teacher.complete(ASKS[:1], GREEDY)
    assert time.perf_counter() - start >= 0.75 * (0.5 + 1.0)  # the client backed off 0.5 s then 1 s (less jitter)
