"""`stage=synth`: persona -> filtered SFT JSONL (`synth.out`), `synth_report.json` + PNG, an MLflow run."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from selfalign import __version__
from selfalign.config import InstructionSource, SelfAlignConfig, TeacherKind
from selfalign.dataops.report import build_report, plot_report
from selfalign.dataops.synth import RunFiles, synthesize
from selfalign.errors import SelfAlignError
from selfalign.eval.golden import load_golden, load_policy
from selfalign.persona.schema import load_persona
from selfalign.tracking import tracked_run
from selfalign.utils.console import console
from selfalign.utils.hashing import sha256_file, sha256_json
from selfalign.utils.io import read_json, write_json
from selfalign.utils.logging import EventLog

# What makes two synth runs the same dataset (with the seed); a resumed run must match it.
HASHED_SETTINGS = (
    "n",
    "chunk_size",
    "max_chars",
    "style_tau",
    "dedup_threshold",
    "tox_max",
    "max_chunks",
    "near_miss_per_refusal",
    "instructions",
)


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def check_existing(out: Path, persona_id: str, config_hash: str, overwrite: bool) -> dict | None:
    """The finished dataset's meta when `out` already holds this exact run; refuse another persona's file."""
    files = RunFiles(out)
    if out.exists():
        meta = read_json(meta_path(out)) if meta_path(out).exists() else {}
        if meta.get("config_hash") == config_hash and meta.get("sha256") == sha256_file(out):
            return meta
        if not overwrite:
            owner = meta.get("persona_id", "an unknown persona")
            raise SelfAlignError(
                f"synth.out={out} already holds a dataset of {owner} made with another config; "
                "pass synth.overwrite=true to replace it, or choose another synth.out"
            )
    if files.state.exists() and not overwrite:
        state = read_json(files.state)
        if state.get("config_hash") != config_hash:
            raise SelfAlignError(
                f"{files.partial} is an unfinished synth run with another config; "
                "pass synth.overwrite=true to discard it, or choose another synth.out"
            )
    return None


def instruction_source(cfg: SelfAlignConfig) -> InstructionSource:
    """`synth.instructions`, or its default for the teacher: an endpoint writes its own, a local model uses the bank."""
    if cfg.synth.instructions is not None:
        return cfg.synth.instructions
    return InstructionSource.teacher if cfg.teacher.kind is TeacherKind.openai else InstructionSource.bank


def run(cfg: SelfAlignConfig) -> dict:
    from selfalign.dataops.teacher import build_teacher

    persona, persona_hash = load_persona(cfg.persona.path)
    s = cfg.synth
    out = Path(s.out).resolve()
    golden_path = Path(cfg.eval.golden)  # the frozen sets the eval scores on: kept out of the training data
    golden = [r["prompt"] for r in load_golden(golden_path)]
    policy_path = Path(cfg.eval.policy) if cfg.eval.policy else None
    golden += [r["prompt"] for r in load_policy(policy_path)] if policy_path else []
    s = replace(s, instructions=instruction_source(cfg))
    teacher_id = cfg.teacher.model or cfg.base_model.name
    config_hash = sha256_json(
        {
            "persona_hash": persona_hash,
            "settings": {name: getattr(s, name) for name in HASHED_SETTINGS} | {"seed": cfg.seed},
            "teacher": asdict(cfg.teacher) | {"model": teacher_id},
            "golden": sha256_file(golden_path),
            "policy": sha256_file(policy_path) if policy_path else None,
            "bank": sha256_file(Path(__file__).parents[1] / "dataops" / "bank.yaml"),
            "selfalign_version": __version__,
        }
    )
    events = EventLog(cfg.paths.run_dir)
    done = check_existing(out, persona["id"], config_hash, s.overwrite)
    if done:
        console.print(f"[green]synth:[/] {out} is already complete for this config ({done['rows']} rows); skipped")
        events.event("synth_skip", out=str(out), sha256=done["sha256"])
        return {"passed": True, "skipped": True, **done}

    tags = {
        "stage": "synth",
        "persona_id": persona["id"],
        "persona_hash": persona_hash,
        "base_model": cfg.base_model.name,
        "run_dir": cfg.paths.run_dir,
    }
    params = {"synth": asdict(cfg.synth), "seed": cfg.seed, "teacher": asdict(cfg.teacher), "persona": cfg.persona.name}
    with tracked_run(cfg.tracking, run_name=f"synth-{persona['id']}", tags=tags, params=params) as tracker:
        teacher = build_teacher(cfg)
        start = time.perf_counter()
        columns = (
            TextColumn("[bold]synth {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.1f} rows/min"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task(persona["id"], total=s.n, rate=0.0)

            def on_chunk(status: dict) -> None:
                minutes = (time.perf_counter() - start) / 60
                progress.update(bar, completed=min(status["rows"], s.n), rate=status["rows"] / max(minutes, 1e-9))
                events.event("synth_chunk", **status)
                tracker.metrics({"rows": status["rows"], "raw_rows": status["raw"]}, step=status["chunk"])

            result = synthesize(persona, teacher, s, out, config_hash, golden, on_chunk, seed=cfg.seed)
        minutes = (time.perf_counter() - start) / 60
        report = build_report(result["rows"], result["drops"], result["raw"])
        report.update(
            dataset=str(out),
            sha256=sha256_file(out),
            persona_id=persona["id"],
            persona_hash=persona_hash,
            config_hash=config_hash,
            teacher=teacher.name,
            seed=cfg.seed,
            chunks=result["chunks"],
            minutes=round(minutes, 2),
            rows_per_minute=round(len(result["rows"]) / max(minutes, 1e-9), 2),
            instructions=result["instructions"],
        )
        run_dir = Path(cfg.paths.run_dir)
        write_json(report, run_dir / "synth_report.json")
        plot_report(report, run_dir / "synth_report.png", f"{persona['id']}: {report['rows']} rows")
        meta = {k: report[k] for k in ("persona_id", "persona_hash", "config_hash", "sha256", "rows")}
        write_json(meta, meta_path(out))
        tracker.metrics(
            {
                k: report[k]
                for k in (
                    "rows",
                    "acceptance_rate",
                    "hard_filter_rejection_rate",
                    "refusal_fraction",
                    "style_score_mean",
                    "rows_per_minute",
                )
            }
        )
        tracker.tags({"dataset_sha256": report["sha256"]})
        for path in (run_dir / "synth_report.json", run_dir / "synth_report.png", out, meta_path(out)):
            tracker.artifact(path)
    events.event(
        "synth_done", rows=report["rows"], sha256=report["sha256"], refusal_fraction=report["refusal_fraction"]
    )
    console.print(
        f"[green]synth:[/] {report['rows']} rows -> {out}\n"
        f"  accepted {report['acceptance_rate']:.1%} of {report['raw_rows']} raw rows, "
        f"refusal fraction {report['refusal_fraction']:.1%} (band {persona['refusal_policy']['band']}), "
        f"{report['rows_per_minute']:.1f} rows/min, sha256 {report['sha256'][:16]}"
    )
    return {"passed": True, **meta}
