"""`stage=pipeline`: synth -> train (registers) -> eval (gates, champion alias) for one persona, one MLflow parent.

Each step is the stage of the same name, run in this process with its own run dir
(`<run dir>/<step>/`) and its own MLflow run nested under the pipeline's parent run. A step whose output
already exists for the same config (by hash) is skipped unless `pipeline.force=true`. Both example
personas: `python -m selfalign -m stage=pipeline persona=neutral_concise,socratic_skeptical`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rich.table import Table

from selfalign.config import SelfAlignConfig, StageConfig, git_short_sha
from selfalign.persona.schema import load_persona
from selfalign.tracking import parent_run
from selfalign.utils.console import console
from selfalign.utils.hashing import sha256_json
from selfalign.utils.io import write_json
from selfalign.utils.logging import EventLog


def step_config(cfg: SelfAlignConfig, step: str, **changes) -> SelfAlignConfig:
    """`cfg` as the given stage sees it: its own run dir under the pipeline's, plus the pipeline's sizes."""
    run_dir = Path(cfg.paths.run_dir) / step
    return replace(cfg, stage=StageConfig(step), paths=replace(cfg.paths, run_dir=str(run_dir)), **changes)


def milestone_row(
    persona: dict, synth: dict | None, train: dict | None, report: dict | None, attach_max_ms: float
) -> dict:
    """One adapter's line of the milestone table, with the hashes that make a rerun checkable."""
    row = {"persona_id": persona["id"], "band": persona["refusal_policy"]["band"]}
    if synth:
        row["dataset_sha256"] = synth.get("sha256")
        row["rows"] = synth.get("rows")
    if train:
        row |= {"adapter_dir": train["adapter_dir"], "adapter_sha256": train["adapter_sha256"]}
        row |= {"val_loss": train["val_loss"], "registry_version": train.get("registry_version")}
    if report and report["adapters"]:
        entry = report["adapters"][0]
        gates = entry["gates"]
        row |= {
            "style_base": entry["base_metrics"]["style"]["score"],
            "style_adapter": entry["metrics"]["style"]["score"],
            "style_delta": gates["style_delta"]["value"],
            "style_structure": entry["metrics"]["style"]["structure"],
            "refusal_rate": gates["refusal_band"]["value"],
            "tox_p95": gates["tox_p95"]["value"],
            "neutrality_delta": entry["metrics"]["neutrality"]["mean"] - entry["base_metrics"]["neutrality"]["mean"],
            "attach_ms": entry["attach_ms"],
            "gates": {k: v["passed"] for k, v in gates.items() if k != "passed"},
            "champion": entry.get("champion", False),
        }
        row["gates"]["attach"] = entry["attach_ms"] is not None and entry["attach_ms"] < attach_max_ms
        row["passed"] = gates["passed"] and row["gates"]["attach"]
        row["metrics_sha256"] = sha256_json({"adapter": entry["metrics"], "base": entry["base_metrics"]})
    return row


def run(cfg: SelfAlignConfig) -> dict:
    from selfalign.stages import eval as eval_stage
    from selfalign.stages import synth, train

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
            s = step_config(cfg, "synth", synth=replace(cfg.synth, n=p.synth_n, overwrite=p.force))
            results["synth"] = synth.run(s)
            data = s.synth.out
        if "train" in p.steps:
            console.rule(f"[bold]pipeline {persona['id']}: train")
            t = step_config(
                cfg,
                "train",
                data=data,
                trainer=replace(cfg.trainer, max_epochs=p.max_epochs),
                # one adapter per persona and config: a sweep over personas keeps plain versions
                train=replace(cfg.train, overwrite=p.force, suffix_sweep_jobs=False),
            )
            results["train"] = train.run(t)
        if "eval" in p.steps:
            console.rule(f"[bold]pipeline {persona['id']}: eval")
            adapter = results["train"]["adapter_dir"] if results["train"] else cfg.adapter
            e = step_config(
                cfg,
                "eval",
                adapter=adapter,
                adapters=[],
                eval=replace(cfg.eval, max_new_tokens=p.eval_max_new_tokens, overwrite=p.force),
            )
            results["eval"] = eval_stage.run(e)
        report = results["eval"]["eval"] if results["eval"] else None
        row = milestone_row(persona, results["synth"], results["train"], report, p.attach_max_ms)
        summary.update({k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    write_json({"milestone": row, "steps": results}, Path(cfg.paths.run_dir) / "pipeline_summary.json")
    events.event("pipeline_done", **{k: v for k, v in row.items() if k != "gates"})
    print_milestone([row])
    return {"passed": row.get("passed", True), "milestone": row}


def print_milestone(rows: list[dict]) -> None:
    """The milestone table: per adapter, style Δ vs base, refusal vs band, toxicity p95, attach time, verdict."""
    table = Table(title="SelfAlign milestone")
    for col in ("adapter", "style Δ (base → adapter)", "refusal (band)", "tox p95", "attach", "result"):
        table.add_column(col, justify="left" if col in ("adapter", "result") else "right")

    def mark(row: dict, gate: str) -> str:
        return "[green]✓[/]" if row["gates"][gate] else "[red]✗[/]"

    for r in rows:
        if "gates" not in r:
            table.add_row(r["persona_id"], "-", "-", "-", "-", "not evaluated")
            continue
        table.add_row(
            f"{r['persona_id']} v{r.get('registry_version') or '-'}",
            f"{r['style_delta']:+.3f} ({r['style_base']:.3f} → {r['style_adapter']:.3f}) {mark(r, 'style_delta')}",
            f"{r['refusal_rate']:.2f} [{r['band'][0]:.2f}, {r['band'][1]:.2f}] {mark(r, 'refusal_band')}",
            f"{r['tox_p95']:.3f} {mark(r, 'tox_p95')}",
            f"{r['attach_ms']:.0f} ms {mark(r, 'attach')}",
            "[green]pass[/]" if r["passed"] else "[red]fail[/]",
        )
    console.print(table)
