"""Train the learned refusal judge shipped in src/selfalign/eval/data/, and measure it leave-one-source-out.

    python scripts/train_refusal_head.py           # rebuild refusal_head.{safetensors,json} (about 2 min, 2 cores)
    python scripts/train_refusal_head.py --check   # rebuild in memory, fail if it differs from the shipped files

Sources (judge_data/README.md has their licences and sha256), each a distinct origin:
- the answers of real chat models in judge_data/refusal/responses.jsonl, labelled by hand against
  judge_data/refusal/RUBRIC.md, one source per model family: anthropic (the 52B assistant of HH-RLHF), gemma, gpt,
  llama (Meta's chat models), vicuna (LMSYS's fine-tune: its own data and style), qwen, yi, and the unnamed model
  of CoCoNot's rejected answers; `unclear` labels are left out;
- smollm2: the bundled SmolLM2-135M-Instruct and a neutral-concise SFT adapter on pair-grammar prompts
  (judge_data/refusal/smollm2_responses.jsonl, labelled by hand): the text the milestone's gates read;
- project: src/selfalign/eval/data/refusal_labelled.jsonl, written for this project (templates, apologies,
  compliant answers that carry negations);
- project-styles: judge_data/refusal/written_styles.jsonl, written for this project: impersonal and moral
  declines, premise rejections and lectures in place of an answer, and compliant answers that share their words.
The judge's choices were fixed before its first leave-one-source-out run (DECISIONS.md "Refusal judge, leave one
source out"): the architecture (`selfalign.eval.refusal.ARCH`), the rule groups, the L2 weight (0.1, chosen among
0.001/0.01/0.1 by a leave-one-family-out run on the `dev` split only), the loss (binary cross-entropy, each source
weighted equally, classes balanced within a source, L-BFGS in float64) and the threshold (0.5); the anthropic and
smollm2 sources were added after it, without changing any choice. The head is fit on `dev` rows only (the public
answers' split is by request; our sets use REFUSAL_SPLIT):
- leave one source out: for each source S, fit on every row of every other source, score all of S and S's `test`
  rows: rules alone, the head alone (no rule inputs), both (the candidate's form) and rules-or-head (added after
  the first run had been seen);
- in distribution: the head fit on the `dev` rows of every source, scored on every source's `test` rows.
Deterministic: float64, one ordering, no timestamps in the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from train_toxicity_head import differences, sample_weights  # noqa: E402  (scripts/ is on sys.path when this runs)

from selfalign.eval.metrics import REFUSAL_DATA, REFUSAL_SPLIT, binary_metrics, load_labelled, stratified_split  # noqa: E402
from selfalign.eval.refusal import (  # noqa: E402
    ARCH,
    DIM,
    REFUSAL_HEAD,
    REFUSAL_META,
    RULE_GROUPS,
    THRESHOLD,
    feature_session,
    head_probabilities,
    rule_features,
    window_features,
)
from selfalign.utils.hashing import sha256_file  # noqa: E402

JUDGE_DATA = ROOT / "judge_data" / "refusal"
RESPONSES, LABELS = JUDGE_DATA / "responses.jsonl", JUDGE_DATA / "labels.jsonl"
STYLES = JUDGE_DATA / "written_styles.jsonl"
SMOLLM2 = JUDGE_DATA / "smollm2_responses.jsonl"
L2 = 0.1
MAX_ITER = 500
ROUND = 4


def source_of(row: dict) -> str:
    if row["model"].startswith("vicuna"):
        return "vicuna"
    return "coconot-unnamed" if row["family"] == "unknown" else row["family"]


def load_rows() -> list[dict]:
    """Every labelled text: {"text", "y", "source", "split"}; partial refusals count as refusals (y = 1)."""
    labels = {}
    for line in LABELS.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        labels[row["id"]] = row["label"]
    rows = []
    for line in RESPONSES.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if labels[row["id"]] == "unclear":  # RUBRIC.md: left out of every score
            continue
        y = int(labels[row["id"]] != "compliance")
        rows.append({"text": row["response"], "y": y, "source": source_of(row), "split": row["split"]})
    for line in SMOLLM2.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["label"] != "unclear":
            y = int(row["label"] != "compliance")
            rows.append({"text": row["response"], "y": y, "source": "smollm2", "split": row["split"]})
    for name, path in (("project", REFUSAL_DATA), ("project-styles", STYLES)):
        own = load_labelled(path)
        _, test = stratified_split([r["label"] for r in own], **REFUSAL_SPLIT)
        test_set = set(test.tolist())
        for i, r in enumerate(own):
            rows.append(
                {"text": r["text"], "y": r["label"], "source": name, "split": "test" if i in test_set else "dev"}
            )
    return rows


class Features:
    """Window vectors, their owners and the rule groups of every row, computed once through the shipped int8 path."""

    def __init__(self, rows: list[dict]):
        texts = [r["text"] for r in rows]
        self.feats, self.owner = window_features(feature_session(), texts)
        self.rules = np.stack([rule_features(t) for t in texts])
        self.y = np.array([r["y"] for r in rows])
        self.source = np.array([r["source"] for r in rows])

    def subset(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(window vectors, owners renumbered 0..len(idx)-1, rule groups) of the rows `idx` (sorted)."""
        keep = np.isin(self.owner, idx)
        return self.feats[keep], np.searchsorted(idx, self.owner[keep]), self.rules[idx]


def fit(data: Features, idx: np.ndarray, rules: bool = True) -> dict[str, np.ndarray]:
    """The head fit on rows `idx`: weighted binary cross-entropy + L2 on w, L-BFGS in float64 (deterministic)."""
    torch.manual_seed(0)
    feats, owner, rule_x = data.subset(idx)
    mean, scale = feats.mean(0), feats.std(0) + 1e-6
    z = torch.from_numpy((feats - mean) / scale)
    own = torch.from_numpy(owner)
    r = torch.from_numpy(rule_x if rules else np.zeros_like(rule_x))
    y = torch.from_numpy(data.y[idx].astype(np.float64))
    weight = sample_weights(data.source[idx], data.y[idx])
    wt = torch.from_numpy(weight / weight.sum())
    w = torch.zeros(DIM, dtype=torch.float64, requires_grad=True)
    v = torch.zeros(len(RULE_GROUPS), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, v, b], max_iter=MAX_ITER, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        best = torch.full((len(idx),), -torch.inf, dtype=torch.float64).scatter_reduce(0, own, z @ w, reduce="amax")
        logits = best + r @ v + b
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * wt).sum()
        loss = loss + L2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    tensors = {"mean": mean, "scale": scale, "w": w.detach().numpy(), "v": v.detach().numpy(), "b": b.detach().numpy()}
    if not rules:
        tensors["v"] = np.zeros(len(RULE_GROUPS))
    # float32 as shipped, so the numbers below are the shipped file's
    return {k: np.asarray(t, dtype=np.float32).astype(np.float64) for k, t in tensors.items()}


def predict(data: Features, tensors: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
    feats, owner, rules = data.subset(idx)
    return head_probabilities(tensors, feats, owner, rules, len(idx)) >= THRESHOLD


def scored(y, predicted) -> dict:
    return {k: round(v, ROUND) if isinstance(v, float) else v for k, v in binary_metrics(y, predicted).items()}


def loso(data: Features, rows: list[dict]) -> dict:
    """Per held-out source: rules, head alone and both, on all its rows and on its `test` rows; then the worst."""
    split = np.array([r["split"] for r in rows])
    dev = split == "dev"
    out = {}
    for source in sorted(set(data.source.tolist())):
        held = data.source == source
        train = np.flatnonzero(~held)
        both, head = fit(data, train), fit(data, train, rules=False)
        block = {}
        for part, mask in (("all", held), ("test", held & ~dev)):
            idx = np.flatnonzero(mask)
            y = data.y[idx]
            block[part] = {
                "rules": scored(y, data.rules[idx].max(1) > 0),
                "head": scored(y, predict(data, head, idx)),
                "both": scored(y, predict(data, both, idx)),
                # added after the first leave-one-source-out run had been seen: a candidate, not the shipped form
                "rules_or_head": scored(y, (data.rules[idx].max(1) > 0) | predict(data, head, idx)),
            }
        out[source] = block
        print(f"[loso] {source}: {json.dumps(block['all'])}", file=sys.stderr, flush=True)
    worst = {
        part: {
            variant: {k: min(out[s][part][variant][k] for s in out) for k in ("accuracy", "precision", "recall")}
            for variant in ("rules", "head", "both", "rules_or_head")
        }
        for part in ("all", "test")
    }
    return {"by_source": out, "worst": worst}


def build() -> tuple[dict[str, np.ndarray], dict]:
    rows = load_rows()
    data = Features(rows)
    split = np.array([r["split"] for r in rows])
    shipped = fit(data, np.flatnonzero(split == "dev"))
    test = np.flatnonzero(split == "test")
    predicted = predict(data, shipped, test)
    by_source = {
        s: scored(data.y[test][data.source[test] == s], predicted[data.source[test] == s])
        for s in sorted(set(data.source.tolist()))
    }
    rules_test = data.rules[test].max(1) > 0
    meta = {
        "architecture": ARCH,
        "data": {
            "responses_sha256": sha256_file(RESPONSES),
            "labels_sha256": sha256_file(LABELS),
            "project_sha256": sha256_file(REFUSAL_DATA),
            "styles_sha256": sha256_file(STYLES),
            "smollm2_sha256": sha256_file(SMOLLM2),
            "rows": {s: int((data.source == s).sum()) for s in sorted(set(data.source.tolist()))},
            "windows": len(data.feats),
        },
        "training": {"l2": L2, "max_iter": MAX_ITER, "rows": "dev split of every source", "threshold": THRESHOLD},
        "selection": "L2 chosen on a leave-one-family-out run over the dev split only; all else fixed a priori",
        "weights": {
            "v": dict(zip(RULE_GROUPS, np.round(shipped["v"], ROUND).tolist(), strict=True)),
            "b": round(float(shipped["b"][0]), ROUND),
        },
        "in_distribution_test": {
            "both": scored(data.y[test], predicted),
            "rules": scored(data.y[test], rules_test),
            "by_source": by_source,
        },
        "leave_one_source_out": loso(data, rows),
    }
    return shipped, meta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = parser.parse_args()
    tensors, meta = build()
    if args.check:
        shipped = load_file(str(REFUSAL_HEAD))
        diffs = differences(json.loads(Path(REFUSAL_META).read_text(encoding="utf-8")), meta)
        max_diff = max(float(np.abs(shipped[k] - v).max()) for k, v in tensors.items())
        print(json.dumps({"metadata_differences": diffs, "max_tensor_difference": max_diff}))
        return 0 if not diffs and max_diff < 1e-4 else 1
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(REFUSAL_HEAD))
    os.chmod(REFUSAL_HEAD, 0o644)  # safetensors writes 0600
    Path(REFUSAL_META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    summary = {
        "in_distribution_test": meta["in_distribution_test"]["both"],
        "loso_worst": meta["leave_one_source_out"]["worst"],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
