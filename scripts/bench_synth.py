"""Benchmark synthetic-data generation: batched teacher calls against one prompt at a time, same teacher.

Generates the same planned chunk (same tasks, same sampling seed) twice with the local teacher, once
with every section ask of the chunk batched (`--batch`, default 32) and once with batch size 1, and
prints one JSON object with rows/minute for both and the speed-up.

    python scripts/bench_synth.py [--persona neutral_concise] [--tasks 16] [--batch 32] [--model smollm2_135m]
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
    parser.add_argument("--batch", type=int, default=32)
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
    outputs = {}
    for label, batch in (("batched", args.batch), ("sequential", 1)):
        teacher = LocalTeacher(handle, batch_size=batch)
        start = time.perf_counter()
        rows = generate_chunk(persona, persona["id"], teacher, tasks, sampling)
        seconds = time.perf_counter() - start
        outputs[label] = rows
        result[f"{label}_batch_size"] = batch
        result[f"{label}_seconds"] = round(seconds, 2)
        result[f"{label}_rows_per_min"] = round(len(rows) / seconds * 60, 2)
    result["speedup"] = round(result["batched_rows_per_min"] / result["sequential_rows_per_min"], 2)
    same = sum(a["output"] == b["output"] for a, b in zip(outputs["batched"], outputs["sequential"], strict=True))
    result["identical_outputs"] = f"{same}/{len(tasks)}"  # sampling with another batch shape draws other tokens
    print(json.dumps(result))


if __name__ == "__main__":
    main()
