"""The eval report, typed: what `stage=eval` writes to `reports/<adapters>.json` and what the pipeline, the demo and
a sweep's milestone table read back. `to_json` gives the file's JSON; `from_json` and `read` take it back.

The metric blocks (`metrics`, `base_metrics`, `gates`, the policy block) stay plain dicts: their keys are the
metric names, documented in `selfalign.eval.metrics` and the Metrics table in docs/reference.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class BaseResult:
    """The base model on the set: scored against `persona_id`'s style (None: no persona)."""

    persona_id: str | None
    metrics: dict
    speed: dict
    outputs_cached: bool = False  # the answers came from an earlier identical run


@dataclass
class AdapterResult:
    """One adapter on the set, its manifest's identity, the base scored against the same persona, and the gates."""

    name: str
    adapter_id: str | None
    version: str | None
    path: str | None
    persona_id: str
    registry: dict | None
    train_run_id: str | None
    metrics: dict
    base_metrics: dict
    attach_ms: float | None
    gates: dict
    speed: dict
    champion: bool | None = None  # set by the eval stage: the registry alias went to this version

    @property
    def passed(self) -> bool:
        return bool(self.gates["passed"])


# Written only when set: a report from `run_eval` has no config hash, one without the policy set no policy block.
_OPTIONAL = ("evalset", "policy", "config_hash", "seconds")


@dataclass
class EvalReport:
    base_model: str
    chat_template_hash: str
    settings: dict[str, Any]  # the decoding and the gates' thresholds, and the run's seed
    base: BaseResult
    adapters: list[AdapterResult] = field(default_factory=list)
    passed: bool = True  # every adapter passed every gate
    evalset: dict | None = None  # path, sha256, n, custom (and a note for a custom set)
    policy: dict | None = None  # the policy set's block: path, sha256, n, base, adapters (metrics and goal)
    config_hash: str | None = None  # what makes a rerun of the same evaluation skippable
    seconds: float | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        for name in _OPTIONAL:
            if data[name] is None:
                del data[name]
        for entry in data["adapters"]:
            if entry["champion"] is None:
                del entry["champion"]
        return data

    @classmethod
    def from_json(cls, data: dict) -> EvalReport:
        """The report a `to_json` dict describes; a ValueError when it is not one (a file from another version)."""
        try:
            values = _known(cls, data)
            values["base"] = BaseResult(**_known(BaseResult, data["base"]))
            values["adapters"] = [AdapterResult(**_known(AdapterResult, entry)) for entry in data["adapters"]]
            return cls(**values)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not an eval report ({type(exc).__name__}: {exc})") from None

    @classmethod
    def read(cls, path: str | Path) -> EvalReport:
        try:
            return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def _known(kind: type, data: dict) -> dict:
    names = {f.name for f in fields(kind)}
    return {k: v for k, v in data.items() if k in names}
