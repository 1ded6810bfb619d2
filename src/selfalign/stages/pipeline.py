"""`stage=pipeline`: synth -> train (registers) -> eval (gates, champion alias) for one persona, one MLflow parent.

Each step is the stage of the same name, run in this process with its own run dir
(`<run dir>/<step>/`) and its own MLflow run nested under the pipeline's parent run. A step whose output
already exists for the same config (by hash) is skipped unless `pipeline.force=true`. Both example
personas: `python -m selfalign -m stage=pipeline persona=neutral_concise,socratic_skeptical`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from selfalign.config import SelfAlignConfig, StageConfig, git_short_sha
from selfalign.eval.milestone import milestone_row, print_milestone
from selfalign.eval.report import EvalReport
from selfalign.persona.schema import load_persona
from selfalign.tracking import parent_run
from selfalign.utils.console import console
from selfalign.utils.io import write_json
from selfalign.utils.logging import EventLog


def step_config(cfg: SelfAlignConfig, step: str, **changes) -> SelfAlignConfig:
    """`cfg` as the given stage sees it: its own run dir under the pipeline's."""
    run_dir = Path(cfg.paths.run_dir) / step
    return replace(cfg, stage=StageConfig(step), paths=replace(cfg.paths, run_dir=str(run_dir)), **changes)


def run(cfg: SelfAlignConfig) -> dict:
    from selfalign.stages import get_stage

    p = cfg.pipeline
    persona, persona_hash = load_persona(cfg.persona.path)
    events = EventLog(cfg.paths.run_dir)
    tags = {"stage": "pipeline", "persona_id": persona["id"], "persona_hash": persona_hash}
    tags |= {"git_sha": git_short_sha(), "run_dir": cfg.paths.run_dir, "kind": "pipeline"}
    results: dict[str, dict | None] = {"synth": None, "train": None, "eval": None}
    with parent_run(cfg.tracking, f"pipeline-{persona['id']}", tags) as summary:
        data = cfg.data
        if "synth" in p.steps:
            console.rule(f"[bold]pipeline {persona['id']}: synth")
            s = step_config(cfg, "synth", synth=replace(cfg.synth, overwrite=p.force))
            results["synth"] = get_stage("synth")(s)
            data = s.synth.out
        if "train" in p.steps:
            console.rule(f"[bold]pipeline {persona['id']}: train")
            t = step_config(
                cfg,
                "train",
                data=data,
                # one adapter per persona and config: a sweep over personas keeps plain versions
                train=replace(cfg.train, overwrite=p.force, suffix_sweep_jobs=False),
            )
            results["train"] = get_stage("train")(t)
        if "eval" in p.steps:
            console.rule(f"[bold]pipeline {persona['id']}: eval")
            adapter = results["train"]["adapter_dir"] if results["train"] else cfg.adapter
            e = step_config(
                cfg,
                "eval",
                adapter=adapter,
                adapters=[],
                eval=replace(cfg.eval, overwrite=p.force),
            )
            results["eval"] = get_stage("eval")(e)
        report = EvalReport.from_json(results["eval"]["eval"]) if results["eval"] else None
        row = milestone_row(persona, results["synth"], results["train"], report, p.attach_max_ms)
        summary.update({k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    write_json({"milestone": row, "steps": results}, Path(cfg.paths.run_dir) / "pipeline_summary.json")
    events.event("pipeline_done", **{k: v for k, v in row.items() if k != "gates"})
    print_milestone([row])
    return {"passed": row.get("passed", True), "milestone": row}
