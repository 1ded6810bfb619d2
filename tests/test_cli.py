"""The real CLI in a subprocess: exit codes, one-line errors, and the files every run leaves."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from selfalign.app import to_typed
from selfalign.errors import SelfAlignError
from tests.conftest import GOLDEN, PERSONAS, run_dirs


def test_lint_passes_and_run_dir_holds_the_run_files(cli, tmp_path):
    proc = cli("stage=lint")
    assert proc.returncode == 0, proc.stderr
    assert "3/3 persona file(s) passed" in proc.stdout
    for name in ("neutral_concise.yaml", "socratic_skeptical.yaml", "pragmatic_mentor.yaml"):
        assert name in proc.stdout
    (run_dir,) = run_dirs(tmp_path, "lint")
    names = {p.name for p in run_dir.iterdir()}
    assert {"config_snapshot.yaml", "env.json", "events.jsonl", "lint_report.json", "selfalign.log"} <= names
    snapshot = (run_dir / "config_snapshot.yaml").read_text()
    assert "${" not in snapshot and yaml.safe_load(snapshot)["stage"]["name"] == "lint"
    env = json.loads((run_dir / "env.json").read_text())
    assert env["packages"]["torch"].startswith("2.13.0") and env["cpu_count"] >= 1
    assert env["python"].startswith("3.")
    # lint never imports torch, so env.json records its installed version only (importing it costs 2.5 s)
    assert env["torch"] == {
        "version": env["packages"]["torch"],
        "cuda_available": None,
        "cuda_version": None,
        "gpus": None,
    }
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["run_start", "lint", "run_end"]
    assert events[1]["files"] == 3 and events[1]["failed"] == 0
    report = json.loads((run_dir / "lint_report.json").read_text())
    assert report["passed"] is True and len(report["files"]) == 3


def test_two_runs_get_two_dirs(cli, tmp_path):
    assert cli("stage=lint").returncode == 0
    assert cli("stage=lint").returncode == 0
    assert len(run_dirs(tmp_path, "lint")) == 2


def test_lint_failure_exits_1_with_every_issue(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load((PERSONAS / "neutral_concise.yaml").read_text())
    data["values"]["candor"] = 3
    data["style"]["verbosity"] = "tiny"
    bad.write_text(yaml.safe_dump(data))
    proc = cli("stage=lint", f"lint.files=[{PERSONAS / 'neutral_concise.yaml'},{bad}]")
    assert proc.returncode == 1
    assert "values.candor" in proc.stdout and "3 is outside [0, 1]" in proc.stdout
    assert "'tiny' is not one of short, medium, long" in proc.stdout
    assert "1/2 persona file(s) passed" in proc.stdout


def test_lint_glob_and_relative_paths_follow_cwd(cli, tmp_path):
    shutil.copytree(PERSONAS, tmp_path / "mine")
    proc = cli("stage=lint", "lint.files=mine/*.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mine/socratic_skeptical.yaml" in proc.stdout
    proc = cli("stage=lint", "lint.files=nothing/*.yaml", cwd=tmp_path)
    assert proc.returncode == 1 and "no file matches this pattern" in proc.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["stage=lint", "lora.r=abc"], "full_key: lora.r"),
        (["stage=nope"], "Could not find 'stage/nope'"),
        (["persona=nobody", "stage=lint"], "Could not find 'persona/nobody'"),
    ],
)
def test_config_errors_exit_nonzero_without_traceback(cli, args, expected):
    proc = cli(*args)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("override", ["foo=1", "+foo.bar=1", "lora.rr=8", "+lora.rr=8", "++lora.rr=8"])
def test_an_undeclared_key_fails_with_one_line_whether_or_not_appended(cli, override):
    key = override.lstrip("+").split("=")[0].removesuffix(".bar")
    proc = cli("stage=lint", override)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: config {key}: not a setting SelfAlign declares (check the spelling; a leading + does not add one)"
    ]


def test_ui_refuses_a_public_host_unless_said_explicitly(cli, compose_cfg):
    proc = cli("stage=ui", "ui.host=0.0.0.0")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "ui.host=0.0.0.0 is reachable from other machines" in proc.stderr and "ui.allow_remote=true" in proc.stderr
    typed = to_typed(compose_cfg(["stage=ui", "ui.host=0.0.0.0", "ui.allow_remote=true"]))
    assert typed.ui.host == "0.0.0.0" and typed.ui.allow_remote
    assert to_typed(compose_cfg(["stage=ui", "ui.host=localhost"])).ui.host == "localhost"


def test_undeclared_keys_are_caught_after_composition_too(compose_cfg):
    """The same check on the composed config, where a key could also come from a config file."""
    with pytest.raises(SelfAlignError, match=r"config lora\.rr: not a setting"):
        to_typed(compose_cfg(["stage=lint", "+lora.rr=8"]))
    with pytest.raises(SelfAlignError, match=r"config foo: not a setting"):
        to_typed(compose_cfg(["stage=lint", "+foo.bar=1"]))
    typed = to_typed(compose_cfg(["stage=lint", "+trainer.extra.limit_val_batches=2", "lora.r=4"]))
    assert typed.trainer.extra == {"limit_val_batches": 2} and typed.lora.r == 4  # free-form and declared keys


def test_user_error_is_one_line_exit_2_and_debug_shows_traceback(cli):
    proc = cli("stage=lint", "lora.dropout=2")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config lora.dropout must be in [0, 1) (got 2.0)"
    proc = cli("stage=lint", "lora.dropout=2", "debug=true")
    assert proc.returncode == 2  # the traceback is shown, the exit code still says "your mistake"
    assert "Traceback" in proc.stderr and "SelfAlignError" in proc.stderr
    assert proc.stderr.strip().endswith("error: config lora.dropout must be in [0, 1) (got 2.0)")


def test_help_names_selfalign_the_quickstart_every_stage_and_the_groups(cli):
    from selfalign.stages import STAGES

    proc = cli("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("SelfAlign: a written persona in") and "powered by Hydra" not in proc.stdout
    assert "make all" in proc.stdout and "stage=pipeline persona=neutral_concise,socratic_skeptical" in proc.stdout
    lines = proc.stdout.splitlines()
    for name in STAGES:
        described = [line for line in lines if line.startswith(f"  {name} ")]
        assert len(described) == 1 and len(described[0].split(None, 1)[1]) > 20, name
    for group in ("persona:", "base_model:", "lora:", "stage:", "trainer:", "teacher:", "tracking:"):
        assert group in proc.stdout


def test_console_script_is_the_same_app(tmp_path):
    import subprocess

    script = Path(sys.executable).with_name("selfalign")
    assert script.exists()
    proc = subprocess.run(
        [str(script), f"paths.output_dir={tmp_path}", "stage=lint"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "3/3 persona file(s) passed" in proc.stdout


def test_multirun_sweeps_personas(cli, tmp_path):
    proc = cli("-m", "stage=lint", "persona=neutral_concise,socratic_skeptical")
    assert proc.returncode == 0, proc.stderr
    (sweep,) = sorted((tmp_path / "outputs" / "multirun" / "lint").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    personas = {yaml.safe_load((j / "config_snapshot.yaml").read_text())["persona"]["name"] for j in jobs}
    assert personas == {"neutral_concise", "socratic_skeptical"}


def test_doctor_without_model_loads_reports_every_check(cli, tmp_path):
    proc = cli("stage=doctor", "doctor.load_models=false")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = run_dirs(tmp_path, "doctor")
    doc = json.loads((run_dir / "doctor.json").read_text())
    names = [c["name"] for c in doc["checks"]]
    assert names == [
        "python",
        "packages",
        "cpu",
        "ram",
        "disk",
        "torch",
        "base model smollm2-135m-instruct",
        "embedder all-MiniLM-L6-v2",
        "frozen sets",
    ]
    assert doc["passed"] is True and doc["env"]["ram_gb"] > 0
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in doc["checks"][6]["detail"]
    assert "golden_v0.jsonl: 100 prompts, policy_v0.jsonl: 175 prompts" in doc["checks"][8]["detail"]


def test_doctor_fails_on_a_modified_golden_set(cli, tmp_path):
    golden = tmp_path / "golden"
    golden.mkdir()
    shutil.copy(GOLDEN.with_name(GOLDEN.name + ".sha256"), golden)
    (golden / GOLDEN.name).write_text(GOLDEN.read_text().replace("Lindy", "Lindley"))
    proc = cli("stage=doctor", "doctor.load_models=false", f"paths.golden_dir={golden}")
    assert proc.returncode == 1
    doc = json.loads((run_dirs(tmp_path, "doctor")[0] / "doctor.json").read_text())
    failed = [c for c in doc["checks"] if c["status"] == "fail"]
    assert [c["name"] for c in failed] == ["frozen sets"]
    assert "is not the frozen golden_v0.jsonl" in failed[0]["detail"]


def test_doctor_fails_when_disk_floor_is_not_met(cli, tmp_path):
    proc = cli("stage=doctor", "doctor.load_models=false", "doctor.min_free_disk_gb=1e9")
    assert proc.returncode == 1
    assert "doctor: FAIL" in proc.stdout


@pytest.mark.slow
def test_doctor_loads_bundled_model_and_embedder_offline(cli, tmp_path):
    proc = cli("stage=doctor", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((run_dirs(tmp_path, "doctor")[0] / "doctor.json").read_text())
    checks = {c["name"]: c for c in doc["checks"]}
    model = checks["base model smollm2-135m-instruct"]
    assert model["status"] == "pass" and "134.5M params, chat template" in model["detail"]
    assert "generates (4 tokens)" in model["detail"]
    assert checks["embedder all-MiniLM-L6-v2"]["detail"].endswith("dim 384")


def test_readme_pipeline_presets_match_their_configs(compose_cfg):
    """The README's `pipeline` row states what the experiment configs conf/pipeline/*.yaml set, preset by preset."""
    import re

    from selfalign.config import PROJECT_ROOT

    lines = (PROJECT_ROOT / "README.md").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| `pipeline`") and "`PipelineConfig`" in line)
    stated = re.findall(r"`(\w+)` \((\d+) rows, (\d+) epochs?, (\d+) new tokens in eval\)", row)
    assert {name for name, *_ in stated} == {p.stem for p in (PROJECT_ROOT / "conf" / "pipeline").glob("*.yaml")}
    for name, rows, epochs, tokens in stated:
        cfg = compose_cfg(["stage=pipeline", f"pipeline={name}"])
        assert (cfg.synth.n, cfg.trainer.max_epochs, cfg.eval.max_new_tokens) == (int(rows), int(epochs), int(tokens))
    plain = compose_cfg(["stage=pipeline"])  # the stage picks `default` by itself; other stages keep their sizes
    assert plain.synth.n == int(dict((n, r) for n, r, *_ in stated)["default"])
    assert compose_cfg(["stage=synth"]).synth.n == 2000 and compose_cfg(["stage=pipeline", "synth.n=16"]).synth.n == 16
