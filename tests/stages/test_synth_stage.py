"""`stage=synth` end to end through the CLI: dataset, report, MLflow run, resume after a kill, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from selfalign.utils.hashing import sha256_file
from tests.conftest import kill_after_chunks, run_dirs

FAST = ["stage=synth", "teacher.model=tiny_llama", "synth.chunk_size=8", "synth.style_tau=-1"]


def tracking(tmp_path):
    return [
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
        f"tracking.artifact_location={tmp_path}/mlruns/artifacts",
    ]


def test_synth_writes_dataset_report_and_mlflow_run(cli, tmp_path):
    out = tmp_path / "data" / "concise.jsonl"
    proc = cli(*FAST, "persona=neutral_concise", "synth.n=24", f"synth.out={out}", *tracking(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) >= 24
    assert [r["id"] for r in rows] == [f"sft-{i:06d}" for i in range(1, len(rows) + 1)]
    assert {tuple(sorted(r)) for r in rows} == {("id", "input", "instruction", "metadata", "output", "persona_id")}
    assert {r["persona_id"] for r in rows} == {"neutral-concise"}
    meta = rows[0]["metadata"]
    assert set(meta) >= {"values_vector", "style_tags", "safety_tags", "source", "quality_scores"}
    assert meta["source"] == "synthetic-v1:local:tiny-llama"

    import datasets

    loaded = datasets.load_dataset("json", data_files=str(out), split="train")
    assert loaded.num_rows == len(rows) and loaded[0]["output"] == rows[0]["output"]

    (run_dir,) = run_dirs(tmp_path, "synth")
    report = json.loads((run_dir / "synth_report.json").read_text())
    assert report["rows"] == len(rows) and report["sha256"] == sha256_file(out)
    assert report["persona_id"] == "neutral-concise" and len(report["persona_hash"]) == 64
    refusals = sum(r["metadata"]["safety_tags"][0].startswith("redline") for r in rows)
    assert report["refusal_fraction"] == round(refusals / len(rows), 4)
    assert 0.08 <= report["refusal_fraction"] <= 0.18  # the persona's band
    tags = Counter(t for r in rows for t in r["metadata"]["safety_tags"] if t.startswith(("redline:", "near-miss:")))
    assert report["policy_rows"] == dict(sorted(tags.items())) and sum(tags.values()) >= refusals
    assert set(report["histograms"]) == {"length_words", "style_score", "refusal"}
    assert sum(report["histograms"]["length_words"]["counts"]) == len(rows)
    assert report["raw_rows"] >= len(rows) and 0 < report["acceptance_rate"] <= 1
    assert (run_dir / "synth_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = [json.loads(x)["event"] for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert "synth_chunk" in events and events[-2:] == ["synth_done", "run_end"]

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["selfalign"], output_format="list")
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "synth" and run.data.tags["dataset_sha256"] == report["sha256"]
    assert run.data.params["synth.n"] == "24" and run.data.metrics["rows"] == len(rows)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"synth_report.json", "synth_report.png", "concise.jsonl"} <= artifacts

    # the same config again: nothing to do
    again = cli(*FAST, "persona=neutral_concise", "synth.n=24", f"synth.out={out}", "tracking=none")
    assert again.returncode == 0 and "already complete for this config" in again.stdout
    # another persona into the same file: refused with one line
    other = cli(*FAST, "persona=socratic_skeptical", "synth.n=24", f"synth.out={out}", "tracking=none")
    assert other.returncode == 2
    assert f"synth.out={out} already holds a dataset of neutral-concise" in other.stderr
    assert "Traceback" not in other.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["synth.n=0"], "synth.n must be positive (got 0)"),
        (["persona.path=/nonexistent/persona.yaml"], "/nonexistent/persona.yaml: <file>: file not found"),
        (
            [
                "teacher=openai",
                "teacher.base_url=http://127.0.0.1:9/v1",
                "teacher.model=m",
                "teacher.max_retries=1",
                "synth.n=4",
            ],
            "unreachable after 2 tries",
        ),
    ],
)
def test_bad_input_is_one_line(cli, tmp_path, args, message):
    proc = cli(*FAST, "tracking=none", f"synth.out={tmp_path}/x.jsonl", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_killed_run_resumes_to_the_same_dataset(tmp_path):
    def command(out):
        return [
            sys.executable,
            "-m",
            "selfalign",
            *FAST,
            "persona=socratic_skeptical",
            "synth.n=40",
            f"synth.out={out}",
            "tracking=none",
            f"paths.output_dir={tmp_path}/outputs",
        ]

    reference = tmp_path / "reference.jsonl"
    assert subprocess.run(command(reference), capture_output=True, timeout=600).returncode == 0

    out = tmp_path / "killed.jsonl"
    state = out.with_name(out.name + ".state.json")
    kill_after_chunks(command(out), state)
    assert not out.exists() and out.with_name(out.name + ".partial").exists()
    with open(out.with_name(out.name + ".partial"), "a") as fh:
        fh.write('{"id": "torn half-line')  # what a kill in the middle of a write leaves
    resumed = subprocess.run(command(out), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert sha256_file(out) == sha256_file(reference)
    assert not state.exists()


@pytest.mark.slow
def test_synth_on_the_bundled_teacher_enacts_the_structure(cli, tmp_path):
    out = tmp_path / "concise.jsonl"
    proc = cli(
        "stage=synth",
        "persona=neutral_concise",
        "synth.n=6",
        "synth.chunk_size=8",
        f"synth.out={out}",
        "tracking=none",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    answered = [r for r in rows if not r["metadata"]["safety_tags"][0].startswith("redline")]
    assert answered, rows
    for r in answered:
        lines = r["output"].split("\n")
        assert len(lines) == 2 and lines[0].startswith("Answer: ") and lines[1].startswith("Note: "), r["output"]
        assert r["metadata"]["source"] == "synthetic-v1:local:smollm2-135m-instruct"
        assert -1.0 <= r["metadata"]["quality_scores"]["style"] <= 1.0  # scored, though the default keeps every row
