"""The run's JSONL event log: one `{"ts": ..., "event": ..., ...}` object per line."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class EventLog:
    """Appends events to `<run_dir>/<name>`; each line is written and flushed whole."""

    def __init__(self, run_dir: str | os.PathLike, name: str = EVENTS_FILE):
        self.path = Path(run_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def event(self, event: str, **fields: Any) -> dict:
        record = {"ts": utc_now(), "event": event, **fields}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        return record
