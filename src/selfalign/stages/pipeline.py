"""`stage=pipeline`: synth -> train -> prefer (each registers) -> eval (gates, champion alias) for one persona, one
MLflow parent; `pipeline.steps` picks which of them run, and eval takes the last adapter produced.

Each step is the stage of the same name, run in this process with its own run dir
(`<run dir>/<step>/`) and its own MLflow run nested under the pipeline's parent run. A step whose output
already exists for the same config (by hash) is skipped unless `pipeline.force=true`. Both example
personas: `python -m selfalign -m stage=pipeline persona=neutral_concise,socratic_skeptical`.
"""

from __future__ import annotations

from collections.abc import Callable
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


def last_adapter(results: dict[str, dict | None]) -> str | None:
    """The adapter the latest training step produced (preference after SFT), or None when no step trained one."""
    done = [r for r in results.values() if r and "adapter_dir" in r]
    return done[-1]["adapter_dir"] if done else None


# Each step: how the pipeline's config becomes that stage's, given the results of the steps before it (in order).
STEPS: dict[str, Callable[[SelfAlignConfig, dict], SelfAlignConfig]] = {
    "synth": lambda cfg, done: step_config(cfg, "synth", synth=replace(cfg.synth, overwrite=cfg.pipeline.force)),
    "train": lambda cfg, done: step_config(
        cfg,
        "train",
        data=cfg.synth.out if done.get("synth") else cfg.data,
        # one adapter per persona and config: a sweep over personas keeps plain versions
        train=replace(cfg.train, overwrite=cfg.pipeline.force, suffix_sweep_jobs=False),
    ),
    "prefer": lambda cfg, done: step_config(
        cfg,
        "prefer",
        prefer=replace(
            cfg.prefer,
            overwrite=cfg.pipeline.force,
            sft_adapter=done["train"]["adapter_dir"] if done.get("train") else cfg.prefer.sft_adapter,
        ),
        train=replace(cfg.train, suffix_sweep_jobs=False),
    ),
    "eval": lambda cfg, done: step_config(
        cfg,
        "eval",
        adapter=last_adapter(done) or cfg.adapter,
        adapters=[],
        eval=replace(cfg.eval, overwrite=cfg.pipeline.force),
    ),
}


def run(cfg: SelfAlignConfig) -> dict:
    from selfalign.stages import get_stage

    persona, persona_hash = load_persona(cfg.persona.path)
    events = EventLog(cfg.paths.run_dir)
    tags = {"stage": "pipeline", "persona_id": persona["id"], "persona_hash": persona_hash}
    tags |= {"git_sha": git_short_sha(), "run_dir": cfg.paths.run_dir, "kind": "pipeline"}
    results: dict[str, dict | None] = dict.fromkeys(STEPS)
    with parent_run(cfg.tracking, f"pipeline-{persona['id']}", tags) as summary:
        for step in [s for s in STEPS if s in cfg.pipeline.steps]:
            console.rule(f"[bold]pipeline {persona['id']}: {step}")
            results[step] = get_stage(step)(STEPS[step](cfg, results))
        report = EvalReport.from_json(results["eval"]["eval"]) if results["eval"] else None
        trained = results["prefer"] or results["train"]
        row = milestone_row(persona, results["synth"], trained, report, cfg.pipeline.attach_max_ms)
        summary.update({k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    write_json({"milestone": row, "steps": results}, Path(cfg.paths.run_dir) / "pipeline_summary.json")
    events.event("pipeline_done", **{k: v for k, v in row.items() if k != "gates"})
    print_milestone([row])
    return {"passed": row.get("passed", True), "milestone": row}
