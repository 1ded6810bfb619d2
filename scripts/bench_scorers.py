"""Time the judges on 1,000 answers of about 100 words (refusal and toxicity together), against a baseline.

    python scripts/bench_scorers.py [--n 1000] [--words 100]

The baseline, in the same run, is the previous toxicity judge's cost: embedding every window with the full
six-layer all-MiniLM-L6-v2 in fp32 (its logistic-regression head on top took well under 1% of the time).
The learned refusal judge (`selfalign.eval.refusal`, measured but not yet what `refusal_detect` calls) is timed
beside the rules. Answers are drawn (seeded) from real-looking sentences, a few of them refusals or insults, so
every rule and both scorers do their usual work. Prints JSON; the target is at most 30 s for both judges.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from selfalign.eval.embedder import embed
from selfalign.eval.metrics import max_over_windows, refusal_detect, toxicity_scores
from selfalign.eval.refusal import shipped_judge

SENTENCES = [
    "Rust gives you memory safety without a garbage collector, which matters for latency.",
    "Go compiles quickly and its goroutines make concurrent servers simple to write.",
    "The sky looks blue because shorter wavelengths scatter more in the atmosphere.",
    "Nuclear power is low-carbon, but waste storage and cost remain open questions.",
    "Start with a small budget, track every expense for a month, then cut the largest leak.",
    "Critics argue the evidence is mixed, while supporters point to long-term studies.",
    "I can't help with that, but a pharmacist can explain safe dosing.",
    "You're a worthless idiot and nobody wants you here.",
    "Claim: the policy reduced emissions. Evidence: two independent audits. Next steps: publish the data.",
    "Water the tomatoes in the evening and mulch the beds to keep the soil moist.",
]


def answers(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = []
        while len(" ".join(text).split()) < words:
            text.append(rng.choice(SENTENCES))
        out.append(" ".join(" ".join(text).split()[:words]))
    return out


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--words", type=int, default=100)
    args = parser.parse_args()
    texts = answers(args.n, args.words)
    start = time.perf_counter()
    toxicity_scores(texts[:8])  # build the int8 scorer once per process
    build_s = time.perf_counter() - start
    embed(texts[:8])  # load the embedder
    shipped_judge()(texts[:8])  # build the learned refusal judge's int8 encoder once
    refusal_s = timed(lambda t: [refusal_detect(x) for x in t], texts)
    learned_s = timed(shipped_judge(), texts)
    toxicity_s = timed(toxicity_scores, texts)
    baseline_s = timed(lambda t: max_over_windows(t, lambda w: embed(w)[:, 0]), texts)
    print(
        json.dumps(
            {
                "answers": args.n,
                "words_each": args.words,
                "refusal_s": round(refusal_s, 2),
                "toxicity_s": round(toxicity_s, 2),
                "both_s": round(refusal_s + toxicity_s, 2),
                "learned_refusal_s": round(learned_s, 2),
                "both_with_learned_refusal_s": round(learned_s + toxicity_s, 2),
                "target_s": 30.0,
                "scorer_build_once_s": round(build_s, 2),
                "baseline_toxicity_six_layer_fp32_s": round(baseline_s, 2),
                "speedup_over_baseline": round(baseline_s / toxicity_s, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
