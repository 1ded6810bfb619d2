"""The LR schedule: linear warmup over 5% of the steps, then cosine decay to zero."""

from __future__ import annotations

import math

import pytest

from selfalign.train.module import warmup_cosine


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(100, 0.05)
    assert [f(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f(5) == pytest.approx(1.0)
    assert f(52) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(5, 100))


def test_constant_schedule_and_no_warmup():
    assert warmup_cosine(10, 0.2, "constant")(9) == 1.0
    f = warmup_cosine(10, 0.0)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5)
