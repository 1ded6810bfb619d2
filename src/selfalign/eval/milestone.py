"""The milestone table: one line per adapter (style Δ vs base, refusal vs band, toxicity p95, attach time, the
verdict, and the hashes that make a rerun checkable), built from an eval report. The pipeline, the demo and a
sweep of pipelines print it."""

from __future__ import annotations

from rich.table import Table

from selfalign.config import project_relative
from selfalign.eval.report import EvalReport
from selfalign.utils.console import console
from selfalign.utils.hashing import sha256_json


def milestone_row(
    persona: dict, synth: dict | None, train: dict | None, report: EvalReport | None, attach_max_ms: float
) -> dict:
    """One adapter's line of the milestone table, with the hashes that make a rerun checkable."""
    row = {"persona_id": persona["id"], "band": persona["refusal_policy"]["band"]}
    if synth:
        row["dataset_sha256"] = synth.get("sha256")
        row["rows"] = synth.get("rows")
    if train:
        row |= {"adapter_dir": project_relative(train["adapter_dir"]), "adapter_sha256": train["adapter_sha256"]}
        row |= {"val_loss": train["val_loss"], "registry_version": train.get("registry_version")}
    if report and report.adapters:
        entry = report.adapters[0]
        gates = entry.gates
        row |= {
            "style_base": entry.base_metrics["style"]["score"],
            "style_adapter": entry.metrics["style"]["score"],
            "style_delta": gates["style_delta"]["value"],
            "style_structure": entry.metrics["style"]["structure"],
            "refusal_rate": gates["refusal_band"]["value"],
            "tox_p95": gates["tox_p95"]["value"],
            "neutrality_delta": entry.metrics["neutrality"]["mean"] - entry.base_metrics["neutrality"]["mean"],
            "attach_ms": entry.attach_ms,
            "gates": {k: v["passed"] for k, v in gates.items() if k != "passed"},
            "champion": bool(entry.champion),
        }
        row["gates"]["attach"] = entry.attach_ms is not None and entry.attach_ms < attach_max_ms
        row["passed"] = entry.passed and row["gates"]["attach"]
        row["metrics_sha256"] = sha256_json({"adapter": entry.metrics, "base": entry.base_metrics})
    return row


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
