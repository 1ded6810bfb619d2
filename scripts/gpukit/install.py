"""The carried wheels (`scripts/gpu_prepare.py` builds them), installed without network into a folder that goes
on the children's PYTHONPATH; and the probe that says what the machine runs."""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

from gpukit.procs import run_cmd

# transformers-5.24.0's Requires-Dist: the carried wheel goes in with --no-deps, so the machine must satisfy them.
TRANSFORMERS_NEEDS = {
    "huggingface-hub": ((1, 31, 0), (3,)),
    "tokenizers": ((0, 23, 1), (0, 24)),
    "safetensors": ((0, 8, 0), None),
    "regex": ((2025, 10, 22), None),
    "typer": ((0,), None),
    "numpy": ((1, 17), None),
    "packaging": ((20, 0), None),
    "pyyaml": ((5, 1), None),
    "tqdm": ((4, 60), None),
}
PROBED = [  # what the versions probe imports and reports
    "torch", "transformers", "peft", "bitsandbytes", "lightning", "datasets", "hydra", "omegaconf", "antlr4",
    "sentence_transformers", "tokenizers", "huggingface_hub", "accelerate", "safetensors", "onnx", "onnxruntime",
    "sklearn", "openai", "numpy", "datasketch", "rich", "yaml", "selfalign",
]  # fmt: skip


def _vtuple(version: str | None) -> tuple:
    parts = []
    for part in (version or "0").split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def transformers_ok(mode: str) -> tuple[bool, str]:
    """Whether to install the carried transformers (`auto`: when this machine's packages satisfy it)."""
    if mode in ("skip", "force"):
        return mode == "force", f"--transformers {mode}"
    bad = []
    for name, (low, high) in TRANSFORMERS_NEEDS.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have is None or _vtuple(have) < low or (high and _vtuple(have) >= high):
            bad.append(f"{name} {have}")
    return not bad, "requirements met" if not bad else "unmet: " + ", ".join(bad)


def _older_or_missing(wheel: Path) -> bool:
    """Whether this machine lacks the wheel's distribution, or has an older version of it."""
    name, version = wheel.name.split("-")[:2]
    try:
        return _vtuple(metadata.version(name)) < _vtuple(version)
    except metadata.PackageNotFoundError:
        return True


def install(wheel_dir: Path, target: Path, log: Path, transformers: str = "auto", only_missing: bool = False) -> dict:
    """pip-installs the wheels in `wheel_dir` into `target` (--no-index --no-deps); with `only_missing`, only
    those whose distribution the machine lacks or has older."""
    wheels = [w for w in sorted(wheel_dir.glob("*.whl")) if not only_missing or _older_or_missing(w)]
    use_tf, why = transformers_ok(transformers)
    if not use_tf:
        wheels = [w for w in wheels if not w.name.startswith("transformers-")]
    if not wheels:
        return {"rc": 0 if only_missing else 2, "note": f"nothing to install from {wheel_dir}"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    cmd += ["--disable-pip-version-check", "--upgrade", "--target", str(target), *map(str, wheels)]
    result = run_cmd(cmd, log, 180, dict(os.environ), f"pip install {wheel_dir.name}")
    return result | {"wheels": [w.name for w in wheels], "transformers_wheel": use_tf, "transformers_reason": why}


def has(module: str) -> bool:
    """Whether this interpreter can find `module` (without importing it)."""
    from importlib.util import find_spec

    return find_spec(module) is not None
