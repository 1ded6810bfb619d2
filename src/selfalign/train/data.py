"""SFT rows from the synth JSONL to padded tensors: validation, seeded 90/10 split, label masking, resumable order.

Each row is rendered with the runtime's one chat rendering (`render_example`), so training sees the
exact text inference sends. Labels are -100 on the prompt part and on padding: the loss covers only the
assistant's tokens, its closing `<|im_end|>` included (pad equals eos on SmolLM2, so masking by pad id
would drop it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler

from selfalign.dataops.filter import is_policy_row
from selfalign.errors import SelfAlignError
from selfalign.runtime.chat import render_example
from selfalign.utils.hashing import sha256_json
from selfalign.utils.io import iter_jsonl

IGNORE = -100


def sft_prompt(row: dict) -> str:
    """The user turn of a row: the instruction, then its input (if any) after a blank line."""
    return f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]


def load_sft_rows(path: str | Path, persona_id: str) -> list[dict]:
    """Every row of an SFT JSONL, checked; a bad line is refused with its line number."""
    path = Path(path)
    if not path.is_file():
        raise SelfAlignError(f"data={path}: no such file (run stage=synth first, or pass data=<file.jsonl>)")
    rows = []
    try:
        for lineno, row in iter_jsonl(path):
            rows.append(check_row(row, f"{path}:{lineno}", persona_id))
    except ValueError as exc:  # a line that is not JSON
        raise SelfAlignError(str(exc)) from None
    if not rows:
        raise SelfAlignError(f"{path}: no rows; the SFT dataset is empty")
    return rows


def check_row(row, where: str, persona_id: str) -> dict:
    """One SFT row as the synth stage writes it, for `persona_id`; else a SelfAlignError naming `where`."""
    if not isinstance(row, dict):
        raise SelfAlignError(f"{where}: a row must be a JSON object")
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise SelfAlignError(f"{where}: field {key!r} must be a non-empty string")
    if not isinstance(row.get("input", ""), str):
        raise SelfAlignError(f"{where}: field 'input' must be a string")
    if row.get("persona_id") != persona_id:
        raise SelfAlignError(
            f"{where}: row belongs to persona_id {row.get('persona_id')!r}, "
            f"but this run trains persona {persona_id!r} (pick the matching persona= or data=)"
        )
    return row


@dataclass
class TokenStats:
    rows: int = 0
    truncated: int = 0  # rows cut at max_seq_len (their answer tail is lost)
    dropped: int = 0  # rows whose prompt alone filled max_seq_len: no answer token left to learn
    tokens: int = 0
    label_tokens: int = 0


def tokenize_row(tokenizer, row: dict, max_len: int) -> dict:
    """input_ids and labels (prompt masked) for one row, truncated to `max_len`."""
    head, full = render_example(tokenizer, sft_prompt(row), row["output"])
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    if ids[: len(head_ids)] != head_ids:
        raise ValueError("tokenizing the prompt alone and inside the full example disagree")
    labels = [IGNORE] * len(head_ids) + ids[len(head_ids) :]
    return {
        "input_ids": ids[:max_len],
        "labels": labels[:max_len],
        "truncated": len(ids) > max_len,
    }


def _has_labels(row: dict) -> bool:
    return any(x != IGNORE for x in row["labels"])


def pad_batch(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding is masked out of attention and labels."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch that can start part-way in, so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        skip, self.skip = self.skip, 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.n


class ResumableBatches:
    """A data module's training order that a checkpoint can resume mid-epoch: a seeded permutation per epoch, and
    the micro-batches already trained skipped on resume. Subclasses set `micro_batch_size` and `_loader`."""

    _resume_batches = 0  # micro-batches of the current epoch already trained (from a checkpoint)
    sampler: ResumableSampler | None = None

    def _resumable_loader(self, rows, seed: int) -> DataLoader:
        self.sampler = ResumableSampler(len(rows), seed)
        skip = self._resume_batches * self.micro_batch_size
        self.sampler.skip = skip if skip < len(rows) else 0  # saved after an epoch's last batch
        self._resume_batches = 0
        return self._loader(rows, self.sampler)

    def state_dict(self) -> dict:
        """Where in the epoch a checkpoint was taken, so resuming skips exactly the trained micro-batches."""
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches": progress.ready}

    def load_state_dict(self, state: dict) -> None:
        self._resume_batches = int(state.get("batches", 0))


class SFTDataModule(ResumableBatches, pl.LightningDataModule):
    """The dataset (`datasets.Dataset`), split 90/10 by seed, tokenised once; batches in a resumable order."""

    def __init__(
        self,
        rows: list[dict],
        tokenizer,
        *,
        max_seq_len: int,
        micro_batch_size: int,
        val_fraction: float,
        seed: int,
        policy_repeat: int = 1,
    ):
        super().__init__()
        if len(rows) < 2:
            raise SelfAlignError(f"need at least 2 SFT rows to hold out a validation split (got {len(rows)})")
        self.rows, self.tokenizer = rows, tokenizer
        self.max_seq_len, self.micro_batch_size = max_seq_len, micro_batch_size
        self.val_fraction, self.seed, self.policy_repeat = val_fraction, seed, policy_repeat
        self.stats = TokenStats()
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from datasets import Dataset, disable_progress_bars

        disable_progress_bars()  # one rich progress display for the run, not a bar per map/filter
        keep = ("id", "instruction", "input", "output")
        ds = Dataset.from_list([{k: str(r.get(k, "")) for k in keep} | {"policy": is_policy_row(r)} for r in self.rows])
        n_val = max(1, round(len(ds) * self.val_fraction))
        split = ds.train_test_split(test_size=n_val, seed=self.seed, shuffle=True)
        train = split["train"]
        if self.policy_repeat > 1:  # the policy rows again, after the split: none leaks into validation
            again = [i for i, policy in enumerate(train["policy"]) if policy]
            train = train.select(list(range(len(train))) + again * (self.policy_repeat - 1))
        self.train_set, self.val_set = self._tokenize(train), self._tokenize(split["test"])
        if not len(self.train_set) or not len(self.val_set):
            raise SelfAlignError(
                f"every row's prompt is longer than lora.max_seq_len={self.max_seq_len} tokens; raise it"
            )

    def _tokenize(self, ds):
        # An explicit fingerprint: left to itself, `datasets` hashes the function by pickling everything it
        # reaches (the tokenizer, and through `self` the trainer and the model): 5.8 s vs 0.34 s setup on SmolLM2.
        key = sha256_json([list(ds["id"]), self.max_seq_len, self.tokenizer.name_or_path, len(self.tokenizer)])[:16]
        out = ds.map(
            lambda r: tokenize_row(self.tokenizer, r, self.max_seq_len),
            remove_columns=ds.column_names,
            new_fingerprint=f"sft-tokens-{key}",
        )
        before = len(out)
        out = out.filter(_has_labels, new_fingerprint=f"sft-labelled-{key}")
        self.stats.rows += before
        self.stats.dropped += before - len(out)
        self.stats.truncated += sum(out["truncated"])
        self.stats.tokens += sum(len(x) for x in out["input_ids"])
        self.stats.label_tokens += sum(sum(1 for t in x if t != IGNORE) for x in out["labels"])
        return out.with_format(None, columns=["input_ids", "labels"])

    def _loader(self, ds, sampler=None) -> DataLoader:
        pad_id = self.tokenizer.pad_token_id
        return DataLoader(
            ds,
            batch_size=self.micro_batch_size,
            sampler=sampler,
            collate_fn=lambda b: pad_batch(b, pad_id),
            # Its own generator: each new iterator draws a seed from it, which would otherwise shift the
            # global RNG (and so LoRA dropout) between an uninterrupted and a resumed run.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._resumable_loader(self.train_set, self.seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)
