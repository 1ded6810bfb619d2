"""Every option of every config group composes onto its schema; bad values fail at composition."""

from __future__ import annotations

import re
import shutil

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from selfalign.config import (
    CONF_DIR,
    BaseModelConfig,
    LoraConfig,
    ModelSource,
    SelfAlignConfig,
    TeacherKind,
)

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
# Options whose schema marks fields as required (???) need them on the command line.
REQUIRED = {("teacher", "openai"): ["teacher.base_url=http://127.0.0.1:8000/v1", "teacher.model=m"]}


def test_groups_cover_the_design():
    assert {"persona", "base_model", "lora", "stage", "paths", "trainer", "tracking", "teacher"} <= set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_to_typed_config(compose_cfg, group, option):
    cfg = compose_cfg([f"{group}={option}", *REQUIRED.get((group, option), [])], return_hydra_config=True)
    if group == "hparams_search":  # a global experiment file: it sets the stage and the Optuna sweeper
        assert cfg.stage.name == "train" and cfg.hydra.mode.name == "MULTIRUN"
        assert cfg.hydra.sweeper.direction == "minimize" and "lora.r" in cfg.hydra.sweeper.params
        assert cfg.hydra.sweeper.sampler.seed == 42
        return
    del cfg.hydra
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, SelfAlignConfig)
    node = getattr(obj, group)
    assert type(node).__module__ == "selfalign.config"  # a dataclass from the schema, not a dict
    if group == "persona":
        assert node.name == option
        assert node.path.endswith(f"personas/{option}.yaml")


def test_defaults(compose_cfg):
    obj = OmegaConf.to_object(compose_cfg())
    assert obj.seed == 42
    assert obj.stage.name == "doctor"
    assert obj.persona.name == "neutral_concise"
    assert isinstance(obj.base_model, BaseModelConfig)
    assert obj.base_model.source is ModelSource.gguf_package
    assert obj.base_model.dtype == "float32"
    lora = obj.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.targets, lora.qlora) == (16, 32, 0.05, ["attn", "mlp"], False)
    assert isinstance(lora, LoraConfig) and lora.lr == obj.base_model.lora_lr
    assert obj.teacher.kind is TeacherKind.local
    assert obj.tracking.tracking_uri.startswith("sqlite:///") and obj.tracking.tracking_uri.endswith("mlruns/mlflow.db")
    assert obj.paths.persona_dir.endswith("/personas")


def test_each_base_model_preset_carries_its_lora_lr(compose_cfg):
    def lr(*overrides):
        return OmegaConf.to_object(compose_cfg(list(overrides))).lora.lr

    for preset in ("qwen2_5_7b", "llama3_1_8b"):  # the seed's 7-8B recipe
        assert lr(f"base_model={preset}") == 1.5e-4
        assert lr(f"base_model={preset}", "lora=qlora") == 1.5e-4
    small = OmegaConf.to_object(compose_cfg(["base_model=smollm2_135m"]))
    assert small.lora.lr == small.base_model.lora_lr
    assert lr("base_model=smollm2_135m", "lora.lr=3e-4") == 3e-4  # an explicit lora.lr wins
    assert lr("base_model=smollm2_135m", "base_model.lora_lr=2e-3") == 2e-3


def test_unknown_key_is_rejected(compose_cfg):
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'lora\.rank'") as exc:
        compose_cfg(["lora.rank=8"])
    assert "Key 'rank' not in 'LoraConfig'" in str(exc.value.__cause__)


def test_wrong_type_is_rejected(compose_cfg):
    with pytest.raises(ConfigCompositionException) as exc:
        compose_cfg(["lora.r=sixteen"])
    assert "could not be converted to Integer" in str(exc.value.__cause__)


def test_wrong_type_in_a_yaml_file_names_file_and_key(compose_cfg, tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "lora" / "broken.yaml").write_text("r: sixteen\nalpha: 32\n")
    with pytest.raises((ConfigCompositionException, ValidationError)) as exc:
        compose_cfg(["lora=broken"], conf_dir=conf)
    text = f"{exc.value} {exc.value.__cause__}"
    assert "lora/broken" in text and "lora.r" in text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.dropout=1.5", "lora.dropout must be in [0, 1)"),
        ("lora.targets=[attn,ffn]", "lora.targets must be a non-empty subset"),
        ("lora.r=0", "lora.r and lora.alpha must be positive"),
        ("base_model.dtype=int8", "is not one of float32"),
        ("lora.scheduler=linear", "lora.scheduler must be cosine or constant"),
        ("lora.val_fraction=1.0", "lora.val_fraction must be in (0, 1)"),
        ("train.version=latest", "train.version must look like 1.2.3"),
        ("pipeline.steps=[synth,deploy]", "pipeline.steps must be a non-empty subset"),
        ("trainer.checkpoint_every_n_steps=0", "must be positive"),
        ("eval.batch_size=0", "eval.max_new_tokens and eval.batch_size must be positive"),
        ("base_model.lora_lr=0", "base_model.lora_lr must be positive"),
        ("synth.near_miss_per_refusal=-1", "synth.near_miss_per_refusal must be >= 0"),
        ("serve.max_batch=0", "serve.max_batch must be >= 1"),
        ("serve.max_queue=0", "serve.max_queue must be >= 1"),
        ("serve.batch_wait_ms=-1", "serve.batch_wait_ms must be in 0..1000"),
    ],
)
def test_post_init_rejects_contradictions(compose_cfg, override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        OmegaConf.to_object(compose_cfg([override]))


def test_lint_files_accepts_a_single_glob(compose_cfg):
    obj = OmegaConf.to_object(compose_cfg(["stage=lint", "lint.files=personas/*.yaml"]))
    assert obj.lint.files == ["personas/*.yaml"]


def test_run_dir_is_per_stage_timestamp_and_sha(compose_cfg):
    cfg = compose_cfg(["stage=lint"], return_hydra_config=True)
    run_dir = cfg.hydra.run.dir
    assert "/outputs/lint/" in run_dir
    stamp_sha = run_dir.rsplit("/", 1)[1]
    date, sha = stamp_sha.rsplit("_", 1)
    assert len(date) == len("2026-01-01_00-00-00-000000")
    assert sha == "nogit" or len(sha) >= 7


@pytest.mark.parametrize(
    ("overrides", "source"),
    [
        ([], "bank"),  # the bundled 135M teacher cannot write instructions (DECISIONS.md)
        (["teacher=openai", "teacher.base_url=http://127.0.0.1:1/v1", "teacher.model=m"], "teacher"),
        (
            ["teacher=openai", "teacher.base_url=http://127.0.0.1:1/v1", "teacher.model=m", "synth.instructions=mixed"],
            "mixed",
        ),
        (["synth.instructions=teacher"], "teacher"),
    ],
)
def test_instruction_source_follows_the_teacher_unless_set(compose_cfg, overrides, source):
    from selfalign.stages.synth import instruction_source

    assert instruction_source(OmegaConf.to_object(compose_cfg(["stage=synth", *overrides]))).value == source


def test_an_unknown_instruction_source_is_refused(compose_cfg):
    with pytest.raises(ConfigCompositionException) as exc:
        compose_cfg(["stage=synth", "synth.instructions=llm"])
    text = f"{exc.value} {exc.value.__cause__}"
    assert "synth.instructions" in text and "expected one of [bank, teacher, mixed]" in text


def test_each_default_has_one_source_the_yaml_presets():
    """A field every preset of a group sets has no dataclass default (MISSING); a field only some presets set may
    default to None and nothing else: a dataclass that restated a preset's value could only drift from it."""
    import dataclasses

    from selfalign.config import CONF_DIR, _dataclass_of, _fields

    hints = _fields(SelfAlignConfig)
    checked = 0
    for folder in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "hparams_search")):
        cls = _dataclass_of(hints[folder.name])
        presets = [OmegaConf.load(p) for p in sorted(folder.glob("*.yaml"))]
        presets = [p.get("stage", p) if folder.name == "stage" else p for p in presets]
        keys = [set(p) - {"defaults"} for p in presets if set(p) - {"defaults"}]
        for f in dataclasses.fields(cls):
            setters = sum(f.name in k for k in keys)
            if not setters:
                continue
            checked += 1
            default = None if f.default_factory is not dataclasses.MISSING else f.default
            if setters == len(keys):
                assert default == "???", (folder.name, f.name, default)
            else:
                assert default in ("???", None), (folder.name, f.name, default)
    assert checked > 60
