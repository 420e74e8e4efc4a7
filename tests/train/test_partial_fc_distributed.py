"""A partial-FC step on 2 gloo processes (sampled centres, uneven shards) equals a single-process reference.

The reference is written independently of PartialFC: one process holds all class centres, takes the columns
the ranks sampled, and computes ArcFace logits (straight-through margin) and ``F.cross_entropy`` on the global
batch; then one plain SGD step (no Adam normalisation, which would hide a wrongly scaled gradient).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kprpe.train.heads import PartialFC, build_margin, class_shard, init_class_centres
from process_group import free_port, join_group

CLASSES, DIM, BATCH_PER_RANK, WORLD = 1001, 64, 8, 2  # 1001 over 2: shards of 501 and 500
SCALE, MARGIN, RATE, LR, SEED = 16.0, 0.5, 0.3, 0.5, 3


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(BATCH_PER_RANK * WORLD, DIM, generator=g)
    labels = torch.randint(0, CLASSES, (BATCH_PER_RANK * WORLD,), generator=g)
    labels[1] = labels[0]  # two samples of one class
    return x, labels


def _worker(rank: int, port: int, out: str) -> None:
    join_group(rank, WORLD, port)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        head = PartialFC(
            DIM, CLASSES, build_margin("arcface", scale=SCALE, margin=MARGIN), sample_rate=RATE, seed=SEED
        )
        optimizer = torch.optim.SGD(head.parameters(), lr=LR)
        x, labels = _global_batch()
        rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        mine = x[rows].clone().requires_grad_(True)
        loss, _ = head(mine, labels[rows])
        loss.backward()
        grad = head.weight.grad.clone()
        optimizer.step()
        save_file(
            {
                "loss": loss.detach().reshape(1),
                "sampled": head.last_sampled + head.class_start,
                "weight_grad": grad,
                "weight": head.weight.detach().contiguous(),
                "x_grad": mine.grad,
            },
            os.path.join(out, f"rank{rank}.safetensors"),
        )
    finally:
        dist.destroy_process_group()


def _reference(columns: torch.Tensor):
    """Loss, dense centre gradient, embedding gradient, updated centres and the bounds' ingredients."""
    x, labels = _global_batch()
    x = x.clone().requires_grad_(True)
    centres = torch.nn.Parameter(init_class_centres(0, CLASSES, DIM, SEED))
    target = torch.searchsorted(columns, labels)
    assert torch.equal(columns[target], labels)  # every positive was sampled
    cos = (F.normalize(x, dim=1) @ F.normalize(centres[columns], dim=1).t()).clamp(-1, 1)
    onehot = F.one_hot(target, columns.numel()).bool()
    margined = torch.cos(torch.acos(cos) + MARGIN)
    logits = SCALE * torch.where(onehot, cos + (margined - cos).detach(), cos)  # straight-through margin
    loss = F.cross_entropy(logits, target)
    loss.backward()
    updated = centres.detach() - LR * centres.grad
    p_minus_y = (logits.softmax(1) - onehot.float()).detach().abs()
    return (
        loss.detach(),
        centres.grad,
        x.grad,
        updated,
        (x.detach(), centres.detach()[columns], cos.detach(), p_minus_y),
    )


@pytest.mark.slow  # two spawned processes importing torch: about a minute on the loaded 2-core CI machine
def test_two_gloo_processes_take_the_single_process_step(tmp_path):
    mp.start_processes(
        _worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn"
    )
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(WORLD)]
    for r, got in enumerate(ranks):  # each rank sampled round(rate x its classes), positives included
        assert got["sampled"].numel() == round(RATE * class_shard(CLASSES, WORLD, r)[1])
    columns = torch.cat([got["sampled"] for got in ranks])
    loss, weight_grad, x_grad, updated, (x, sampled_centres, cos, p_minus_y) = _reference(columns)
    batch, k = x.shape[0], columns.numel()

    # Tolerances, float32 (u = 2^-24): a cosine carries the roundings of two normalisations (a D-term sum of
    # squares, sqrt, division: (D/2 + 3)u each) and of a D-term dot product (Du), so |d cos| <= (2D + 6)u;
    # the margin's acos/cos add a few u: logits are off by at most delta = s (2D + 16) u.
    u = 2.0**-24
    delta = SCALE * (2 * DIM + 16) * u
    # loss: log-sum-exp moves by <= delta plus a k-term sum's rounding; the target logit by <= delta; then the
    # B-term mean
    loss_tol = 2 * delta + (k + 4) * u + batch * u * float(loss)
    for got in ranks:  # the same replicated loss on every rank
        assert abs(float(got["loss"]) - float(loss)) <= loss_tol, (float(got["loss"]), float(loss), loss_tol)

    # gradients: d loss / d cos = s (p - y) / B (straight-through), p's relative error <= 2 delta; the
    # backward adds its own roundings (sums over B or k, two normalisations, a few elementwise ops). Bound
    # each entry by (that relative error) x sum of |terms|, the terms being |s (p - y) / B| x |d cos / d in|.
    rel = 2 * delta + (batch + k + 2 * DIM + 16) * u
    xn = F.normalize(x, dim=1)
    wn = F.normalize(sampled_centres, dim=1)
    coeff = SCALE * p_minus_y / batch  # (B, k)
    # d cos_bc / d w_c = (xn_b - cos_bc wn_c) / |w_c|;  d cos_bc / d x_b = (wn_c - cos_bc xn_b) / |x_b|
    w_terms = (coeff[:, :, None] * (xn[:, None, :].abs() + (cos[:, :, None] * wn[None]).abs())).sum(0)
    w_terms = w_terms / sampled_centres.norm(dim=1, keepdim=True)
    x_terms = (coeff[:, :, None] * (wn[None].abs() + (cos[:, :, None] * xn[:, None, :]).abs())).sum(1)
    x_terms = x_terms / x.norm(dim=1, keepdim=True)

    got_grad = torch.cat([got["weight_grad"] for got in ranks])
    unsampled = torch.ones(CLASSES, dtype=torch.bool)
    unsampled[columns] = False
    assert torch.equal(got_grad[unsampled], torch.zeros_like(got_grad[unsampled]))
    assert torch.equal(weight_grad[unsampled], torch.zeros_like(weight_grad[unsampled]))
    w_err = (got_grad[columns] - weight_grad[columns]).abs()
    assert bool((w_err <= rel * w_terms).all()), float((w_err / (rel * w_terms)).max())
    got_x_grad = torch.cat([got["x_grad"] for got in ranks])
    x_err = (got_x_grad - x_grad).abs()
    assert bool((x_err <= rel * x_terms).all()), float((x_err / (rel * x_terms)).max())

    # the SGD step: lr x the gradient's error, plus one rounding of the update
    got_weight = torch.cat([got["weight"] for got in ranks])
    step_tol = torch.zeros(CLASSES, DIM)
    step_tol[columns] = LR * rel * w_terms
    step_tol += u * updated.abs()
    assert bool(((got_weight - updated).abs() <= step_tol).all())
    moved = (updated - init_class_centres(0, CLASSES, DIM, SEED)).abs().max()
    assert float(moved) > 1e3 * float(step_tol.max()), (
        "the step must move the centres far beyond the tolerance"
    )
    assert math.isfinite(float(loss)) and float(loss) > 1.0
