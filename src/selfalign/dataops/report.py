"""The synth quality report: histograms, per-filter rejections, hashes, and a PNG of the histograms."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from selfalign.dataops.filter import is_refusal_row


def histogram(values: list[float], bins: int | list[float]) -> dict:
    counts, edges = np.histogram(np.asarray(values, dtype=float), bins=bins)
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}


def build_report(rows: list[dict], drops: dict, raw: int) -> dict:
    """Everything about a dataset that is computed from its rows and the run's drop counts."""
    lengths = [r["metadata"]["quality_scores"]["len"] for r in rows]
    styles = [r["metadata"]["quality_scores"].get("style", 0.0) for r in rows]
    refusals = [is_refusal_row(r) for r in rows]
    domains = Counter(r["metadata"]["domain"] for r in rows)
    refusal_by_domain = Counter(r["metadata"]["domain"] for r, ref in zip(rows, refusals, strict=True) if ref)
    hard = sum(v for k, v in drops.items() if k.startswith("hard:"))
    policy = Counter(
        tag for r in rows for tag in r["metadata"].get("safety_tags", []) if tag.startswith(("redline:", "near-miss:"))
    )
    return {
        "rows": len(rows),
        "raw_rows": raw,
        "acceptance_rate": round(len(rows) / raw, 4) if raw else 0.0,
        "hard_filter_rejection_rate": round(hard / raw, 4) if raw else 0.0,
        "rejections": dict(sorted(drops.items())),
        "refusal_fraction": round(sum(refusals) / len(rows), 4) if rows else 0.0,
        "refusal_fraction_by_domain": {d: round(refusal_by_domain[d] / c, 4) for d, c in sorted(domains.items())},
        "domains": dict(sorted(domains.items())),
        # refusal rows and their benign near-miss counterparts, per redline category
        "policy_rows": dict(sorted(policy.items())),
        "difficulty": dict(sorted(Counter(r["metadata"]["difficulty"] for r in rows).items())),
        "histograms": {
            "length_words": histogram(lengths, bins=[0, 10, 20, 40, 60, 80, 120, 160, 240, 320, 1000]),
            "style_score": histogram(styles, bins=[-1.0, 0.0, 0.2, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]),
            "refusal": {"refusal": int(sum(refusals)), "answered": int(len(rows) - sum(refusals))},
        },
        "length_words_mean": round(float(np.mean(lengths)), 2) if rows else 0.0,
        "style_score_mean": round(float(np.mean(styles)), 4) if rows else 0.0,
    }


def plot_report(report: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, label in (
        (axes[0], "length_words", "answer length (words)"),
        (axes[1], "style_score", "style score (cosine to centroid)"),
    ):
        h = report["histograms"][key]
        widths = np.diff(h["edges"])
        ax.bar(h["edges"][:-1], h["counts"], width=widths, align="edge", edgecolor="black")
        ax.set_xlabel(label)
        ax.set_ylabel("rows")
    domains = report["domains"]
    axes[2].bar(list(domains), list(domains.values()), color="tab:gray")
    axes[2].set_title(f"refusal fraction {report['refusal_fraction']:.2%}")
    axes[2].tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
