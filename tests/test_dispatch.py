"""The stage table and conf/stage/*.yaml name the same stages, and each stage has run(cfg)."""

import importlib

import yaml

from selfalign.config import CONF_DIR
from selfalign.stages import STAGES, get_stage


def test_table_matches_stage_configs():
    files = {p.stem: yaml.safe_load(p.read_text()) for p in (CONF_DIR / "stage").glob("*.yaml")}
    assert set(files) == set(STAGES)
    for stem, body in files.items():
        body = body.get("stage", body)  # a `# @package _global_` stage file (pipeline: it picks its sizes) nests them
        assert body["name"] == stem, f"conf/stage/{stem}.yaml names itself {body['name']!r}"
        assert body["description"]


def test_every_stage_module_has_run():
    for name, module in STAGES.items():
        assert callable(importlib.import_module(module).run), name
        assert get_stage(name) is importlib.import_module(module).run


def test_unknown_stage_is_a_user_error():
    import pytest

    from selfalign.errors import SelfAlignError

    with pytest.raises(
        SelfAlignError,
        match="choose one of: demo, doctor, eval, infer, lint, pipeline, prefer, serve, swap, synth, train, ui",
    ):
        get_stage("train-everything")
