"""`stage=train` on the bundled SmolLM2-135M through the CLI: it learns, and the adapter attaches to the base."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_dirs
from tests.train.helpers import write_sft

pytestmark = pytest.mark.slow


def test_bundled_model_trains_and_its_adapter_changes_the_base(cli, tmp_path):
    data = write_sft(tmp_path / "sft.jsonl", 20)
    proc = cli(
        "stage=train",
        f"data={data}",
        f"paths.adapters_dir={tmp_path}/adapters",
        "tracking.enabled=false",
        "lora.lr=1e-3",
        "lora.micro_batch_size=2",
        "trainer.accumulate_grad_batches=1",
        "trainer.max_steps=6",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path, "train")
    losses = [
        json.loads(x)["loss"] for x in (run_dir / "train_metrics.jsonl").read_text().splitlines() if '"train_step"' in x
    ]
    assert len(losses) == 6 and losses[-1] < losses[0]  # the templated answers get easier to predict
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert 0 < summary["val_loss"] < 3 and summary["tokens_per_s"] > 0

    from selfalign.runtime.loader import apply_adapter, load_base
    from selfalign.runtime.lora import route

    handle = load_base("smollm2_135m", "cpu")
    batch = handle.tokenizer(["Explain glaciers briefly for a reader who asked question 3."], return_tensors="pt")
    with torch.inference_mode():
        base = handle.model(**batch).logits
    apply_adapter(handle, summary["adapter_dir"], root=tmp_path / "adapters")
    with torch.inference_mode(), route(handle, [handle.active]) as (model, extra):  # its rows on the adapter
        adapted = model(**batch, **extra).logits
    assert (adapted - base).abs().max() > 0.1
