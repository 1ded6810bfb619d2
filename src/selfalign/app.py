"""The one entrypoint: `python -m selfalign` / `selfalign`, a Hydra app that dispatches `stage=<name>`.

Each run gets its own Hydra output dir holding `config_snapshot.yaml`, `env.json` and `events.jsonl`
beside the stage's artefacts. User mistakes (`SelfAlignError`) print one line and exit 2; `debug=true`
prints the traceback before that line (the exit code stays 2).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from selfalign.config import CONF_DIR, to_typed, undeclared_key, undeclared_message
from selfalign.errors import SelfAlignError
from selfalign.runmode import in_multirun
from selfalign.utils.console import err_console
from selfalign.utils.io import atomic_write_text, write_json
from selfalign.utils.logging import EventLog

EXIT_FAILED = 1  # the stage ran and its checks failed (lint errors, doctor failures, gates)
EXIT_USER_ERROR = 2  # bad input: a file, a field, an override
RESULT_FILE = "result.json"


def print_error(message: str) -> None:
    """A user's mistake: one line on stderr, `error: <message>`."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def write_run_files(cfg: DictConfig, run_dir: Path) -> None:
    """The config snapshot and env.json, without importing torch: a user's mistake is caught in about 2 s."""
    from selfalign.envinfo import collect_env

    atomic_write_text(run_dir / "config_snapshot.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json(collect_env(str(cfg.paths.root_dir), load_torch=False), run_dir / "env.json")


def complete_env(run_dir: Path) -> None:
    """Once the stage has imported torch: env.json gains CUDA and the GPUs (nothing to add otherwise)."""
    from selfalign.envinfo import torch_info

    path = run_dir / "env.json"
    if "torch" in sys.modules and path.is_file():
        env = json.loads(path.read_text(encoding="utf-8"))
        write_json(env | {"torch": torch_info()}, path)


def run(cfg: DictConfig) -> tuple[int, dict]:
    """Validate, record the run, dispatch the stage; the process exit code and the stage's result.

    The result is also written to `<run dir>/result.json`, where sweeps and pipelines read it.
    """
    from selfalign.stages import get_stage

    try:
        conf = to_typed(cfg)
        run_dir = Path(conf.paths.run_dir)
        write_run_files(cfg, run_dir)
        events = EventLog(run_dir)
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        events.event("run_start", stage=conf.stage.name, overrides=overrides, seed=conf.seed)
        try:
            result = get_stage(conf.stage.name)(conf)
        finally:
            complete_env(run_dir)
        passed = result.get("passed", True)
        atomic_write_text(run_dir / RESULT_FILE, json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
        events.event("run_end", stage=conf.stage.name, passed=passed)
        return (0 if passed else EXIT_FAILED), result
    except SelfAlignError as exc:
        if cfg.get("debug", False):  # the traceback too, but the same exit code: still the user's mistake
            import traceback

            traceback.print_exc()
        print_error(str(exc))
        return EXIT_USER_ERROR, {"passed": False, "error": str(exc)}


# Library download/loading bars would tear through the stages' own rich progress displays.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Deprecation notices raised inside pinned libraries (PEFT -> transformers, Lightning -> torch): nothing to act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    code, result = run(cfg)
    if in_multirun():  # the sweep goes on; a sweeper (Optuna) minimises the stage's objective
        return result.get("objective") if code == 0 else None
    if code:
        sys.exit(code)
    return None


def cli_undeclared(args: list[str]) -> str | None:
    """The first command-line override whose key no schema declares, before Hydra composes (Hydra's own message
    for a plain unknown key is several lines and suggests `+`). Groups, `hydra.*` and deletions are Hydra's."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+")
        if not key or key.startswith(("~", "hydra")) or key.split("/")[0].split("@")[0] in groups:
            continue
        undeclared = undeclared_key(key)
        if undeclared:
            return undeclared
    return None


def main() -> None:
    undeclared = cli_undeclared(sys.argv[1:])
    if undeclared:
        print_error(undeclared_message(undeclared))
        sys.exit(EXIT_USER_ERROR)
    _hydra_main()
