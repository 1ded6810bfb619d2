"""Shared fixtures: Hydra compose with clean global state, and the CLI as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from selfalign.config import CONF_DIR, PROJECT_ROOT

PERSONAS = PROJECT_ROOT / "personas"
GOLDEN = PROJECT_ROOT / "golden" / "golden_v0.jsonl"
POLICY = PROJECT_ROOT / "golden" / "policy_v0.jsonl"


def run_script_check(name: str, timeout: int = 300, flag: str = "--check") -> None:
    """Run `python scripts/<name> --check` (rebuild from the shipped inputs, compare with the shipped outputs)."""
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / name), flag],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=PROJECT_ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def kill_after_chunks(command: list[str], state: Path, chunks: int = 2, timeout: float = 300) -> None:
    """Start `command` (a synth run) and SIGKILL its process group once its resume state has `chunks` chunks."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["chunk"] >= chunks:
                break
        except (OSError, ValueError):  # not written yet
            pass
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def compose_cfg(tmp_path):
    """compose(overrides) -> DictConfig with outputs under tmp_path; Hydra's global state cleared after."""

    def _compose(overrides=(), conf_dir: Path = CONF_DIR, return_hydra_config: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(
                config_name="config",
                overrides=[f"paths.output_dir={tmp_path}/outputs", f"paths.run_dir={tmp_path}/run", *overrides],
                return_hydra_config=return_hydra_config,
            )

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def cli(tmp_path):
    """Run `python -m selfalign ...` with outputs under tmp_path; returns CompletedProcess."""

    def _run(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        env.pop("HYDRA_FULL_ERROR", None)
        return subprocess.run(
            [sys.executable, "-m", "selfalign", *args, f"paths.output_dir={tmp_path}/outputs"],
            capture_output=True,
            text=True,
            cwd=cwd or tmp_path,
            env=env,
            timeout=timeout,
        )

    return _run


def run_dirs(tmp_path: Path, stage: str) -> list[Path]:
    return sorted((tmp_path / "outputs" / stage).iterdir())


def preset(group: str, option: str | None = None, **changes):
    """A config group's typed dataclass as the YAML presets make it (`option`, else the default one), with
    `changes`: the one source of defaults, for tests that call library functions directly."""
    import dataclasses

    from selfalign.config import compose_typed

    typed = compose_typed([f"{group}={option}"] if option else [])
    return dataclasses.replace(getattr(typed, group), **changes)
