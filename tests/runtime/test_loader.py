"""The runtime on real models: loading, batched generation, adapter attach/switch/detach and its refusals."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import torch
from peft import PeftModel

from selfalign.errors import SelfAlignError
from selfalign.runtime.adapters import write_random_adapter
from selfalign.runtime.chat import chat_template_hash, render_example
from selfalign.runtime.families import lora_target_modules
from selfalign.runtime.generate import generate, infer
from selfalign.runtime.loader import (
    apply_adapter,
    detach,
    load_base,
    load_for_training,
    set_active,
    unload_adapter,
)
from selfalign.utils.hashing import sha256_file
from tests.runtime.reference import HFReference

PROMPT = "Tell me about the sea."
TOKENS = 12


def greedy(handle, prompt=PROMPT, **kw):
    return infer(handle, prompt, max_new_tokens=TOKENS, **kw)


@pytest.fixture(scope="module")
def tiny():
    """The tiny random Llama; tests must leave it without adapters."""
    return load_base("tiny_llama", device="cpu")


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    """Two random r=16 adapters A (seed 1) and B (seed 2) under one root, written from the bare tiny model."""
    root = tmp_path_factory.mktemp("adapters")
    before = greedy(tiny)
    write_random_adapter(tiny, root / "A", "A", seed=1)
    write_random_adapter(tiny, root / "B", "B", seed=2)
    assert greedy(tiny) == before  # writing adapters leaves the handle as it was
    assert not tiny.adapters and not isinstance(tiny.model, PeftModel)
    return root


# --------------------------------------------------------------------------- loading and generation


def test_unknown_preset_lists_the_presets():
    with pytest.raises(SelfAlignError, match=r"unknown base model 'nope'; choose one of: .*smollm2_135m") as err:
        load_base("nope")
    assert "tiny_llama" in str(err.value)


def test_tiny_loads_left_padded_with_chat_template(tiny):
    assert tiny.name == "tiny-llama" and tiny.device == "cpu"
    assert tiny.tokenizer.padding_side == "left" and tiny.tokenizer.pad_token is not None
    assert tiny.template_hash == chat_template_hash(tiny.tokenizer)
    assert tiny.active is None and tiny.adapters == {}


def test_training_and_inference_load_through_separate_paths(tiny):
    """Training gets train mode and right padding, inference eval mode and left padding; neither handle is
    switched afterwards, and loading one does not change the other."""
    trainee = load_for_training("tiny_llama", device="cpu")
    assert trainee.model.training and trainee.tokenizer.padding_side == "right"
    assert not tiny.model.training and tiny.tokenizer.padding_side == "left"
    assert trainee.template_hash == tiny.template_hash and trainee.tokenizer.pad_token == tiny.tokenizer.pad_token


def test_batch_with_left_padding_matches_single_prompts(tiny):
    prompts = ["Hi", PROMPT, "Write a long, careful paragraph about why the ocean tides rise and fall twice a day."]
    lengths = [len(tiny.tokenizer(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == 3  # different lengths, so the batch really is padded
    batched = infer(tiny, prompts, max_new_tokens=TOKENS)
    assert batched == [greedy(tiny, p) for p in prompts]
    assert all(batched)


def test_greedy_is_deterministic(tiny):
    assert greedy(tiny) == greedy(tiny)
    result = generate(tiny, [PROMPT], max_new_tokens=TOKENS)
    assert result.texts == [greedy(tiny)] and result.adapter is None
    assert result.prompt_tokens[0] > 0 and 0 < result.completion_tokens[0] <= TOKENS


def test_sampling_repeats_with_seed_and_differs_across_seeds(tiny):
    def sample(seed):
        return infer(tiny, PROMPT, max_new_tokens=TOKENS, temperature=1.0, seed=seed)

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first
    assert first != greedy(tiny)


def test_prompt_over_context_window_is_refused(tiny):
    long_prompt = "word " * (tiny.context_window + 100)
    with pytest.raises(SelfAlignError, match=r"context window"):
        infer(tiny, long_prompt, max_new_tokens=4)
    with pytest.raises(SelfAlignError, match=rf"{tiny.context_window}-token context window of tiny-llama"):
        infer(tiny, "Hi", max_new_tokens=tiny.context_window)


def test_lora_target_modules():
    assert lora_target_modules("llama", ["attn", "mlp"]) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert lora_target_modules("llama", ["mlp"]) == ["gate_proj", "up_proj", "down_proj"]
    assert lora_target_modules("phi3", ["attn", "mlp"]) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    with pytest.raises(SelfAlignError, match=r"no LoRA target map for family 'gpt2'; known: .*llama.*phi3"):
        lora_target_modules("gpt2", ["attn"])


def test_chat_rendering(tiny):
    head, full = render_example(tiny.tokenizer, "Hi", "Hello!")
    assert full.startswith(head)
    assert full.endswith("Hello!<|im_end|>\n")
    assert head.endswith("<|im_start|>assistant\n")
    digest = chat_template_hash(tiny.tokenizer)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert chat_template_hash(tiny.tokenizer) == digest == tiny.template_hash


def test_corrupt_cache_is_rebuilt(tmp_path, tiny):
    handle = load_base("tiny_llama", device="cpu", cache_dir=tmp_path)
    expected = greedy(handle)
    assert expected == greedy(tiny)  # same seed, same weights as the shared cache
    [weights] = (tmp_path / "models").glob("tiny-llama-*/model.safetensors")
    size = weights.stat().st_size
    weights.write_bytes(b"\x00" * 8)
    del handle
    again = load_base("tiny_llama", device="cpu", cache_dir=tmp_path)
    assert greedy(again) == expected
    [rebuilt] = (tmp_path / "models").glob("tiny-llama-*/model.safetensors")
    assert rebuilt.stat().st_size == size


# --------------------------------------------------------------------------- adapter swaps


def test_swap_attach_switch_detach_unload(adapters):
    handle = load_base("tiny_llama", device="cpu")
    base = greedy(handle)
    assert apply_adapter(handle, "A", root=adapters) == "A"
    assert handle.active == "A" and "A" in handle.slots and not handle.peft  # a copy into a slot: no PEFT layers
    assert not isinstance(handle.model, PeftModel)
    out_a = greedy(handle)
    assert apply_adapter(handle, adapters / "B", root=adapters) == "B"
    assert handle.active == "B" and set(handle.adapters) == {"A", "B"}
    out_b = greedy(handle)
    set_active(handle, "A")
    assert greedy(handle) == out_a
    assert len({base, out_a, out_b}) == 3

    # A per-call adapter wins for that call only.
    assert greedy(handle, adapter="B") == out_b
    assert handle.active == "A"
    assert greedy(handle, adapter="base") == base
    assert greedy(handle) == out_a
    assert infer(handle, [PROMPT, PROMPT], max_new_tokens=TOKENS, adapter="B") == [out_b, out_b]
    with pytest.raises(SelfAlignError, match=r"adapter 'C' is not loaded; loaded: A, B"):
        greedy(handle, adapter="C")
    with pytest.raises(SelfAlignError, match=r"adapter 'C' is not loaded"):
        set_active(handle, "C")

    detach(handle)
    assert handle.active is None and set(handle.adapters) == {"A", "B"}
    assert greedy(handle) == base
    set_active(handle, "B")
    assert greedy(handle) == out_b

    unload_adapter(handle, "B")
    assert handle.active is None and list(handle.adapters) == ["A"]
    assert greedy(handle) == base
    assert greedy(handle, adapter="A") == out_a
    unload_adapter(handle, "A")
    assert handle.adapters == {} and handle.manifests == {} and not handle.slots.slots
    assert all(not m._forward_hooks for m in handle.model.modules())  # no hook left on
    assert greedy(handle) == base
    with pytest.raises(SelfAlignError, match=r"adapter 'A' is not loaded"):
        unload_adapter(handle, "A")

    # A fully unloaded handle attaches again from disk and gives the same answers.
    apply_adapter(handle, "B", root=adapters)
    assert greedy(handle) == out_b


def test_slot_adapters_answer_as_hf_generate_on_peft_does(adapters):
    """Copied into slots, each adapter answers greedily, token for token, as Hugging Face's `generate` on PEFT's
    `PeftModel` does (an independent implementation), and as the engine does with every adapter on PEFT's path
    (`max_lora_rank=0`, which the slots cannot hold)."""
    reference = HFReference("tiny_llama", {"A": adapters / "A", "B": adapters / "B"})
    on_slots, on_peft = load_base("tiny_llama"), load_base("tiny_llama", max_lora_rank=0)
    for handle in (on_slots, on_peft):
        apply_adapter(handle, "A", root=adapters, activate=False)
        apply_adapter(handle, "B", root=adapters, activate=False)
    assert on_slots.slots.slots == {"A": 0, "B": 1} and not on_slots.peft
    assert on_peft.peft == {n: "rank 16 is above the slots' maximum 0" for n in "AB"} and not on_peft.slots.slots
    prompts = [PROMPT, "Hi", "Write a long, careful paragraph about why the ocean tides rise and fall twice a day."]
    for adapter in ("base", "A", "B"):
        expected = reference(prompts, max_new_tokens=TOKENS, adapter=adapter)
        for handle in (on_slots, on_peft):
            got = generate(handle, prompts, max_new_tokens=TOKENS, adapter=adapter)
            assert (got.texts, got.completion_tokens) == (expected.texts, expected.completion_tokens), adapter
    assert len({*reference(prompts[:1], max_new_tokens=TOKENS, adapter="A").texts, greedy(on_slots, adapter="B")}) == 2


# --------------------------------------------------------------------------- refusals


def copy_adapter(src, dst, **manifest_changes):
    shutil.copytree(src, dst)
    if manifest_changes:
        path = dst / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest.update(manifest_changes)
        path.write_text(json.dumps(manifest))
    return dst


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "root"
    path.mkdir()
    return path


def refused(handle, adapter_dir, root, match):
    with pytest.raises(SelfAlignError, match=match) as err:
        apply_adapter(handle, adapter_dir, root=root)
    assert handle.adapters == {} and handle.active is None
    return str(err.value)


def test_refuses_dotdot(tiny, adapters, root):
    copy_adapter(adapters / "A", root / "A")
    (root / "sub").mkdir()
    refused(tiny, "sub/../A", root, r"adapter path 'sub/\.\./A' contains '\.\.'")
    refused(tiny, str(root / "sub" / ".." / "A"), root, r"contains '\.\.'")


def test_refuses_absolute_path_outside_root(tiny, adapters, root, tmp_path):
    outside = copy_adapter(adapters / "A", tmp_path / "outside")
    message = refused(tiny, outside, root, r"resolves outside the adapter root")
    assert str(root) in message and str(outside) in message


def test_refuses_symlink_out_of_root(tiny, adapters, root, tmp_path):
    outside = copy_adapter(adapters / "A", tmp_path / "outside")
    (root / "link").symlink_to(outside, target_is_directory=True)
    refused(tiny, "link", root, r"adapter path 'link' resolves outside the adapter root")
    refused(tiny, root / "link", root, r"resolves outside the adapter root")


def test_refuses_missing_dir_and_missing_manifest(tiny, adapters, root):
    refused(tiny, "absent", root, r"adapter dir 'absent' not found under")
    bare = copy_adapter(adapters / "A", root / "bare")
    (bare / "manifest.json").unlink()
    refused(tiny, "bare", root, r"not an adapter dir, missing manifest\.json")


def test_a_checkpoint_without_a_chat_template_is_refused_unless_its_preset_names_one(cli, tiny, tmp_path):
    """A local Llama whose tokenizer ships no template: refused with one line, never rendered in a guessed one."""
    path = tmp_path / "no-template"
    tiny.model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    local = ["stage=infer", "prompt=hi", "base_model=tiny_llama", "base_model.source=local", f"base_model.path={path}"]
    proc = cli(*local, "base_model.chat_template=null", "infer.max_new_tokens=2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: base model 'tiny-llama': its tokenizer ships no chat template; set base_model.chat_template to the "
        "one it was trained with (chatml) or use a checkpoint that ships one"
    ]
    assert cli(*local, "base_model.chat_template=chatml", "infer.max_new_tokens=2").returncode == 0
    proc = cli(*local, "base_model.chat_template=llama9", "infer.max_new_tokens=2")
    assert proc.returncode == 2 and "base_model.chat_template: 'llama9' is not one of chatml" in proc.stderr


def test_adapter_names_and_the_resident_cap(tiny, adapters, root):
    copy_adapter(adapters / "A", root / "A")
    copy_adapter(adapters / "B", root / "B")
    for name, message in [
        ("tiny-llama", r"'tiny-llama' already names the base model"),
        ("none", r"'none' already names the base model"),
        ("-x", r"'-x' is not a slug"),
        ("x" * 65, r"is not a slug: 1-64 letters"),
    ]:
        with pytest.raises(SelfAlignError, match=message):
            apply_adapter(tiny, "A", root=root, name=name)
    with pytest.raises(SelfAlignError, match=r"'live' already names the server's alias"):
        apply_adapter(tiny, "A", root=root, name="live", reserved=("live",))
    assert tiny.adapters == {}
    try:
        assert apply_adapter(tiny, "A", root=root, max_adapters=1) == "A"
        assert apply_adapter(tiny, "A", root=root, max_adapters=1) == "A"  # the same one again: no new copy
        with pytest.raises(SelfAlignError, match=r"is already loaded as 'A': one copy per adapter"):
            apply_adapter(tiny, "A", root=root, name="A2")
        with pytest.raises(SelfAlignError, match=r"1 adapters are resident, the most .* \(serve.max_adapters\)"):
            apply_adapter(tiny, "B", root=root, max_adapters=1)
        assert list(tiny.adapters) == ["A"]
    finally:
        unload_adapter(tiny, "A")
    assert tiny.adapters == {}


def test_refuses_pickle_weights(tiny, adapters, root):
    pickled = copy_adapter(adapters / "A", root / "pickled")
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"not really a pickle")
    refused(tiny, "pickled", root, r"adapter weights are a pickle \(adapter_model\.bin\); only safetensors load")


def test_refuses_other_base_model(tiny, adapters, root):
    copy_adapter(adapters / "A", root / "other", base_model="llama-3.1-8b-instruct")
    message = refused(tiny, "other", root, r"trained on base model 'llama-3\.1-8b-instruct'")
    assert "but this runtime serves 'tiny-llama'" in message


def test_refuses_other_chat_template(tiny, adapters, root):
    copy_adapter(adapters / "A", root / "tmpl", chat_template_hash="f" * 64)
    message = refused(tiny, "tmpl", root, r"expects chat template ffffffffffff")
    assert f"'tiny-llama' renders with {tiny.template_hash[:12]}" in message


def test_refuses_corrupt_manifest(tiny, adapters, root):
    broken = copy_adapter(adapters / "A", root / "broken")
    (broken / "manifest.json").write_text("{oops")
    refused(tiny, "broken", root, r"manifest\.json: not valid JSON")
    copy_adapter(adapters / "A", root / "noid", adapter_id="")
    refused(tiny, "noid", root, r"missing field 'adapter_id'")


def rehash(adapter_dir):
    """Record the current weights' sha256 in the manifest, as a save would."""
    path = adapter_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["weights_sha256"] = sha256_file(adapter_dir / "adapter_model.safetensors")
    path.write_text(json.dumps(manifest))


def test_flipped_weight_bytes_and_nan_weights_are_refused(tiny, adapters, root):
    from safetensors.torch import load_file, save_file

    manifest = json.loads((adapters / "A" / "manifest.json").read_text())
    assert manifest["weights_sha256"] == sha256_file(adapters / "A" / "adapter_model.safetensors")
    flipped = copy_adapter(adapters / "A", root / "flipped")
    data = bytearray((flipped / "adapter_model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # one byte of the last tensor: still a readable safetensors file
    (flipped / "adapter_model.safetensors").write_bytes(bytes(data))
    message = refused(
        tiny, "flipped", root, r"adapter_model\.safetensors: sha256 [0-9a-f]{12}\.\.\. is not the manifest's"
    )
    assert f"{manifest['weights_sha256'][:12]}..." in message and "retrain or restore them" in message
    nan = copy_adapter(adapters / "A", root / "nan")
    tensors = load_file(nan / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, nan / "adapter_model.safetensors")
    rehash(nan)
    refused(tiny, "nan", root, r"adapter failed to load \(ValueError: 1 of \d+ weight tensors hold NaN or inf values\)")
    assert not isinstance(tiny.model, PeftModel) and not tiny.slots.slots


def test_corrupt_weights_are_refused_and_leave_base_intact(adapters, root):
    handle = load_base("tiny_llama", device="cpu")
    base = greedy(handle)
    corrupt = copy_adapter(adapters / "A", root / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 8)
    with pytest.raises(SelfAlignError, match=r"unreadable safetensors"):
        apply_adapter(handle, "corrupt", root=root)
    assert handle.adapters == {}
    assert greedy(handle) == base


def test_weights_that_fail_midway_are_rolled_back(adapters, root):
    """Readable safetensors with wrong shapes fail inside PEFT, after it injected layers: both cases roll back."""
    from safetensors.torch import load_file, save_file

    handle = load_base("tiny_llama", device="cpu")
    base = greedy(handle)
    wrong = copy_adapter(adapters / "A", root / "wrong-shapes", adapter_id="wrong")
    weights = wrong / "adapter_model.safetensors"
    save_file({k: torch.zeros(3, 3) for k in load_file(weights)}, weights)
    rehash(wrong)  # the manifest vouches for these weights: the failure is PEFT's, after it injected layers
    with pytest.raises(SelfAlignError, match=r"adapter failed to load .*size mismatch"):
        apply_adapter(handle, "wrong-shapes", root=root)
    assert type(handle.model).__name__ == "LlamaForCausalLM" and greedy(handle) == base
    apply_adapter(handle, adapters / "A", root=adapters)
    with_a = greedy(handle)
    with pytest.raises(SelfAlignError, match="adapter failed to load"):
        apply_adapter(handle, "wrong-shapes", root=root)
    assert list(handle.adapters) == ["A"] and "A" in handle.slots and greedy(handle) == with_a


def test_qlora_loads_4bit_on_cpu_and_takes_an_adapter(adapters):
    """bitsandbytes NF4 runs on CPU, so the QLoRA load path is exercised here, not only on a GPU."""
    handle = load_base("tiny_llama", device="cpu", qlora=True)
    q_proj = handle.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.dtype == torch.uint8
    assert q_proj.weight.quant_state.quant_type == "nf4"
    base = greedy(handle)
    apply_adapter(handle, adapters / "A", root=adapters)
    assert greedy(handle) != base
    assert greedy(handle, adapter="base") == base


# --------------------------------------------------------------------------- the real bundled model


@pytest.mark.slow
def test_bundled_model_answers_and_attaches_fast(tmp_path):
    handle = load_base("smollm2_135m")
    base = infer(handle, "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in base
    write_random_adapter(handle, tmp_path / "rand", "rand", seed=3)
    t0 = time.perf_counter()
    name = apply_adapter(handle, tmp_path / "rand", root=tmp_path)
    seconds = time.perf_counter() - t0
    assert name == "rand" and handle.active == "rand"
    assert seconds < 1.0, f"attach took {seconds:.2f}s"
    assert infer(handle, "What is the capital of France?", max_new_tokens=16) != base
    assert infer(handle, "What is the capital of France?", max_new_tokens=16, adapter="base") == base
