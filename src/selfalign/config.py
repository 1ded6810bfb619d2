"""Typed schemas for every config group, registered in Hydra's ConfigStore.

The YAML files under `conf/` hold values only; composing them onto these dataclasses is what
validates them (an unknown key or a wrong type fails at composition). Stages receive the
`SelfAlignConfig` object that `OmegaConf.to_object` builds, so `__post_init__` checks run once, at
the edge.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"


@cache
def git_short_sha(root: str = str(PROJECT_ROOT)) -> str:
    """Short sha of HEAD, `-dirty` when the tree has changes, `nogit` outside a repository."""
    try:
        sha = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "nogit"
    return sha or "nogit"


def project_root() -> str:
    """`SELFALIGN_ROOT` when set, else the checkout that holds `conf/`."""
    return os.environ.get("SELFALIGN_ROOT", str(PROJECT_ROOT))


OmegaConf.register_new_resolver("selfalign_root", project_root, replace=True)
OmegaConf.register_new_resolver("git_sha", git_short_sha, replace=True)


@dataclass
class PathsConfig:
    """Every path derives from `root_dir`; `run_dir` is the Hydra output dir of this run."""

    root_dir: str = MISSING
    persona_dir: str = MISSING
    golden_dir: str = MISSING
    output_dir: str = MISSING
    mlruns_dir: str = MISSING
    adapters_dir: str = MISSING
    data_dir: str = MISSING
    cache_dir: str = MISSING
    run_dir: str = MISSING


@dataclass
class PersonaRef:
    """Which persona YAML a run uses; the file itself is validated by `persona.schema`."""

    name: str = MISSING
    path: str = MISSING


class ModelSource(str, Enum):
    gguf_package = "gguf_package"  # a GGUF file shipped inside an installed Python package
    hub = "hub"  # a Hugging Face hub id (needs the weights in the local HF cache or network)
    local = "local"  # a local directory in HF format
    tiny = "tiny"  # a tiny randomly initialised model built locally, for tests


@dataclass
class BaseModelConfig:
    name: str = MISSING
    family: str = MISSING  # architecture family: selects LoRA target names and chat template
    source: ModelSource = MISSING
    repo_id: str | None = None
    path: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    max_seq_len: int = 1024
    approx_params_b: float = 0.0  # for memory estimates in docs and doctor

    def __post_init__(self) -> None:
        needs_gguf = self.source in (ModelSource.gguf_package, ModelSource.tiny)  # tiny borrows its tokenizer
        if needs_gguf and not (self.gguf_package and self.gguf_file):
            raise ValueError(f"base_model.{self.name}: source={self.source.value} needs gguf_package and gguf_file")
        if self.source is ModelSource.hub and not self.repo_id:
            raise ValueError(f"base_model.{self.name}: source=hub needs repo_id")
        if self.source is ModelSource.local and not self.path:
            raise ValueError(f"base_model.{self.name}: source=local needs path")
        if self.dtype not in {"float32", "bfloat16", "float16", "auto"}:
            raise ValueError(f"base_model.dtype: {self.dtype!r} is not one of float32, bfloat16, float16, auto")


LORA_TARGET_GROUPS = ("attn", "mlp")


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGET_GROUPS))
    qlora: bool = False  # load the base in 4-bit NF4 (bitsandbytes) with bf16 compute

    def __post_init__(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ValueError(f"lora.r and lora.alpha must be positive (got r={self.r}, alpha={self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1) (got {self.dropout})")
        unknown = sorted(set(self.targets) - set(LORA_TARGET_GROUPS))
        if unknown or not self.targets:
            raise ValueError(
                f"lora.targets must be a non-empty subset of {list(LORA_TARGET_GROUPS)} (got {self.targets})"
            )


@dataclass
class TrainerConfig:
    """Keyword arguments passed through to `lightning.pytorch.Trainer`."""

    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    max_epochs: int = 1
    max_steps: int = -1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    log_every_n_steps: int = 1
    val_check_interval: Any = 1.0
    deterministic: bool = True


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str = MISSING
    artifact_location: str = MISSING
    experiment_name: str = "selfalign"


class TeacherKind(str, Enum):
    local = "local"  # a causal LM loaded by the runtime, batched on this machine
    openai = "openai"  # any OpenAI-compatible HTTP endpoint


@dataclass
class TeacherConfig:
    kind: TeacherKind = MISSING
    model: str | None = None  # local: a base_model preset name (None = the run's base_model); openai: model id
    base_url: str | None = None
    api_key_env: str | None = None  # name of the environment variable holding the key, never the key
    batch_size: int = 8
    max_concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        if self.kind is TeacherKind.openai and not (self.base_url and self.model):
            raise ValueError("teacher: kind=openai needs teacher.base_url and teacher.model")


@dataclass
class StageConfig:
    name: str = MISSING
    description: str = ""


@dataclass
class LintConfig:
    """`stage=lint`: files or globs to lint (`lint.files='[a.yaml,b.yaml]'` or `lint.files=personas/x.yaml`)."""

    files: Any = field(default_factory=lambda: ["${paths.persona_dir}/*.yaml"])

    def __post_init__(self) -> None:
        self.files = [self.files] if isinstance(self.files, str) else [str(f) for f in self.files]
        if not self.files:
            raise ValueError("lint.files is empty; name a file or a glob such as personas/*.yaml")


@dataclass
class DoctorConfig:
    load_models: bool = True  # load the default base model and the embedder offline, not just find them
    min_free_disk_gb: float = 5.0
    min_ram_gb: float = 4.0


@dataclass
class InferConfig:
    """Decoding for `stage=infer` (greedy when temperature is 0)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("infer: max_new_tokens > 0, temperature >= 0 and 0 < top_p <= 1 are required")


@dataclass
class ServeConfig:
    """`stage=serve` (the OpenAI-compatible server) and `stage=swap` (its client)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None  # when set, requests must send `Authorization: Bearer $<that variable>`
    adapters: list[str] = field(default_factory=list)  # preloaded at start, relative to paths.adapters_dir
    model_alias: str = "selfalign"  # `model=<alias>` routes to the active adapter (the base when none)
    max_new_tokens: int = 256  # when a request gives no max_tokens
    timeout_s: float = 30.0  # stage=swap's HTTP timeout

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"serve.port must be in 1..65535 (got {self.port})")


@dataclass
class SynthConfig:
    """`stage=synth`: how many rows, where they go, and the filter thresholds (seed §6)."""

    n: int = 2000
    out: str = "${paths.data_dir}/sft/${persona.name}.jsonl"
    overwrite: bool = False  # replace a dataset (or unfinished run) of another persona or config
    chunk_size: int = 32  # answered tasks per teacher call; refusal rows are added on top
    max_chars: int = 2400  # hard filter: longest instruction or answer (~350 tokens of answer)
    style_tau: float = 0.0  # style filter: min cosine to the style centroid (0.35 rejected 91%: DECISIONS.md)
    dedup_threshold: float = 0.7  # MinHash Jaccard at which two rows are near-duplicates
    tox_max: float = 0.2  # toxicity filter: max score kept
    max_chunks_factor: float = 6.0  # give up after n * factor / chunk_size chunks

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError(f"synth.n must be positive (got {self.n})")
        if self.chunk_size <= 0:
            raise ValueError(f"synth.chunk_size must be positive (got {self.chunk_size})")
        if not 0 < self.dedup_threshold <= 1:
            raise ValueError(f"synth.dedup_threshold must be in (0, 1] (got {self.dedup_threshold})")


@dataclass
class SelfAlignConfig:
    paths: PathsConfig = MISSING
    persona: PersonaRef = MISSING
    base_model: BaseModelConfig = MISSING
    lora: LoraConfig = MISSING
    trainer: TrainerConfig = MISSING
    tracking: TrackingConfig = MISSING
    teacher: TeacherConfig = MISSING
    stage: StageConfig = MISSING
    lint: LintConfig = field(default_factory=LintConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    adapter: str | None = None  # an adapter dir under paths.adapters_dir; null/none = the base model
    prompt: str | None = None  # stage=infer's prompt
    seed: int = 42
    debug: bool = False  # show full tracebacks for user errors
    tags: list[str] = field(default_factory=list)


def register_configs() -> None:
    """Put the root schema in the ConfigStore; `conf/config.yaml` names it first in its defaults."""
    ConfigStore.instance().store(name="selfalign_schema", node=SelfAlignConfig)


register_configs()
