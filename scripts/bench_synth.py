"""Benchmark `stage=synth` as a user runs it: accepted rows per minute, this checkout against a baseline, same run.

For each persona, runs `python -m selfalign stage=synth persona=<p> synth.n=<n> tracking=none` twice, once on this
checkout and once on a baseline checkout (`--baseline-rev`, extracted with `git archive`, or `--baseline-src`, the
`src/` of another checkout), each with its own defaults, the same seed and empty output folders. Prints one JSON
object: per persona and side, accepted rows/min (the synth report's own count over its wall time), raw rows,
acceptance rate and drops by reason, and the speed-up.

    python scripts/bench_synth.py [--personas neutral_concise,socratic_skeptical] [--n 48]
        [--baseline-rev dffada8 | --baseline-src /path/to/old/checkout/src]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The last commit before the synth speed-up: batched HF generate at 48-80 tokens per section.
DEFAULT_BASELINE = "dffada8"


def log(msg: str) -> None:
    print(f"[bench_synth] {msg}", file=sys.stderr, flush=True)


def checkout(rev: str, into: Path) -> Path:
    """`rev` of this repository extracted into `into`; its `src/`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def synth(src: Path, persona: str, n: int, tmp: Path) -> dict:
    out, run = tmp / f"{persona}.jsonl", tmp / f"run-{persona}"
    args = [sys.executable, "-m", "selfalign", "stage=synth", f"persona={persona}", f"synth.n={n}"]
    args += [f"synth.out={out}", "tracking=none", f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"synth failed ({src}): {proc.stderr[-2000:]}")
    report = json.loads((run / "synth_report.json").read_text())
    return {
        "raw_rows": report["raw_rows"],
        "acceptance_rate": report["acceptance_rate"],
        "rows_per_min": report["rows_per_minute"],
        "wall_s": round(wall, 1),
        "drops": report["rejections"],
        "sha256": report["sha256"][:16],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--personas", default="neutral_concise,socratic_skeptical")
    parser.add_argument("--n", type=int, default=48, help="accepted rows per run")
    parser.add_argument("--baseline-rev", default=DEFAULT_BASELINE, help="a commit of this repository")
    parser.add_argument("--baseline-src", type=Path, help="instead: the src/ of another checkout")
    args = parser.parse_args()

    result: dict = {"n": args.n, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench_synth-") as tmp_s:
        tmp = Path(tmp_s)
        base_src = args.baseline_src.resolve() if args.baseline_src else checkout(args.baseline_rev, tmp / "baseline")
        result["baseline"] = str(args.baseline_src or args.baseline_rev)
        for persona in args.personas.split(","):
            entry = {}
            for side, src in (("baseline", base_src), ("this", ROOT / "src")):
                work = tmp / f"{side}-{persona}"
                work.mkdir()
                log(f"{persona}: {side} ...")
                entry[side] = synth(src, persona, args.n, work)
                log(f"{persona}: {side} {entry[side]['rows_per_min']} rows/min")
            entry["speedup"] = round(entry["this"]["rows_per_min"] / entry["baseline"]["rows_per_min"], 2)
            result[persona] = entry
    print(json.dumps(result))


if __name__ == "__main__":
    main()
