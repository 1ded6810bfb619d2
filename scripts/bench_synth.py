"""Benchmark synthetic-data generation: the local teacher at several batch sizes, same teacher and chunk.

Generates the same planned chunk (same tasks, same sampling seed) once per teacher batch size
(`--batches`, default 1,8,32: the first is the baseline) and prints one JSON object with rows/minute
for each and the speed-up over the baseline.

    python scripts/bench_synth.py [--persona neutral_concise] [--tasks 16] [--batches 1,8,32] [--model smollm2_135m]
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persona", default="neutral_concise")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--batches", default="1,8,32", help="teacher batch sizes; the first is the baseline")
    parser.add_argument("--model", default="smollm2_135m")
    args = parser.parse_args()

    import torch

    from selfalign.config import PROJECT_ROOT
    from selfalign.dataops.synth import generate_chunk, plan_chunk, section_asks
    from selfalign.dataops.teacher import LocalTeacher
    from selfalign.persona.schema import load_persona
    from selfalign.runtime.loader import load_base

    persona, _ = load_persona(str(Path(PROJECT_ROOT) / "personas" / f"{args.persona}.yaml"))
    handle = load_base(args.model, device="cpu")
    tasks, sampling = plan_chunk(persona, 0, 42, args.tasks, 0)
    result = {
        "persona": persona["id"],
        "model": handle.name,
        "tasks": len(tasks),
        "torch_threads": torch.get_num_threads(),
        "asks": sum(len(section_asks(persona, t)) for t in tasks),
    }
    batches = [int(b) for b in args.batches.split(",")]
    outputs = {}
    for batch in batches:
        teacher = LocalTeacher(handle, batch_size=batch)
        start = time.perf_counter()
        rows = generate_chunk(persona, persona["id"], teacher, tasks, sampling)
        seconds = time.perf_counter() - start
        outputs[batch] = rows
        result[f"batch{batch}_seconds"] = round(seconds, 2)
        result[f"batch{batch}_rows_per_min"] = round(len(rows) / seconds * 60, 2)
    base = result[f"batch{batches[0]}_rows_per_min"]
    for batch in batches[1:]:
        result[f"batch{batch}_speedup"] = round(result[f"batch{batch}_rows_per_min"] / base, 2)
        same = sum(a["output"] == b["output"] for a, b in zip(outputs[batches[0]], outputs[batch], strict=True))
        result[f"batch{batch}_identical_outputs"] = f"{same}/{len(tasks)}"  # another batch shape draws other tokens
    print(json.dumps(result))


if __name__ == "__main__":
    main()
