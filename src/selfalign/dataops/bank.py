"""The instruction bank (`bank.yaml` beside this module): templates, topics, redline and near-miss requests."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml


@cache
def load_bank() -> dict:
    return yaml.safe_load((Path(__file__).with_name("bank.yaml")).read_text(encoding="utf-8"))
