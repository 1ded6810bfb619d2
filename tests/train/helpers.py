"""SFT rows for training tests: varied instructions and structured answers, as stage=synth writes them."""

from __future__ import annotations

import json
from pathlib import Path

TOPICS = [
    "tides",
    "vaccines",
    "compilers",
    "inflation",
    "photosynthesis",
    "TCP",
    "glaciers",
    "bread",
    "chess",
    "batteries",
]


def sft_rows(n: int, persona_id: str = "neutral-concise") -> list[dict]:
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        rows.append(
            {
                "id": f"sft-{i:06d}",
                "persona_id": persona_id,
                "instruction": f"Explain {topic} briefly for a reader who asked question {i}.",
                "input": "",
                "output": f"## Answer\n{topic.capitalize()}: a short neutral summary, case {i}.\n"
                "## Caveats\nDetails vary.",
                "metadata": {"source": "test"},
            }
        )
    return rows


def write_sft(path: Path, n: int = 40, persona_id: str = "neutral-concise") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(n, persona_id)), encoding="utf-8")
    return path
