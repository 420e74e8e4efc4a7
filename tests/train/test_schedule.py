"""One LR schedule for the trainer and the digits experiments, bit-identical to the two it replaced."""

from __future__ import annotations

import math

import pytest

from kprpe.train.schedule import learning_rate, lr_factor


# The two implementations as they were before train/schedule.py (train/loop.py, experiments/digits.py),
# frozen here: recorded runs depend on their exact numbers.
def _old_trainer_factor(
    step, *, total_steps, warmup_steps, schedule, min_ratio=0.0, milestones=None, gamma=0.1
):
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return gamma ** sum(1 for m in (milestones or []) if step >= m)
    return 1.0


def _old_digits_cosine(step, total, warmup, base):
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def _old_digits_converge(step, warmup, base, scale):
    return base * scale * (min(1.0, (step + 1) / warmup) if warmup else 1.0)


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 7, 30])
@pytest.mark.parametrize("min_ratio", [0.0, 0.05])
def test_trainer_factor_is_unchanged(schedule, warmup, min_ratio):
    kw = dict(total_steps=97, warmup_steps=warmup, schedule=schedule, min_ratio=min_ratio)
    for step in range(120):  # past total_steps too (a resumed run with a raised max_steps)
        new = lr_factor(step, **kw, milestones=[40, 80], gamma=0.3)
        assert new == _old_trainer_factor(step, **kw, milestones=[40, 80], gamma=0.3), step


@pytest.mark.parametrize("base", [1e-3, 3e-3, 5e-4, 0.1])  # digits' default, QUICK_LR, others
@pytest.mark.parametrize("warmup", [0, 1, 13, 240])
def test_digits_rates_are_unchanged(base, warmup):
    total = 1200
    for step in range(total):
        cosine = learning_rate(step, base=base, total_steps=total, warmup_steps=warmup, schedule="cosine")
        assert cosine == _old_digits_cosine(step, total, warmup, base), step
        for scale in (1.0, 0.1, 0.01):
            constant = (
                base * scale * lr_factor(step, total_steps=total, warmup_steps=warmup, schedule="constant")
            )
            assert constant == _old_digits_converge(step, warmup, base, scale), step


def test_the_two_orders_differ_somewhere():
    """Why ``base`` multiplies inside: ``base * (s + 1) / w`` and ``base * ((s + 1) / w)`` can round
    differently."""
    diffs = [
        s
        for s in range(240)
        if learning_rate(s, base=3e-3, total_steps=1000, warmup_steps=240, schedule="cosine")
        != 3e-3 * lr_factor(s, total_steps=1000, warmup_steps=240, schedule="cosine")
    ]
    assert diffs


def test_shape_of_the_schedule():
    f = lambda s, **kw: learning_rate(s, base=2.0, total_steps=100, warmup_steps=10, **kw)  # noqa: E731
    assert f(0, schedule="cosine") == pytest.approx(0.2) and f(9, schedule="cosine") == 2.0
    assert f(100, schedule="cosine", min_ratio=0.1) == pytest.approx(0.2)
    assert f(50, schedule="step", milestones=[50], gamma=0.5) == 1.0
    assert f(50, schedule="constant") == 2.0
