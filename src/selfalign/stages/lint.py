"""`stage=lint`: lint persona YAML files (globs allowed), print a table, write `lint_report.json`."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from rich.table import Table
from rich.text import Text

from selfalign.config import SelfAlignConfig
from selfalign.persona.schema import Issue, LintResult, lint_persona
from selfalign.utils.console import console
from selfalign.utils.io import write_json
from selfalign.utils.logging import EventLog


def expand(patterns: list[str]) -> list[LintResult | str]:
    """Each pattern's matches in sorted order; a glob that matches nothing is itself a failing entry."""
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                files.append(LintResult(pattern, [Issue("", "no file matches this pattern", "file.missing")]))
            files.extend(matches)
        else:
            files.append(pattern)
    return files


def render(results: list[LintResult]) -> Table:
    table = Table(title="Persona lint", show_lines=True)
    table.add_column("file", overflow="fold")
    table.add_column("result")
    table.add_column("issues and warnings", overflow="fold")
    for r in results:
        verdict = Text("PASS", style="bold green") if r.ok else Text("FAIL", style="bold red")
        notes = Text()
        for issue in r.errors:
            notes.append(f"error [{issue.rule}] {issue}\n", style="red")
        for issue in r.warnings:
            notes.append(f"warning [{issue.rule}] {issue}\n", style="yellow")
        if r.ok:
            notes.append(f"persona hash {r.persona_hash[:16]}", style="dim")
        notes.rstrip()
        table.add_row(_display(r.file), verdict, notes)
    return table


def _display(path: str) -> str:
    """Paths under the working directory are shown relative to it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def report(results: list[LintResult]) -> dict:
    return {
        "passed": all(r.ok for r in results),
        "files": [
            {
                "file": r.file,
                "passed": r.ok,
                "persona_hash": r.persona_hash,
                "errors": [{"rule": i.rule, "message": str(i)} for i in r.errors],
                "warnings": [{"rule": i.rule, "message": str(i)} for i in r.warnings],
            }
            for r in results
        ],
    }


def run(cfg: SelfAlignConfig) -> dict:
    results = [e if isinstance(e, LintResult) else lint_persona(e) for e in expand(cfg.lint.files)]
    console.print(render(results))
    summary = report(results)
    write_json(summary, Path(cfg.paths.run_dir) / "lint_report.json")
    failed = sum(not r.ok for r in results)
    EventLog(cfg.paths.run_dir).event("lint", files=len(results), failed=failed)
    console.print(f"{len(results) - failed}/{len(results)} persona file(s) passed")
    return {"passed": summary["passed"], "files": len(results), "failed": failed}
