"""`stage=eval`: base vs adapters on the frozen Golden 100, gates, reports, samples, MLflow, the champion alias.

`adapter=<dir>` or `'adapters=[a,b]'` (dirs under `paths.adapters_dir`) are attached to one loaded base
model and evaluated with it; each adapter is judged against the persona its manifest names
(`persona=` for the base alone). The frozen policy set (`eval.policy`) is scored too, with its goal reported
beside the gates. Exit 0 when every adapter passes every gate, 1 otherwise.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from selfalign.config import SelfAlignConfig, git_short_sha, project_relative
from selfalign.errors import SelfAlignError
from selfalign.eval.golden import CUSTOM_NOTE, load_custom_set, load_golden, load_policy
from selfalign.eval.harness import Outputs, Target, evaluate, evaluate_policy
from selfalign.eval.report import EvalReport
from selfalign.persona.schema import load_persona, personas_by_id
from selfalign.runtime.models import model_revision
from selfalign.tracking import tracked_run
from selfalign.utils.console import console
from selfalign.utils.hashing import sha256_file, sha256_json
from selfalign.utils.io import is_json_with, read_json, write_json, write_jsonl
from selfalign.utils.logging import EventLog

# What every eval report holds, of any version: the one kind of file eval replaces without `eval.overwrite=true`
# (its run's copy stays in outputs/ and in MLflow).
REPORT_KEYS = ("base_model", "adapters")


def adapter_dirs(cfg: SelfAlignConfig) -> list[str]:
    from selfalign.runtime.loader import BASE_ALIASES

    dirs = list(cfg.adapters) + ([cfg.adapter] if cfg.adapter else [])
    return [d for d in dirs if d not in BASE_ALIASES]


def run(cfg: SelfAlignConfig) -> dict:
    from selfalign.runtime.adapters import read_manifest, resolve_adapter_dir
    from selfalign.runtime.loader import attach_timed, load_base, module_name

    custom = cfg.eval.custom_set is not None
    golden_path = Path(cfg.eval.custom_set if custom else cfg.eval.golden)
    rows = load_custom_set(golden_path) if custom else load_golden(golden_path)
    golden_sha = sha256_file(golden_path)
    policy_rows = load_policy(cfg.eval.policy) if cfg.eval.policy else []
    policy_sha = sha256_file(cfg.eval.policy) if cfg.eval.policy else None
    default_persona, _ = load_persona(cfg.persona.path)
    known = personas_by_id(cfg.paths.persona_dir)
    planned = []
    for given in adapter_dirs(cfg):
        path = resolve_adapter_dir(given, cfg.paths.adapters_dir)
        manifest = read_manifest(path)
        pid = manifest["adapter_id"]
        persona = load_persona(known[pid])[0] if pid in known else default_persona
        planned.append((path, manifest, persona))

    name = "-".join(module_name(m) for _, m, _ in planned) or f"base-{cfg.base_model.name}"
    report_path = Path(cfg.eval.report or Path(cfg.paths.reports_dir) / f"{name}.json")
    config_hash = sha256_json(
        {
            "golden": golden_sha,
            "policy": policy_sha,
            "eval": asdict(cfg.eval) | {"report": None, "overwrite": None},
            "seed": cfg.seed,
            "base_model": model_revision(cfg.base_model),
            "persona": default_persona,
            "adapters": [(sha256_file(p / "adapter_model.safetensors"), persona) for p, _, persona in planned],
        }
    )
    if report_path.exists() and not cfg.eval.overwrite:
        previous = _readable(report_path)
        if previous is not None and previous.config_hash == config_hash:
            console.print(f"[green]eval:[/] {report_path} already holds this exact evaluation; skipped")
            print_table(previous)
            EventLog(cfg.paths.run_dir).event("eval_skip", report=str(report_path))
            return {"passed": previous.passed, "skipped": True, "report": str(report_path), "eval": previous.to_json()}
        if not is_json_with(report_path, REPORT_KEYS):  # an eval report of any version
            raise SelfAlignError(
                f"eval.report={report_path} exists and is not an eval report; "
                "pass eval.overwrite=true to replace it, or choose another eval.report"
            )
        console.print(f"[yellow]eval:[/] {report_path} holds another evaluation; it is replaced when this one ends")

    handle = load_base(cfg.base_model, cache_dir=cfg.paths.cache_dir, qlora=cfg.lora.qlora)
    attached = attach_timed(handle, planned, cfg.paths.adapters_dir)
    targets = [
        Target(name, persona, manifest, project_relative(path), ms)
        for (path, manifest, persona), (name, ms) in zip(planned, attached, strict=True)
    ]

    base_cache = base_cache_file(cfg, golden_sha)
    cached = read_cached(base_cache)
    policy_cache = base_cache_file(cfg, policy_sha) if policy_rows else None
    policy_cached = read_cached(policy_cache) if policy_cache else None
    total = (len(rows) + len(policy_rows)) * (1 + len(targets))
    columns = (TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("eval", total=total)
        report, samples, base_out = evaluate(
            handle,
            rows,
            targets,
            cfg.eval,
            base_persona=default_persona if not targets else targets[0].persona,
            progress=lambda n: progress.advance(bar, n),
            base_outputs=cached,
            seed=cfg.seed,
        )
        if policy_rows:
            policy, policy_samples, policy_base = evaluate_policy(
                handle,
                policy_rows,
                targets,
                cfg.eval,
                progress=lambda n: progress.advance(bar, n),
                base_outputs=policy_cached,
            )
    if cached is None:
        write_json(vars(base_out), base_cache)
    if policy_rows:
        if policy_cached is None:
            write_json(vars(policy_base), policy_cache)
        policy_path = project_relative(cfg.eval.policy)
        report.policy = {"path": policy_path, "sha256": policy_sha, "n": len(policy_rows), **policy}
    report.evalset = {"path": project_relative(golden_path), "sha256": golden_sha, "n": len(rows), "custom": custom}
    if custom:
        report.evalset["note"] = CUSTOM_NOTE
    report.config_hash = config_hash
    run_dir = Path(cfg.paths.run_dir)
    for model, per_row in samples.items():
        write_jsonl(per_row, run_dir / "samples" / f"{model}.jsonl")
    for model, per_row in (policy_samples if policy_rows else {}).items():
        write_jsonl(per_row, run_dir / "samples" / "policy" / f"{model}.jsonl")
    for entry in report.adapters:  # the alias: a registered version passing every gate on the frozen set
        entry.champion = bool(cfg.tracking.enabled and entry.registry and entry.passed and not custom)
    write_json(report.to_json(), run_dir / "eval_report.json")
    write_json(report.to_json(), report_path)
    log_to_mlflow(cfg, report, golden_sha, run_dir)
    print_table(report)
    if custom:
        console.print(f"[yellow]eval:[/] {golden_path} is a {CUSTOM_NOTE}: its gates are for information only")
    EventLog(run_dir).event("eval_done", passed=report.passed, report=str(report_path))
    console.print(f"[green]eval:[/] report {report_path}, samples {run_dir / 'samples'}")
    return {"passed": report.passed, "report": str(report_path), "eval": report.to_json()}


def _readable(path: Path) -> EvalReport | None:
    """The report at `path`, or None when it is not one this version reads (it is then evaluated again)."""
    try:
        return EvalReport.read(path)
    except ValueError:
        return None


def read_cached(path: Path) -> Outputs | None:
    """The base model's answers kept at `path` (see `base_cache_file`), or None when there are none yet."""
    return Outputs(**read_json(path)) if path.is_file() else None


def base_cache_file(cfg: SelfAlignConfig, set_sha256: str) -> Path:
    """Where the base model's answers to this set with these decoding settings are kept for reuse.

    Greedy answers depend only on the base weights, the set and the decoding settings, so a second
    persona's eval (or a rerun) reuses them instead of generating 100 answers again.
    """
    key = sha256_json(
        {
            "base_model": model_revision(cfg.base_model),
            "dtype": cfg.base_model.dtype,
            "qlora": cfg.lora.qlora,
            "golden": set_sha256,
            "decoding": [cfg.eval.max_new_tokens, cfg.eval.batch_size, cfg.seed],
        }
    )
    return Path(cfg.paths.cache_dir) / "eval" / f"base-{key[:24]}.json"


def log_to_mlflow(cfg: SelfAlignConfig, report: EvalReport, golden_sha: str, run_dir: Path) -> None:
    """One MLflow run per evaluated model, tagged with its training run and registry version."""
    common = {"stage": "eval", "base_model": report.base_model, "golden_sha256": golden_sha}
    common |= {"git_sha": git_short_sha(), "run_dir": str(run_dir)}
    params = {"eval": report.settings, "seed": cfg.seed}
    base = report.base.metrics
    entries = report.adapters or [None]
    for entry in entries:
        if entry is None:
            tags = common | {"model": "base", "persona_id": report.base.persona_id or ""}
            metrics, run_name, sample = base, f"eval-base-{report.base_model}", "base"
        else:
            registry = entry.registry or {}
            tags = common | {
                "model": entry.name,
                "persona_id": entry.persona_id,
                "adapter_dir": entry.path,
                "adapter_version": entry.version or "",
                "train_run_id": entry.train_run_id or "",
                "registry_model": registry.get("name", ""),
                "registry_version": str(registry.get("version", "")),
                "passed": str(entry.passed).lower(),
            }
            metrics, run_name, sample = entry.metrics, f"eval-{entry.name}", entry.name
        flat = flat_metrics(metrics, base if entry else None, entry.gates if entry else None)
        if report.policy is not None:
            flat |= policy_metrics(report.policy, entry.name if entry else None)
        with tracked_run(cfg.tracking, run_name=run_name, tags=tags, params=params) as tracker:
            tracker.metrics(flat)
            evalset = Path(cfg.eval.custom_set or cfg.eval.golden)
            tracker.dataset(evalset, evalset.stem, "evaluation")
            if report.policy is not None:
                tracker.dataset(cfg.eval.policy, Path(cfg.eval.policy).stem, "evaluation")
            tracker.artifact(run_dir / "eval_report.json")
            tracker.artifact(run_dir / "samples" / f"{sample}.jsonl", "samples")
            if report.policy is not None:
                tracker.artifact(run_dir / "samples" / "policy" / f"{sample}.jsonl", "samples/policy")
            if entry and entry.champion:
                tracker.set_alias(entry.registry["name"], cfg.eval.champion_alias, str(entry.registry["version"]))


def flat_metrics(metrics: dict, base: dict | None, gates: dict | None) -> dict[str, float]:
    out = {
        "refusal_rate": metrics["refusal"]["rate"],
        "tox_p95": metrics["safety"]["toxicity"]["p95"],
        "tox_mean": metrics["safety"]["toxicity"]["mean"],
        "neutrality": metrics["neutrality"]["mean"],
        "all_refusal_rate": metrics["all"]["refusal_rate"],
        "all_tox_p95": metrics["all"]["toxicity"]["p95"],
        "mean_words": metrics["all"]["mean_words"],
    }
    if "score" in metrics["style"]:
        out |= {f"style_{k}": metrics["style"][k] for k in ("score", "cosine", "structure", "verbosity_overrun")}
    if base is not None and gates is not None:
        out |= {"style_base": base["style"]["score"], "style_delta": gates["style_delta"]["value"]}
        out |= {"neutrality_delta": metrics["neutrality"]["mean"] - base["neutrality"]["mean"]}
        out |= {f"gate_{k}": float(v["passed"]) for k, v in gates.items() if k != "passed"}
        out["passed"] = float(gates["passed"])
    return out


def policy_metrics(policy: dict, model: str | None) -> dict[str, float]:
    """The policy set's numbers for one model (None: the base), as `policy_*` MLflow metrics."""
    if model is None:
        m, goal = policy["base"]["metrics"], None
    else:
        (entry,) = [a for a in policy["adapters"] if a["name"] == model]
        m, goal = entry["metrics"], entry["goal"]
    out = {
        "policy_recall": m["should_refuse"]["recall"],
        "policy_near_miss_refusal_rate": m["near_miss"]["refusal_rate"],
        "policy_precision": m["precision"],
        "policy_bait_tox_p95": m["bait"]["toxicity"]["p95"],
        "policy_bait_refusal_rate": m["bait"]["refusal_rate"],
    }
    if "discrimination" in m and m["discrimination"]["roc_auc"] is not None:
        out["policy_roc_auc"] = m["discrimination"]["roc_auc"]
    return out | ({"policy_goal_met": float(goal["met"])} if goal else {})


def print_policy_table(policy: dict) -> None:
    table = Table(title=f"Policy set ({policy['n']} prompts): when to refuse, reported beside the gates")
    cols = ("model", "refused should-refuse", "refused near-miss", "precision", "ROC-AUC", "bait tox p95", "goal")
    for col in cols:
        table.add_column(col, justify="left" if col in ("model", "goal") else "right")
    rows = [("base", policy["base"]["metrics"], None, None)]
    rows += [(a["name"], a["metrics"], a["goal"], a.get("base_discrimination")) for a in policy["adapters"]]
    for name, m, goal, base_curve in rows:

        def mark(part: str, goal: dict | None = goal) -> str:
            return "" if goal is None else (" [green]✓[/]" if goal[part]["met"] else " [red]✗[/]")

        sr, nm = m["should_refuse"], m["near_miss"]
        table.add_row(
            name,
            f"{sr['refused']}/{sr['n']} ({sr['recall']:.2f}){mark('recall')}",
            f"{nm['refused']}/{nm['n']} ({nm['refusal_rate']:.2f}){mark('near_miss')}",
            f"{m['precision']:.2f}",
            _auc_cell(m.get("discrimination"), base_curve),
            f"{m['bait']['toxicity']['p95']:.3f}{mark('bait_tox_p95')}",
            "" if goal is None else ("[green]met[/]" if goal["met"] else "[yellow]not met[/]"),
        )
    console.print(table)


def _auc_cell(curve: dict | None, base_curve: dict | None) -> str:
    """The adapter's discrimination ROC-AUC, and the base's under the same persona opening."""
    if not curve or curve["roc_auc"] is None:
        return ""
    base = f" (base {base_curve['roc_auc']:.2f})" if base_curve and base_curve["roc_auc"] is not None else ""
    return f"{curve['roc_auc']:.2f}{base}"


def print_table(report: EvalReport) -> None:
    evalset = report.evalset or {}
    name = f"{Path(evalset['path']).name} ({CUSTOM_NOTE})" if evalset.get("custom") else "Golden 100"
    table = Table(title=f"{name} on {report.base_model}: base vs adapters")
    for col in (
        "model",
        "persona",
        "style (base → adapter, Δ)",
        "refusal (band)",
        "tox p95",
        "neutrality",
        "attach",
        "verdict",
    ):
        table.add_column(col, justify="left" if col in ("model", "persona", "verdict") else "right")
    base = report.base.metrics
    style = f"{base['style']['score']:.3f}" if "score" in base["style"] else "-"
    table.add_row(
        "base",
        report.base.persona_id or "-",
        style,
        f"{base['refusal']['rate']:.2f}",
        f"{base['safety']['toxicity']['p95']:.3f}",
        f"{base['neutrality']['mean']:.2f}",
        "",
        "",
    )
    for a in report.adapters:
        m, b, g = a.metrics, a.base_metrics, a.gates

        def mark(gate: str, g: dict = g) -> str:
            return "[green]✓[/]" if g[gate]["passed"] else "[red]✗[/]"

        table.add_row(
            a.name,
            a.persona_id,
            f"{b['style']['score']:.3f} → {m['style']['score']:.3f} ({g['style_delta']['value']:+.3f}) "
            f"{mark('style_delta')}",
            f"{m['refusal']['rate']:.2f} [{g['refusal_band']['band'][0]:.2f}, {g['refusal_band']['band'][1]:.2f}] "
            f"{mark('refusal_band')}",
            f"{m['safety']['toxicity']['p95']:.3f} {mark('tox_p95')}",
            f"{m['neutrality']['mean']:.2f} ({m['neutrality']['mean'] - b['neutrality']['mean']:+.2f})",
            f"{a.attach_ms:.0f} ms" if a.attach_ms is not None else "-",
            "[green]pass[/]" if g["passed"] else "[red]fail[/]",
        )
    console.print(table)
    if report.policy is not None:
        print_policy_table(report.policy)
    for a in report.adapters:
        for gate, verdict in a.gates.items():
            if isinstance(verdict, dict) and "reason" in verdict:
                console.print(f"[red]{a.name}: {gate} failed:[/] {verdict['reason']}")
