"""`stage=train` on the tiny model: adapter + manifest, run files, MLflow run and registry, reproducibility,
crash -> FAILED run -> `resume=true` to the same weights, refusals, QLoRA on CPU, distributed presets."""

from __future__ import annotations

import json
from dataclasses import asdict

import lightning.pytorch as pl
import pytest
import torch
from mlflow import MlflowClient

from selfalign.app import to_typed
from selfalign.errors import SelfAlignError
from selfalign.stages import train
from selfalign.utils.hashing import sha256_file, sha256_json
from tests.conftest import run_dirs
from tests.train.helpers import write_sft

TINY = ["stage=train", "base_model=tiny_llama", "trainer.accumulate_grad_batches=2"]


@pytest.fixture
def train_cfg(compose_cfg, tmp_path):
    data = write_sft(tmp_path / "sft.jsonl", 40)

    def _cfg(*overrides: str, run: str = "run"):
        cfg = compose_cfg(
            [
                *TINY,
                f"data={data}",
                f"paths.adapters_dir={tmp_path}/adapters",
                f"paths.mlruns_dir={tmp_path}/mlruns",
                *overrides,
            ]
        )
        cfg.paths.run_dir = str(tmp_path / run)
        return to_typed(cfg)

    return _cfg


def client(tmp_path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")


def test_train_writes_adapter_manifest_run_files_and_mlflow(train_cfg, tmp_path):
    result = train.run(train_cfg("trainer.max_epochs=2"))
    out = tmp_path / "adapters" / "neutral-concise" / "0.1.0"
    assert result["adapter_dir"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    assert not (out.parent / ".0.1.0.partial").exists()  # checkpoints go once the adapter is whole
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adapter_id"] == "neutral-concise" and manifest["version"] == "0.1.0"
    assert manifest["base_model"] == "tiny-llama" and manifest["seed"] == 42
    assert manifest["lora"] == {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["attn", "mlp"], "qlora": False}
    assert manifest["dataset_sha256"] == sha256_file(tmp_path / "sft.jsonl")
    assert len(manifest["persona_hash"]) == 64 and len(manifest["chat_template_hash"]) == 64
    assert manifest["base_model_revision"].startswith("tiny:SmolLM2-135M-Instruct.Q4_1.gguf@sha256:")
    assert manifest["metrics"]["val_loss"] == pytest.approx(result["val_loss"])
    assert manifest["training"]["betas"] == [0.9, 0.95] and manifest["training"]["weight_decay"] == 0.1
    assert manifest["registry"] == {"name": "neutral-concise", "version": "1"}
    # 36 train rows / micro-batch 4 = 9 batches per epoch, accumulate 2 -> 5 optimizer steps per epoch
    assert result["steps"] == 10 and result["epochs"] == 2 and result["rows"] == 40
    assert result["val_loss"] < 11 and result["train_tokens"] > 0

    events = [json.loads(line) for line in (tmp_path / "run" / "train_metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "train_step"]
    assert [e["step"] for e in steps] == list(range(10))
    assert steps[0]["lr"] == pytest.approx(1.5e-4) and steps[-1]["lr"] < steps[1]["lr"]  # warmup 1 step, then cosine
    assert [e["step"] for e in events if e["event"] == "validation"] == [4, 9]
    assert (
        json.loads((tmp_path / "run" / "train_summary.json").read_text())["adapter_sha256"] == result["adapter_sha256"]
    )

    c = client(tmp_path)
    run = c.get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "16" and run.data.params["lora.lr"] == "0.00015"
    assert run.data.tags["stage"] == "train" and run.data.tags["persona_id"] == "neutral-concise"
    assert run.data.tags["dataset_sha256"] == manifest["dataset_sha256"]
    (data_input,) = run.inputs.dataset_inputs  # the runs table's Dataset column
    assert data_input.dataset.name == "sft-neutral-concise"
    assert data_input.dataset.digest == manifest["dataset_sha256"][:16]
    assert [(t.key, t.value) for t in data_input.tags] == [("mlflow.data.context", "training")]
    assert run.data.tags["run_dir"] == str(tmp_path / "run")
    assert len(c.get_metric_history(run.info.run_id, "train_loss")) == 10
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val_loss")][:2] == [4, 9]
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id, "adapter")}
    assert artifacts == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/manifest.json"}
    (version,) = c.search_model_versions("name='neutral-concise'")
    assert version.run_id == run.info.run_id and version.tags["adapter_version"] == "0.1.0"

    # a second version registers as version 2; the same config again is a no-op; another config is refused
    second = train.run(train_cfg("trainer.max_steps=2", "train.version=0.2.0", run="run2"))
    assert second["registry_version"] == "2"
    again = train.run(train_cfg("trainer.max_epochs=2", run="run3"))
    assert again["skipped"] is True and again["adapter_sha256"] == result["adapter_sha256"]
    assert again["registry_version"] == "1" and len(c.search_model_versions("name='neutral-concise'")) == 2
    with pytest.raises(SelfAlignError, match=r"0\.1\.0 already holds an adapter of this version trained with another"):
        train.run(train_cfg("trainer.max_steps=1", run="run4"))


def test_trained_adapter_attaches_and_changes_the_model(train_cfg, tmp_path):
    from selfalign.runtime.loader import apply_adapter, load_base
    from selfalign.runtime.lora import route

    train.run(train_cfg("trainer.max_epochs=1", "lora.lr=5e-3", "tracking.enabled=false"))
    handle = load_base("tiny_llama", "cpu")
    batch = handle.tokenizer(["Explain tides briefly."], return_tensors="pt")
    with torch.inference_mode():
        base = handle.model(**batch).logits
    apply_adapter(handle, tmp_path / "adapters" / "neutral-concise" / "0.1.0", root=tmp_path / "adapters")
    with torch.inference_mode(), route(handle, [handle.active]) as (model, extra):  # its rows on the adapter
        adapted = model(**batch, **extra).logits
    assert (adapted - base).abs().max() > 1e-3


def test_same_seed_gives_bit_identical_weights(train_cfg, tmp_path):
    args = ("trainer.max_steps=3", "tracking.enabled=false")
    a = train.run(train_cfg(*args, run="a"))
    b = train.run(train_cfg(*args, "train.version=0.1.1", run="b"))
    c = train.run(train_cfg(*args, "train.version=0.1.2", "seed=7", run="c"))
    assert a["adapter_sha256"] == b["adapter_sha256"] != c["adapter_sha256"]


def test_policy_repeat_at_one_keeps_the_run_hash_adapters_had_before_it(train_cfg):
    cfg = train_cfg()
    before = {  # the run hash as it was computed before lora.policy_repeat existed
        "data": "d",
        "persona": "p",
        "base_model": asdict(cfg.base_model),
        "lora": {k: v for k, v in asdict(cfg.lora).items() if k != "policy_repeat"},
        "trainer": cfg.trainer.lightning_kwargs(),
        "seed": cfg.seed,
    }
    assert train.training_run_hash(cfg, "d", "p") == sha256_json(before)
    assert train.training_run_hash(train_cfg("lora.policy_repeat=2"), "d", "p") != sha256_json(before)


class CrashAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def test_crash_marks_run_failed_and_resume_reaches_the_same_weights(train_cfg, tmp_path):
    base = ("trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=2")
    clean = train.run(train_cfg(*base, "train.version=9.9.9", run="clean"))
    with pytest.raises(RuntimeError, match="simulated crash at step 7"):
        train.run(train_cfg(*base, run="crash"), callbacks=(CrashAt(7),))
    partial = tmp_path / "adapters" / "neutral-concise" / ".0.1.0.partial"
    assert (partial / "checkpoints" / "last.ckpt").is_file()
    assert not (partial.parent / "0.1.0").exists()  # nothing that looks like a finished adapter
    failed = client(tmp_path).search_runs(["1"], "tags.run_dir = '" + str(tmp_path / "crash") + "'")
    assert [r.info.status for r in failed] == ["FAILED"]

    with pytest.raises(SelfAlignError, match="holds an unfinished training run; pass resume=true"):
        train.run(train_cfg(*base, run="again"))
    with pytest.raises(SelfAlignError, match="unfinished run with another config"):
        train.run(train_cfg(*base, "lora.r=8", "resume=true", run="other"))
    resumed = train.run(train_cfg(*base, "resume=true", run="resumed"))
    assert resumed["adapter_sha256"] == clean["adapter_sha256"]
    assert resumed["steps"] == clean["steps"] == 10
    assert resumed["val_loss"] == clean["val_loss"]


def test_a_crash_before_the_first_checkpoint_leaves_nothing_that_blocks_the_next_run(train_cfg, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash at step 1"):
        train.run(train_cfg("trainer.checkpoint_every_n_steps=5", run="crash"), callbacks=(CrashAt(1),))
    assert not (tmp_path / "adapters" / "neutral-concise" / ".0.1.0.partial").exists()
    assert train.run(train_cfg("trainer.max_steps=2", run="next"))["steps"] == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_steps=-5", "trainer.max_steps must be -1 (no limit) or >= 1 (got -5)"),
        ("trainer.precision=bogus", "trainer.precision='bogus' is not one of 32-true, bf16-mixed"),
        ("trainer=gpu", "trainer.accelerator=gpu but no CUDA device is visible; use trainer=cpu"),
    ],
)
def test_trainer_mistakes_are_one_line_and_leave_no_work_dir(cli, tmp_path, override, message):
    if override == "trainer=gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    data = write_sft(tmp_path / "sft.jsonl", 8)
    proc = cli(*TINY, f"data={data}", f"paths.adapters_dir={tmp_path}/adapters", "tracking.enabled=false", override)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").rglob("*.partial"))


def test_checkpoints_are_saved_without_lightnings_weights_only_notice_or_its_tips(train_cfg, caplog):
    """Lightning logged "`weights_only` was not set" on every save: about what is saved, but read as a pickle load;
    and a "💡 Tip" for its cloud products on every Trainer."""
    import logging

    with caplog.at_level(logging.INFO):
        result = train.run(train_cfg("trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2"))
    assert result["steps"] == 4
    assert "weights_only" not in caplog.text
    assert "Tip" not in caplog.text and "GPU available" in caplog.text  # Lightning's ads go, its facts stay


def test_train_sft_contract_uses_the_presets_recipe(tmp_path):
    """The seed's `train_sft`: the recipe `stage=train` composes (the base's own lora_lr, the CPU trainer preset),
    an adapter and manifest in out_dir that attach."""
    from selfalign.config import PROJECT_ROOT
    from selfalign.runtime.loader import apply_adapter, load_base
    from selfalign.train.sft import train_sft

    data = write_sft(tmp_path / "sft.jsonl", 12)
    out = tmp_path / "adapters" / "neutral-concise" / "0.0.9"
    persona = PROJECT_ROOT / "personas" / "neutral_concise.yaml"
    manifest = train_sft("tiny-llama", str(data), str(persona), str(out), seed=3, use_qlora=False)
    assert manifest["adapter_id"] == "neutral-concise" and manifest["version"] == "0.0.9" and manifest["seed"] == 3
    assert manifest["training"]["lr"] == 1.5e-4 and manifest["lora"]["qlora"] is False  # tiny_llama.yaml lora_lr
    assert manifest["weights_sha256"] == sha256_file(out / "adapter_model.safetensors")
    handle = load_base("tiny_llama")
    assert apply_adapter(handle, out, root=tmp_path / "adapters") == "neutral-concise"


def test_the_precisions_are_lightnings():
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    from selfalign.config import TRAINER_PRECISIONS

    lightning = set(typing.get_args(_PRECISION_INPUT_STR)) | set(typing.get_args(_PRECISION_INPUT_STR_ALIAS))
    assert set(TRAINER_PRECISIONS) == lightning


class _Planted:
    """Unpickling this would create a file: what a planted checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_resume_checkpoint_is_refused_not_run(train_cfg, tmp_path):
    base = ("trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=2", "tracking.enabled=false")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(train_cfg(*base, run="crash"), callbacks=(CrashAt(3),))
    last = tmp_path / "adapters" / "neutral-concise" / ".0.1.0.partial" / "checkpoints" / "last.ckpt"
    real = torch.load(last, weights_only=True)  # a real one needs nothing beyond torch's safe types
    assert real["global_step"] == 2 and "optimizer_states" in real
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": _Planted(marker)}, last)
    with pytest.raises(SelfAlignError, match=r"last\.ckpt: refused to load this resume checkpoint"):
        train.run(train_cfg(*base, "resume=true", run="resumed"))
    assert not marker.exists()


def test_out_of_memory_names_the_knobs(train_cfg):
    class OOM(pl.Callback):
        def on_train_batch_start(self, *args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(
        SelfAlignError,
        match=r"out of memory while training \(micro-batch 4, max_seq_len 1024\): "
        r"lower lora.micro_batch_size or lora.max_seq_len",
    ):
        train.run(train_cfg("tracking.enabled=false"), callbacks=(OOM(),))


def test_qlora_trains_on_cpu_with_nf4_base(train_cfg, tmp_path):
    result = train.run(train_cfg("lora=qlora", "trainer.max_steps=2", "tracking.enabled=false"))
    manifest = json.loads((tmp_path / "adapters" / "neutral-concise" / "0.1.0" / "manifest.json").read_text())
    assert manifest["lora"]["qlora"] is True and result["steps"] == 2
    from safetensors import safe_open

    with safe_open(f"{result['adapter_dir']}/adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)


@pytest.mark.parametrize(("preset", "strategy"), [("ddp", "ddp"), ("fsdp", "fsdp"), ("gpu", "auto"), ("cpu", "auto")])
def test_trainer_presets_compose_into_lightning_arguments(compose_cfg, preset, strategy):
    cfg = to_typed(compose_cfg(["stage=train", f"trainer={preset}", "trainer.num_nodes=2"]))
    kwargs = cfg.trainer.lightning_kwargs()
    assert kwargs["strategy"] == strategy and kwargs["num_nodes"] == 2
    assert not {"early_stop_patience", "checkpoint_every_n_steps", "reuse_host_memory"} & set(kwargs)
    assert kwargs["gradient_clip_val"] == 1.0
    assert cfg.trainer.reuse_host_memory is (preset == "cpu")  # the heap-reuse tuning is a CPU-training choice


def test_ddp_preset_builds_lightnings_ddp_strategy(compose_cfg):
    cfg = to_typed(compose_cfg(["stage=train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]))
    trainer = pl.Trainer(**cfg.trainer.lightning_kwargs() | {"precision": "32-true"}, logger=False)
    assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.num_devices == 2


def test_cli_data_that_is_not_utf8_names_the_file_and_line(cli, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"instruction": "\xff", "output": "b", "persona_id": "neutral-concise"}\n')
    proc = cli("stage=train", "base_model=tiny_llama", f"data={bad}", f"paths.adapters_dir={tmp_path}/a")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad}:1: not UTF-8 text (byte 0xff at column 18)"]
    assert "Traceback" not in proc.stderr


def test_cli_bad_data_is_one_line_with_the_line_number(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b", "persona_id": "neutral-concise"}\nnot json\n')
    proc = cli("stage=train", "base_model=tiny_llama", f"data={bad}", f"paths.adapters_dir={tmp_path}/a")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad}:2: not valid JSON (Expecting value)"]
    assert "Traceback" not in proc.stderr
    (run_dir,) = run_dirs(tmp_path, "train")
    assert (run_dir / "config_snapshot.yaml").exists()
