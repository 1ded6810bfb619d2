"""`stage=ui`: start the MLflow UI on 127.0.0.1 over the project's tracking store, until interrupted.

It reads the same `tracking.*` settings the stages log with, so `tracking.tracking_uri=...` overrides
apply here too. `make mlflow-ui` runs this.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from selfalign.config import SelfAlignConfig
from selfalign.errors import SelfAlignError
from selfalign.utils.console import console


def ui_command(cfg: SelfAlignConfig) -> list[str]:
    t = cfg.tracking
    if t.tracking_uri.startswith("sqlite:///"):
        Path(t.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    Path(t.artifact_location).mkdir(parents=True, exist_ok=True)
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", t.tracking_uri,
        "--default-artifact-root", Path(t.artifact_location).resolve().as_uri(),
        "--host", cfg.ui.host,
        "--port", str(cfg.ui.port),
        "--workers", str(cfg.ui.workers),
    ]  # fmt: skip


def runs_url(cfg: SelfAlignConfig) -> str:
    """The page to open: the experiment's runs in MLflow 3's "Model training" view. The UI picks its view from
    the `workflowType` in the URL, else from the browser's last choice, else GenAI (an empty "Overview" page for
    these runs); the experiment's `mlflow.experimentKind` tag alone did not change that in 3.17.2."""
    from selfalign.tracking import ensure_experiment

    experiment = ensure_experiment(cfg.tracking)
    return f"http://{cfg.ui.host}:{cfg.ui.port}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def run(cfg: SelfAlignConfig) -> dict:
    if not cfg.tracking.enabled:
        raise SelfAlignError("stage=ui shows the MLflow store; tracking is off (tracking=none)")
    command = ui_command(cfg)
    console.print(
        f"[bold green]MLflow UI[/] over {cfg.tracking.tracking_uri}, the runs at {runs_url(cfg)} (Ctrl-C stops it)",
        soft_wrap=True,
    )
    proc = subprocess.Popen(command)

    def forward(signum, _frame):  # MLflow forwards it to uvicorn, which stops its workers
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()  # returns once the server and its workers have shut down
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return {"passed": code in (0, -2, 130), "returncode": code}
