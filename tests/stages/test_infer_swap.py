"""`stage=infer` and `stage=swap` through the real CLI: outputs, records, and one-line refusals."""

from __future__ import annotations

import json

import pytest

from selfalign.runtime.adapters import write_random_adapter
from selfalign.runtime.generate import infer
from selfalign.runtime.loader import apply_adapter, load_base
from tests.conftest import run_dirs

PROMPT = "Describe a quiet morning."


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    handle = load_base("tiny_llama")
    write_random_adapter(handle, root / "alpha" / "0.0.0", "alpha", seed=1)
    apply_adapter(handle, "alpha/0.0.0", root=root)
    return root, infer(handle, PROMPT, max_new_tokens=10), infer(handle, PROMPT, max_new_tokens=10, adapter="base")


def test_infer_with_adapter_matches_the_library_and_records_it(cli, tmp_path, adapters):
    root, expected, base = adapters
    proc = cli(
        "stage=infer",
        "base_model=tiny_llama",
        f"prompt={PROMPT}",
        "infer.max_new_tokens=10",
        f"paths.adapters_dir={root}",
        "adapter=alpha/0.0.0",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Callback" not in proc.stderr  # the sweep callback stays out of single runs
    record = json.loads((run_dirs(tmp_path, "infer")[0] / "infer.json").read_text())
    assert record["output"] == expected and record["adapter"] == "alpha"
    env = json.loads((run_dirs(tmp_path, "infer")[0] / "env.json").read_text())
    assert env["torch"]["cuda_available"] is False and env["torch"]["gpus"] == []  # completed once torch loaded
    assert record["adapter_dir"] == str((root / "alpha" / "0.0.0").resolve())
    assert record["base_model"] == "tiny-llama" and record["completion_tokens"] == 10
    proc = cli("stage=infer", "base_model=tiny_llama", f"prompt={PROMPT}", "infer.max_new_tokens=10", "adapter=none")
    assert proc.returncode == 0
    assert json.loads((run_dirs(tmp_path, "infer")[1] / "infer.json").read_text())["output"] == base


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "error: stage=infer needs a prompt"),
        (["prompt=hi", "adapter=ghost/1.0.0"], "error: adapter dir 'ghost/1.0.0' not found under"),
        (["prompt=hi", "adapter=/etc"], "resolves outside the adapter root"),
        (["prompt=hi", "base_model=nope"], "Could not find 'base_model/nope'"),
    ],
)
def test_infer_refusals_are_one_clear_line(cli, adapters, args, message):
    root, *_ = adapters
    proc = cli("stage=infer", "base_model=tiny_llama", f"paths.adapters_dir={root}", *args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_swap_without_a_server_says_so(cli):
    proc = cli("stage=swap", "adapter=alpha/0.0.0", "serve.port=9")
    assert proc.returncode == 2
    assert "no server answering at http://127.0.0.1:9/v1/adapters/swap" in proc.stderr
    assert "start one with stage=serve" in proc.stderr


def test_swap_needs_an_adapter(cli):
    """No adapter= is a mistake, never a silent switch of the server back to the base model."""
    proc = cli("stage=swap", "serve.port=9")
    assert proc.returncode == 2
    assert "stage=swap needs adapter=" in proc.stderr and "adapter=base" in proc.stderr
    assert "Traceback" not in proc.stderr and "no server answering" not in proc.stderr  # refused before any call
    proc = cli("stage=swap", "adapter=base", "serve.port=9")  # explicit: goes on to ask the server
    assert proc.returncode == 2 and "no server answering" in proc.stderr


@pytest.mark.slow
def test_infer_on_the_bundled_model(cli, tmp_path):
    proc = cli("stage=infer", "prompt=What is the capital of France?", "infer.max_new_tokens=16")
    assert proc.returncode == 0, proc.stderr
    assert "Callback" not in proc.stderr  # the sweep callback stays out of single runs
    record = json.loads((run_dirs(tmp_path, "infer")[0] / "infer.json").read_text())
    assert "Paris" in record["output"] and record["base_model"] == "smollm2-135m-instruct"


# A base model that cannot load: a refusal that names the adapter, the host or the port proves the check ran first.
NO_MODEL = "base_model.gguf_file=absent.gguf"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stage=infer", "prompt=hi", "adapter=ghost/1.0.0"], "error: adapter dir 'ghost/1.0.0' not found under"),
        (["stage=infer", "prompt=hi", "adapter=/etc"], "error: adapter path '/etc' resolves outside the adapter root"),
        (["stage=serve", "serve.adapters=[ghost/1.0.0]"], "error: adapter dir 'ghost/1.0.0' not found under"),
        (["stage=serve", "serve.host=0.0.0.0"], "error: serve.host=0.0.0.0 is reachable from other machines"),
    ],
)
def test_cheap_checks_come_before_the_model_load(cli, args, message):
    proc = cli(*args, NO_MODEL)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message) and "absent.gguf" not in proc.stderr


def test_serve_refuses_a_bin_adapter_and_another_base_before_loading(cli, tmp_path, adapters):
    root, *_ = adapters
    binary = tmp_path / "adapters" / "pickled" / "0.0.0"
    binary.mkdir(parents=True)
    (binary / "adapter_model.bin").write_bytes(b"not a safetensors file")
    proc = cli("stage=serve", f"paths.adapters_dir={tmp_path}/adapters", "serve.adapters=[pickled/0.0.0]", NO_MODEL)
    assert proc.returncode == 2 and "safetensors" in proc.stderr and "absent.gguf" not in proc.stderr
    # alpha was trained on tiny-llama; the default base is SmolLM2
    proc = cli("stage=serve", f"paths.adapters_dir={root}", "serve.adapters=[alpha/0.0.0]", NO_MODEL)
    assert proc.returncode == 2 and "was trained on base model 'tiny-llama'" in proc.stderr


def test_a_busy_port_fails_before_the_model_load(cli):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = cli("stage=serve", f"serve.port={port}", NO_MODEL)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: serve.port={port}: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "pick another serve.port or stop what holds it"
    ]
