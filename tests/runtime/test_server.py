"""The real server in a subprocess on 127.0.0.1, driven by the `openai` client and raw HTTP."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from selfalign.runtime.adapters import write_random_adapter
from selfalign.runtime.generate import infer
from selfalign.runtime.loader import apply_adapter, load_base
from tests.servers import Server, http

PROMPTS = ["Name a colour.", "Tell me about rivers.", "What is two plus two?"]
MAX = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two random adapters on the tiny model, greedy reference outputs computed in this process."""
    tmp = tmp_path_factory.mktemp("serve")
    root = tmp / "adapters"
    handle = load_base("tiny_llama")
    write_random_adapter(handle, root / "alpha" / "0.0.0", "alpha", seed=1)
    write_random_adapter(handle, root / "beta" / "0.0.0", "beta", seed=2)
    refs = {"base": infer(handle, PROMPTS, max_new_tokens=MAX)}
    for name in ("alpha", "beta"):
        apply_adapter(handle, f"{name}/0.0.0", root=root)
        refs[name] = infer(handle, PROMPTS, max_new_tokens=MAX, adapter=name)
    assert refs["alpha"] != refs["beta"] != refs["base"]
    server = Server(root, tmp, "serve.adapters=[alpha/0.0.0]")
    yield server, root, refs, tmp
    server.stop()


def chat(client, model, prompt, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=MAX, **kw
    )


def test_models_chat_swap_and_stream(setup):
    server, _root, refs, tmp = setup
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-llama", "selfalign", "alpha"]

    # load beta at runtime, then chat with both adapters and the base by name
    status, body = http("POST", f"{server.url}/v1/adapters", {"path": "beta/0.0.0"})
    assert status == 200 and body["name"] == "beta" and body["attach_ms"] > 0
    assert [m.id for m in client.models.list().data] == ["tiny-llama", "selfalign", "alpha", "beta"]
    status, body = http("GET", f"{server.url}/v1/adapters")
    assert status == 200
    assert [(a["name"], a["lora"]) for a in body["adapters"]] == [("alpha", "slots"), ("beta", "slots")]
    for model, key in (("alpha", "alpha"), ("beta", "beta"), ("tiny-llama", "base")):
        reply = chat(client, model, PROMPTS[0])
        assert reply.choices[0].message.content == refs[key][0], model
        assert reply.usage.completion_tokens > 0 and reply.model == model

    # the alias follows the active adapter; stage=swap (the CLI) changes it mid-session
    assert chat(client, "selfalign", PROMPTS[1]).choices[0].message.content == refs["base"][1]
    for adapter, key in (("beta/0.0.0", "beta"), ("alpha/0.0.0", "alpha"), ("base", "base")):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "selfalign",
                "stage=swap",
                f"adapter={adapter}",
                f"serve.port={server.port}",
                f"paths.output_dir={tmp}/outputs",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert f"active adapter: {key}" in proc.stdout
        assert chat(client, "selfalign", PROMPTS[1]).choices[0].message.content == refs[key][1]
    # a swap the server refuses is one line with its status and message, and changes nothing
    swap = ["stage=swap", "adapter=nope/0.0.0", f"serve.port={server.port}", f"paths.output_dir={tmp}/outputs"]
    proc = subprocess.run(
        [sys.executable, "-m", "selfalign", *swap],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "server refused the swap (4" in proc.stderr and "nope/0.0.0" in proc.stderr, proc.stderr
    assert chat(client, "selfalign", PROMPTS[1]).choices[0].message.content == refs["base"][1]

    # streaming yields the same text as a plain call
    pieces = [c.choices[0].delta.content or "" for c in chat(client, "beta", PROMPTS[2], stream=True)]
    assert "".join(pieces) == refs["beta"][2] and len(pieces) > 2

    # unload: the model disappears from the list and answers 404
    assert http("DELETE", f"{server.url}/v1/adapters/beta")[0] == 200
    assert "beta" not in [m.id for m in client.models.list().data]
    status, body = http(
        "POST", f"{server.url}/v1/chat/completions", {"model": "beta", "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 404 and body["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "fragment"),
    [
        ("POST", "/v1/chat/completions", b"{not json", 400, ""),
        ("POST", "/v1/chat/completions", {"model": "alpha"}, 400, "messages: Field required"),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "temperature": 5},
            400,
            "temperature",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8, "min_tokens": 9},
            400,
            "min_tokens=9 is above max_tokens=8",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model 'nope' not found",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "alpha", "messages": [{"role": "user", "content": "x " * 3000}], "max_tokens": 8},
            400,
            "context window",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000},
            400,
            "max_tokens=5000 is above this server's limit of 1024 (serve.max_tokens_limit)",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "alpha", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "messages.0.content: part 0 has type 'image_url': this server takes text parts only",
        ),
        ("POST", "/v1/chat/completions", b'{"model": "alpha", "messages": [', 400, "request body is not valid JSON"),
        ("POST", "/v1/adapters", {"path": "../outside"}, 400, "contains '..'"),
        ("POST", "/v1/adapters", {"path": "/etc"}, 400, "resolves outside the adapter root"),
        ("POST", "/v1/adapters", {"path": "missing/1.0.0"}, 400, "not found under"),
        ("POST", "/v1/adapters", {"path": "alpha/0.0.0", "name": "tiny-llama"}, 400, "already names the base model"),
        ("POST", "/v1/adapters", {"path": "alpha/0.0.0", "name": "selfalign"}, 400, "names the server's alias"),
        ("POST", "/v1/adapters", {"path": "alpha/0.0.0", "name": "n" * 5000}, 400, "(5000 characters) is not a slug"),
        ("POST", "/v1/adapters", {"path": "alpha/0.0.0", "name": "a b"}, 400, "'a b' is not a slug"),
        ("POST", "/v1/adapters", {"path": "alpha/0.0.0", "name": "copy"}, 400, "is already loaded as 'alpha'"),
        ("POST", "/v1/adapters", {"path": "alpha\u0000/0.0.0"}, 400, "holds a NUL or other control character"),
        (
            "POST",
            "/v1/chat/completions",
            b'{"model": "alpha", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
            400,
            "messages.0.content: holds '\\ud800' at character 3: not valid Unicode text",
        ),
        ("POST", "/v1/adapters/swap", {"name": "ghost"}, 404, "adapter 'ghost' is not loaded"),
        ("DELETE", "/v1/adapters/ghost", None, 404, "not loaded"),
        ("GET", "/v1/nothing", None, 404, "Not Found"),
    ],
)
def test_bad_requests_get_json_4xx_and_server_keeps_serving(setup, method, path, body, status, fragment):
    server, *_ = setup
    got, reply = http(method, server.url + path, body)
    assert got == status
    assert fragment in reply["error"]["message"]
    assert http("GET", f"{server.url}/v1/models")[0] == 200


def test_a_body_over_the_limit_is_refused_whether_or_not_it_declares_its_length(setup):
    from http.client import HTTPConnection

    server, *_ = setup
    status, reply = http("POST", f"{server.url}/v1/chat/completions", b"{" + b" " * (1 << 20) + b"}")
    assert status == 413 and reply["error"]["message"] == "request body is over 1,048,576 bytes (serve.max_body_bytes)"
    conn = HTTPConnection("127.0.0.1", server.port, timeout=60)  # chunked: no Content-Length
    try:
        chunks = (b" " * 65536 for _ in range(40))  # 2.5 MiB, sent as it is counted
        conn.request("POST", "/v1/chat/completions", body=chunks, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413 and b"body_too_large" in response.read()
    finally:
        conn.close()
    assert http("GET", f"{server.url}/v1/models")[0] == 200


def test_content_as_a_list_of_text_parts_is_the_same_prompt(setup):
    server, _, refs, _ = setup
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    parts = [{"type": "text", "text": PROMPTS[0][:5]}, {"type": "text", "text": PROMPTS[0][5:]}]
    reply = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": parts}], max_tokens=MAX)
    assert reply.choices[0].message.content == refs["alpha"][0]


def test_min_tokens_is_taken_as_vllm_takes_it(setup):
    """`min_tokens` (vLLM's extension, sent in the body as `extra_body`): every answer runs to it."""
    server, _, refs, _ = setup
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    for i, prompt in enumerate(PROMPTS):
        reply = chat(client, "alpha", prompt, extra_body={"min_tokens": MAX})
        assert reply.usage.completion_tokens == MAX
        assert reply.choices[0].message.content.startswith(refs["alpha"][i])


def test_a_repeated_prompt_is_prefilled_from_the_prefix_cache(setup):
    """The second time a prompt comes, all but its last token come from the prefix cache (`/v1/status` counts them)
    and the answer is the same."""
    server, _, refs, _ = setup
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    before = http("GET", f"{server.url}/v1/status")[1]["queue"]
    replies = [chat(client, "alpha", PROMPTS[2]) for _ in range(2)]
    after = http("GET", f"{server.url}/v1/status")[1]["queue"]
    assert [r.choices[0].message.content for r in replies] == [refs["alpha"][2]] * 2
    prompt = replies[0].usage.prompt_tokens
    assert after["prompt_tokens"] - before["prompt_tokens"] == 2 * prompt
    assert after["prefix_hit_tokens"] - before["prefix_hit_tokens"] >= prompt - 1


def test_a_disconnected_stream_stops_its_generation(setup):
    """A client that hangs up mid-stream frees the model: the next request is not queued behind the rest."""
    import json
    import time
    from http.client import HTTPConnection

    server, *_ = setup
    url = f"{server.url}/v1/chat/completions"
    body = {"model": "alpha", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 1000}
    start = time.perf_counter()
    status, reply = http("POST", url, body)
    full = time.perf_counter() - start
    assert status == 200 and reply["usage"]["completion_tokens"] == 1000  # random weights never stop early

    conn = HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body | {"stream": True}), {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    lines = [response.readline() for _ in range(6)]  # the role chunk and a few tokens
    assert sum(line.startswith(b"data: {") for line in lines) >= 3
    response.close()  # hang up (both the response and the connection hold the socket)
    conn.close()

    start = time.perf_counter()
    status, reply = http("POST", url, body | {"max_tokens": 4})
    after = time.perf_counter() - start
    assert status == 200 and reply["usage"]["completion_tokens"] == 4
    assert after < full / 4, (after, full)  # it did not wait for the abandoned generation to finish


def test_a_client_that_hangs_up_before_a_plain_answer_frees_its_slot(setup):
    import json
    import socket

    server, *_ = setup
    request = {"model": "alpha", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 1000}
    start = time.perf_counter()
    assert http("POST", f"{server.url}/v1/chat/completions", request)[0] == 200
    full = time.perf_counter() - start  # 1,000 tokens: random weights never stop early

    body = json.dumps(request)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        while http("GET", f"{server.url}/v1/status")[1]["queue"]["running"] == 0:
            assert time.perf_counter() - start < 60
            time.sleep(0.02)
    hung_up = time.perf_counter()
    while http("GET", f"{server.url}/v1/status")[1]["queue"]["running"] != 0:
        time.sleep(0.02)
    assert time.perf_counter() - hung_up < full / 4  # it left the batch, not finished its 1,000 tokens


def test_symlink_out_of_root_is_refused(setup, tmp_path):
    server, root, *_ = setup
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "sneaky").symlink_to(outside)
    status, reply = http("POST", f"{server.url}/v1/adapters", {"path": "sneaky"})
    assert status == 400 and "resolves outside the adapter root" in reply["error"]["message"]


def test_concurrent_requests_each_get_their_own_adapter_across_a_swap(setup):
    server, _root, refs, _ = setup
    assert http("POST", f"{server.url}/v1/adapters", {"path": "beta/0.0.0"})[0] == 200
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    jobs = [(m, i) for i in range(len(PROMPTS)) for m in ("alpha", "beta", "tiny-llama")] * 2

    def one(job):
        model, i = job
        return job, chat(client, model, PROMPTS[i]).choices[0].message.content

    def swaps():
        for target in ("beta", "alpha", None, "beta"):
            assert http("POST", f"{server.url}/v1/adapters/swap", {"name": target})[0] == 200

    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(one, job) for job in jobs]
        swapper = pool.submit(swaps)
        results = [f.result() for f in futures]
        swapper.result()
    key = {"alpha": "alpha", "beta": "beta", "tiny-llama": "base"}
    for (model, i), text in results:
        assert text == refs[key[model]][i], (model, i)
    assert http("GET", f"{server.url}/v1/adapters")[1]["active"] == "beta"


def test_api_key_is_required_when_configured(setup):
    _, root, _, tmp = setup
    server = Server(root, tmp, "serve.api_key_env=SELFALIGN_TEST_KEY", env={"SELFALIGN_TEST_KEY": "s3cret"})
    try:
        status, reply = http("GET", f"{server.url}/v1/models")
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        status, _ = http("GET", f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert status == 401
        client = OpenAI(base_url=f"{server.url}/v1", api_key="s3cret")
        assert [m.id for m in client.models.list().data] == ["tiny-llama", "selfalign"]
        assert http("GET", f"{server.url}/health") == (200, {"status": "ok"})  # liveness names nothing
        key = {"Authorization": "Bearer s3cret"}
        for path in ("/v1/status", "/openapi.json", "/v1/adapters"):
            status, reply = http("GET", f"{server.url}{path}")
            assert status == 401 and reply["error"]["code"] == "invalid_api_key", path
            assert http("GET", f"{server.url}{path}", headers=key)[0] == 200, path
        assert http("GET", f"{server.url}/v1/status", headers=key)[1]["base_model"] == "tiny-llama"
        assert "/v1/chat/completions" in http("GET", f"{server.url}/openapi.json", headers=key)[1]["paths"]
        for path in ("/docs", "/redoc"):  # their pages would fetch the schema without the key: off
            assert http("GET", f"{server.url}{path}", headers=key)[0] == 404, path
        status, reply = http("POST", f"{server.url}/v1/chat/completions", b"x" * (2 << 20))  # no key, 2 MiB
        assert status == 413 and reply["error"]["code"] == "body_too_large"  # refused before the key is read
    finally:
        server.stop()


def test_server_binds_loopback_by_default(setup):
    server, *_ = setup
    out = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip("ss is not available to inspect listening sockets")
    local_addresses = [line.split()[3] for line in out.stdout.splitlines()]
    assert local_addresses == [f"127.0.0.1:{server.port}"]


def test_sixteen_clients_across_two_adapters_and_the_base_with_swaps_and_an_unload(setup):
    """Batched answers equal the eval harness's greedy answers (its own batched path) for every model; swaps
    mid-run change nothing for named models, and the unload only ever turns requests away (404 or 409), never
    answers them from the wrong weights."""
    from selfalign.config import EvalConfig
    from selfalign.eval.harness import generate_outputs

    server, root, _refs, _ = setup
    handle = load_base("tiny_llama")
    rows = [{"prompt": p} for p in PROMPTS]
    settings = EvalConfig(max_new_tokens=MAX)
    expected = {"tiny-llama": generate_outputs(handle, rows, None, settings).texts}
    for name in ("alpha", "beta"):
        apply_adapter(handle, f"{name}/0.0.0", root=root, activate=False)
        expected[name] = generate_outputs(handle, rows, name, settings).texts
    assert http("POST", f"{server.url}/v1/adapters", {"path": "beta/0.0.0"})[0] == 200
    unloaded = threading.Event()

    def client(c: int) -> list[tuple[str, int, int, str]]:
        out = []
        for r in range(3):
            model, i = ("alpha", "beta", "tiny-llama")[(c + r) % 3], (c + r) % len(PROMPTS)
            after_unload = unloaded.is_set()
            status, body = http(
                "POST",
                f"{server.url}/v1/chat/completions",
                {"model": model, "messages": [{"role": "user", "content": PROMPTS[i]}], "max_tokens": MAX},
            )
            text = body["choices"][0]["message"]["content"] if status == 200 else body["error"]["code"]
            out.append((model, i, status, text, after_unload))
        return out

    def admin():
        for target in ("beta", "alpha", None, "alpha"):
            time.sleep(0.05)
            assert http("POST", f"{server.url}/v1/adapters/swap", {"name": target})[0] == 200
        unloaded.set()
        assert http("DELETE", f"{server.url}/v1/adapters/beta")[0] == 200

    with ThreadPoolExecutor(max_workers=17) as pool:
        futures = [pool.submit(client, c) for c in range(16)]
        admin_done = pool.submit(admin)
        results = [x for f in futures for x in f.result()]
        admin_done.result()
    wrong = [(m, i, text) for m, i, status, text, _ in results if status == 200 and text != expected[m][i]]
    assert wrong == []
    refused = [(m, status, text, after) for m, _, status, text, after in results if status != 200]
    # only beta's requests are turned away: 409 while queued or draining, 404 once it is gone
    assert all(m == "beta" and (status == 409 or (status == 404 and after)) for m, status, _, after in refused), refused
    assert all(status == 200 for m, _, status, _, _ in results if m != "beta")  # 32 of the 48, whatever the timing
    health = http("GET", f"{server.url}/v1/status")[1]
    assert health["adapters"] == ["alpha"] and health["queue"]["waiting"] == 0 and health["queue"]["max_batch"] == 16


def test_a_full_queue_answers_429_with_retry_after(setup):
    import json
    import urllib.error
    import urllib.request

    _, root, _, tmp = setup
    server = Server(root, tmp, "serve.max_batch=1", "serve.max_queue=1")
    try:
        body = json.dumps({"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000})

        def post():
            req = urllib.request.Request(
                f"{server.url}/v1/chat/completions", body.encode(), {"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    return r.status, None
            except urllib.error.HTTPError as e:
                return e.code, e.headers.get("Retry-After")

        def queue_reaches(running, waiting):  # staged, so the test does not depend on how fast the box is
            deadline = time.time() + 60
            while time.time() < deadline:
                queue = http("GET", f"{server.url}/v1/status")[1]["queue"]
                if (queue["running"], queue["waiting"]) == (running, waiting):
                    return True
                time.sleep(0.01)
            return False

        with ThreadPoolExecutor(max_workers=2) as pool:
            decoding = pool.submit(post)
            assert queue_reaches(1, 0)  # one decoding
            waiting = pool.submit(post)
            assert queue_reaches(1, 1)  # one waiting: the queue is full
            refused = [post() for _ in range(4)]  # answered at once, while the first still decodes
            accepted = [decoding.result(), waiting.result()]
        assert refused == [(429, "1")] * 4
        assert accepted == [(200, None)] * 2
    finally:
        server.stop()
