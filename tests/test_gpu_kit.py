"""The GPU check (`scripts/gpu_check.py`, `scripts/gpukit/`) runs only on a lent GPU machine. What can rot without
one is checked here: its command lines compose into typed configs from the conf/ presets, its options, the judges
it calls, and the int8 embedder that `scripts/gpu_prepare.py` packs and the check unpacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from selfalign.eval.golden import load_custom_set

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def kit(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import gpu_check
    import gpu_prepare
    from gpukit import children, runs

    return gpu_check, gpu_prepare, children, runs


def _overrides(cmd: list[str]) -> list[str]:
    """The Hydra overrides of a `python -m selfalign ...` command line."""
    assert cmd[1:3] == ["-m", "selfalign"]
    return [x for x in cmd[3:] if not x.startswith("hydra.")]


def test_training_runs_compose_from_the_conf_presets(kit, compose_cfg, tmp_path):
    gpu_check, _, _, runs = kit
    models = tmp_path / "models"
    for name, (preset, qlora, _, _) in gpu_check.TRAIN_RUNS.items():
        recipe = [f"lora.qlora={str(qlora).lower()}", "lora.micro_batch_size=4", "lora.max_seq_len=512", "data=x.jsonl"]
        cmd = runs.selfalign("train", preset, models, tmp_path / name, *runs.trainer(20, False, []), *recipe)
        cfg = OmegaConf.to_object(compose_cfg(_overrides(cmd)))
        want = OmegaConf.load(SCRIPTS.parent / "conf" / "base_model" / f"{preset}.yaml")
        # the preset's own facts come through; only the weights' place, name and the GPU dtype are overridden
        assert (cfg.base_model.family, cfg.base_model.max_seq_len) == (want.family, want.max_seq_len)
        assert (cfg.base_model.approx_params_b, cfg.base_model.lora_lr) == (want.approx_params_b, want.lora_lr)
        assert cfg.lora.lr == want.lora_lr
        assert cfg.base_model.source.value == "local" and cfg.base_model.path == str(models / preset)
        assert cfg.base_model.name == f"{preset}-shape-random" and cfg.base_model.dtype == "bfloat16"
        assert cfg.lora.qlora is qlora and cfg.trainer.max_steps == 20 and cfg.trainer.accelerator == "gpu"
        assert cfg.paths.adapters_dir == str(tmp_path / name / "adapters")


def test_the_preference_line_composes_on_the_large_preset(kit, compose_cfg, tmp_path):
    gpu_check, _, _, runs = kit
    (preset, sft_run, _) = gpu_check.PREFER_RUNS["prefer_large_qlora"]
    assert gpu_check.TRAIN_RUNS[sft_run][:2] == (preset, True)  # it continues the large QLoRA run's adapter
    extra = [*runs.trainer(4, False, []), *gpu_check.PREFER_SMALL]
    cmd = runs.selfalign("prefer", preset, tmp_path, tmp_path / sft_run, *extra)
    cfg = OmegaConf.to_object(compose_cfg(_overrides(cmd)))
    assert cfg.stage.name == "prefer" and cfg.prefer.categories == ["drugs", "pii"] and cfg.prefer.epochs == 1
    assert cfg.base_model.approx_params_b == 8.0 and cfg.trainer.accelerator == "gpu"
    assert cfg.paths.adapters_dir == str(tmp_path / sft_run / "adapters")


def test_dry_runs_train_at_the_gpu_precision_on_cpu(kit, compose_cfg, tmp_path):
    _, _, _, runs = kit
    cmd = runs.selfalign("train", "smollm2_135m", tmp_path, tmp_path, *runs.trainer(2, True, ["lora.r=8"]))
    cfg = OmegaConf.to_object(compose_cfg(_overrides(cmd)))
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.trainer.max_steps) == ("cpu", "bf16-mixed", 2)
    assert cfg.lora.r == 8  # --override reaches every training run


def test_call2_pipeline_and_eval_lines_compose(kit, compose_cfg, tmp_path):
    _, _, _, runs = kit
    assert runs.eval_set("full", tmp_path) == []  # the frozen sets, as a user runs them
    decode = [*runs.eval_set("small", tmp_path), "eval.max_new_tokens=64"]
    rows = load_custom_set(tmp_path / "golden_small.jsonl")  # what the eval stage reads
    assert len(rows) == 24 and {r["tags"][0] for r in rows} == {"style", "qa", "safety", "neutrality", "refusal"}
    cmd = runs.selfalign("pipeline", "smollm2_135m", tmp_path, tmp_path, "pipeline.steps=[train,eval]", *decode)
    cfg = OmegaConf.to_object(compose_cfg(_overrides(cmd)))
    assert cfg.pipeline.steps == ["train", "eval"] and cfg.eval.max_new_tokens == 64
    assert cfg.eval.custom_set == str(tmp_path / "golden_small.jsonl") and cfg.eval.policy is None
    cmd = runs.selfalign("eval", "llama3_1_8b", tmp_path, tmp_path, "adapter=neutral-concise/0.1.0", "lora.qlora=true")
    cfg = OmegaConf.to_object(compose_cfg(_overrides(cmd)))
    assert cfg.adapter == "neutral-concise/0.1.0" and cfg.lora.qlora and cfg.base_model.approx_params_b == 8.0


def test_options(kit, capsys):
    gpu_check = kit[0]
    dry = gpu_check.parse(["call1", "--dry"])
    assert (dry.steps, dry.only, dry.budget, dry.work) == (
        2,
        "large_qlora,prefer_large_qlora,small_lora,pytest_gpu",
        360,
        Path("/tmp/gpucheck-dry"),
    )
    full = gpu_check.parse(["call2", "--golden", "full", "--override", "lora.r=8", "--override", "lora.alpha=16"])
    assert (full.steps, full.golden, full.budget, full.override) == (20, "full", 240, ["lora.r=8", "lora.alpha=16"])
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse(["build-models", "m", "t", "qwen2_5_7b"])  # no shape recorded for it
    assert exc.value.code == 2 and "invalid choice: 'qwen2_5_7b'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse(["call1", "--only", "small_lora,large_lora_x"])
    assert "unknown run(s) ['large_lora_x']" in capsys.readouterr().err
    assert set(gpu_check.ORDER) == {*gpu_check.TRAIN_RUNS, *gpu_check.PREFER_RUNS, "pytest_gpu"}


def test_the_judges_give_the_recorded_reference(kit, capsys):
    gpu_check, _, children, _ = kit
    children.scorer_check()
    got = json.loads(capsys.readouterr().out.split("SCORERS ", 1)[1])
    assert got["refusal"] == gpu_check.SCORER_REFERENCE["refusal"]
    np.testing.assert_allclose(got["toxicity"], gpu_check.SCORER_REFERENCE["toxicity"], atol=1e-3)


@pytest.mark.slow
def test_the_int8_embedder_round_trip_serves_the_judges(kit, tmp_path):
    """Packed as gpu_prepare.py carries it, unpacked as call 2 does, served through the stand-in package."""
    gpu_check, gpu_prepare, children, _ = kit
    packed = gpu_prepare.build_embedder(tmp_path / "packed")
    assert packed["min_cosine_int8_vs_fp32"] > 0.995
    size = sum(p.stat().st_size for p in (tmp_path / "packed").rglob("*") if p.is_file())
    assert size < 26e6  # a quarter of the fp32 model's 91 MB
    children.unpack_embedder(tmp_path / "packed", tmp_path / "minilm")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SCRIPTS / "gpukit" / "shim"), os.environ.get("PYTHONPATH", "")]),
        "GPU_CHECK_MINILM_DIR": str(tmp_path / "minilm"),
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "gpu_check.py"), "scorer-check"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.split("SCORERS ", 1)[1])
    assert got["model_path"] == str(tmp_path / "minilm")  # the stand-in, not the installed package
    assert got["refusal"] == gpu_check.SCORER_REFERENCE["refusal"]
    np.testing.assert_allclose(got["toxicity"], gpu_check.SCORER_REFERENCE["toxicity"], atol=0.02)
