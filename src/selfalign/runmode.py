"""Where this run sits in Hydra: a single run or one job of a multirun (sweep)."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig


def in_multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_job_label() -> str | None:
    """`<sweep dir name>.<job number>` inside a multirun (so jobs write distinct adapters), else None."""
    if not in_multirun():
        return None
    hc = HydraConfig.get()
    return f"{Path(hc.sweep.dir).name}.{hc.job.num}".replace("_", "-")
