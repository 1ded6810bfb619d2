"""The stage table: `stage=<name>` runs `STAGES[name].run(cfg) -> dict`.

Modules are imported on demand so `stage=lint` does not pay for torch or Lightning. A test keeps
this table and `conf/stage/*.yaml` in sync.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from selfalign.config import SelfAlignConfig
from selfalign.errors import SelfAlignError

STAGES: dict[str, str] = {
    "demo": "selfalign.stages.demo",
    "doctor": "selfalign.stages.doctor",
    "eval": "selfalign.stages.eval",
    "infer": "selfalign.stages.infer",
    "lint": "selfalign.stages.lint",
    "pipeline": "selfalign.stages.pipeline",
    "prefer": "selfalign.stages.prefer",
    "serve": "selfalign.stages.serve",
    "swap": "selfalign.stages.swap",
    "synth": "selfalign.stages.synth",
    "train": "selfalign.stages.train",
    "ui": "selfalign.stages.ui",
}


def get_stage(name: str) -> Callable[[SelfAlignConfig], dict]:
    if name not in STAGES:
        raise SelfAlignError(f"stage={name!r} is not a stage; choose one of: {', '.join(sorted(STAGES))}")
    return importlib.import_module(STAGES[name]).run
