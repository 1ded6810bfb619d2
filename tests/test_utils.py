"""Atomic writes, the JSONL event log, hashing and seeding."""

from __future__ import annotations

import json
import os
import random
import re

import pytest

from selfalign.utils.hashing import sha256_file, sha256_json
from selfalign.utils.io import atomic_write_text, read_jsonl, write_jsonl
from selfalign.utils.logging import EventLog
from selfalign.utils.seed import set_global_seed


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert os.listdir(path.parent) == ["a.txt"]


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "old")

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        atomic_write_text(path, Boom())  # not a str: the write fails midway
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.json"]


def test_jsonl_roundtrip_and_bad_line(tmp_path):
    rows = [{"id": 1, "text": "héllo"}, {"id": 2}]
    path = tmp_path / "rows.jsonl"
    write_jsonl(rows, path)
    assert read_jsonl(path) == rows
    path.write_text(path.read_text() + "{oops\n")
    with pytest.raises(ValueError, match=r"rows\.jsonl:3: not valid JSON"):
        read_jsonl(path)
    path.write_bytes(b'{"id": 1}\n{"text": "caf' + b"\xe9" + b'"}\n')  # latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 14\)"):
        read_jsonl(path)


def test_event_log_format(tmp_path):
    log = EventLog(tmp_path)
    log.event("train_step", step=500, loss=1.23, lr=0.00012)
    log.event("done")
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "train_step" and lines[0]["step"] == 500 and lines[0]["loss"] == 1.23
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", lines[0]["ts"])
    assert [x["event"] for x in lines] == ["train_step", "done"]


def test_hashes(tmp_path):
    assert sha256_json({"b": 1, "a": [1, 2]}) == sha256_json({"a": [1, 2], "b": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_seed_makes_python_numpy_and_torch_repeat():
    import numpy as np
    import torch

    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    set_global_seed(7)
    first = draw()
    set_global_seed(7)
    assert draw() == first
    set_global_seed(8)
    assert draw() != first
