"""The learning-rate schedule shared by the trainer (train/loop.py) and the digits experiments: linear
warm-up, then cosine decay, step decay, or constant."""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "learning_rate", "lr_factor"]

SCHEDULES = ("cosine", "step", "constant")


def learning_rate(
    step: int,
    *,
    base: float = 1.0,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    min_ratio: float = 0.0,
    milestones: list[int] | None = None,
    gamma: float = 0.1,
) -> float:
    """The learning rate of optimiser step ``step`` (0-based) for base rate ``base``: linear warm-up from
    ``base/warmup`` to ``base``, then cosine to ``base * min_ratio``, step decay by ``gamma`` at
    ``milestones``, or constant.

    ``base`` multiplies inside each formula (``base * (step + 1) / warmup``), the order the digits
    experiments always used; with ``base=1`` the value is :func:`lr_factor`'s, which ``LambdaLR`` multiplies
    by its own base rate. Both orders are kept so every recorded run's numbers stay bit-identical.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if schedule == "step":
        return base * gamma ** sum(1 for m in (milestones or []) if step >= m)
    return base * 1.0


def lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    min_ratio: float = 0.0,
    milestones: list[int] | None = None,
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base learning rate for optimiser step ``step``: :func:`learning_rate` with
    ``base=1`` (what ``torch.optim.lr_scheduler.LambdaLR`` takes)."""
    return learning_rate(
        step,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        schedule=schedule,
        min_ratio=min_ratio,
        milestones=milestones,
        gamma=gamma,
    )
