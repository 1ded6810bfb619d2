"""Guarded child processes and what they leave: the JSON summary, logs, and GPU memory readings."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


@dataclass
class Check:
    """One call's settings and places, and its clock (every step is cut to what the budget has left)."""

    dry: bool
    work: Path
    out: Path
    site: Path
    budget_s: float
    t0: float = field(default_factory=time.monotonic)

    @property
    def models(self) -> Path:
        return self.work / "models"

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def env(self, *extra_paths: Path, **extra: str) -> dict:
        """A child's environment: the memory hook first on PYTHONPATH, then `extra_paths`, the carried packages
        (not in a dry run) and `src/`; offline, with the project's cache under the work folder."""
        paths = [HERE / "hook", *extra_paths, *([] if self.dry else [self.site]), ROOT / "src"]
        env = dict(os.environ)
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env.pop("GPU_CHECK_MEM_OUT", None)
        env.update(
            PYTHONPATH=os.pathsep.join(map(str, paths)),
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HOME=str(self.work / "hf"),
            SELFALIGN_CACHE=str(self.work / "cache"),
            TOKENIZERS_PARALLELISM="false",
            COLUMNS="160",
        )
        return env | extra


class Summary:
    """The JSON summary, rewritten whole after every step so a killed run still leaves what it measured."""

    def __init__(self, check: Check, name: str):
        self.check, self.path = check, check.out / name
        self.data: dict = {"dry": check.dry, "started": datetime.now().isoformat(timespec="seconds"), "steps": {}}

    def put(self, key: str, value) -> None:
        self.data["steps"][key] = value
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.check.t0, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


def tagged(log: Path, tag: str) -> list[dict]:
    """The JSON a child printed after `tag` on its own lines."""
    prefix = tag + " "
    return [json.loads(x.removeprefix(prefix)) for x in tail(log, 200_000).splitlines() if x.startswith(prefix)]


def run_cmd(cmd: list[str], log: Path, timeout: float, env: dict, title: str) -> dict:
    """One command in its own process group, killed whole at the timeout; its output appended to `log`."""
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n===== {title} ({time.strftime('%H:%M:%S')}, timeout {timeout:.0f}s)\n$ {' '.join(cmd)}\n")
    start = time.monotonic()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)
                    break
            rc = 124
    wall = round(time.monotonic() - start, 1)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"===== {title}: rc={rc} wall={wall}s\n")
    return {"rc": rc, "wall_s": wall, "timed_out": rc == 124}


def smi_used() -> int | None:
    """nvidia-smi's memory.used in MiB, or None without a GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.split()
        return int(out[0]) if out else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


@contextlib.contextmanager
def smi_sampler(path: Path, into: dict):
    """Samples nvidia-smi's memory.used every 200 ms while the block runs; the maximum goes into `into`."""
    if not shutil.which("nvidia-smi"):
        yield
        return
    before = smi_used()
    cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"]
    with open(path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.DEVNULL)
        try:
            yield
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    values = [int(x) for x in path.read_text().split() if x.strip().isdigit()]
    into |= {"smi_used_max_mib": max(values, default=None), "smi_used_before_mib": before}


def guarded_run(check: Check, name: str, cmd: list[str], timeout: float, env: dict) -> dict:
    """A `python -m selfalign` run with its peak GPU memory (torch's, from the hook, and nvidia-smi's); skipped
    when the budget cannot hold it. Its log is `$OUT/<name>.log`."""
    room = check.left() - 5
    if room < min(timeout, 45):
        return {"skipped": f"time budget: {room:.0f}s left"}
    mem_file = check.work / f"mem_{name}.json"
    mem_file.unlink(missing_ok=True)
    result: dict = {}
    log = check.out / f"{name}.log"
    with smi_sampler(check.work / f"smi_{name}.csv", result):
        result |= run_cmd(cmd, log, min(timeout, room), env | {"GPU_CHECK_MEM_OUT": str(mem_file)}, name)
    if mem_file.is_file():
        with contextlib.suppress(ValueError):
            result |= {f"torch_{k}": v for k, v in json.loads(mem_file.read_text()).items()}
    if result["rc"] != 0:
        result["log_tail"] = tail(log, 2500)
    return result
