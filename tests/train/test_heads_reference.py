"""Margin heads against the official training code's reference vectors (tests/fixtures/heads/README.md).

The official heads write the margin into the target logit without gradient (a straight-through margin), so the
cosine receives ``s * (softmax - onehot) / B``; these tests check logits, d loss / d cos and the AdaFace EMA
statistics through :func:`build_margin` and through :class:`PartialFC` (one process).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kprpe.train.heads import PartialFC, build_margin

FIXTURE = Path(__file__).parent.parent / "fixtures" / "heads" / "heads.json"
CASES = json.loads(FIXTURE.read_text())["cases"]
LOGIT_TOL, STAT_TOL = 1e-4, 1e-5


def _case_id(case: dict) -> str:
    kind = "easy" if case["easy_targets"] else "minus1" if case["has_negatives"] else "random"
    return f"{case['kind']}-{kind}-seed{case['seed']}"


def _margin(case: dict, gradient: str = "straight_through"):
    p = case["params"]
    if case["kind"] == "adaface":
        head = build_margin("adaface", scale=p["s"], margin=p["m"], h=p["h"], t_alpha=p["t_alpha"],
                            gradient=gradient)
        head.eps = p.get("eps", head.eps)
        head.batch_mean.fill_(p["batch_mean_in"])
        head.batch_std.fill_(p["batch_std_in"])
        return head
    return build_margin("combined", scale=p["s"], m1=p["m1"], m2=p["m2"], m3=p["m3"], gradient=gradient)


def _tensors(case: dict):
    cos = torch.tensor(case["cos"], dtype=torch.float32)
    labels = torch.tensor(case["labels"], dtype=torch.long)
    norms = torch.tensor(case["norms"], dtype=torch.float32).reshape(-1)
    return cos, labels, norms


def _reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over rows with a label among the columns of their cross-entropy, divided by all rows."""
    has = labels >= 0
    return F.cross_entropy(logits[has], labels[has], reduction="sum") / labels.shape[0]


def _check_stats(head, case: dict) -> None:
    if case["kind"] == "adaface":
        assert head.batch_mean.item() == pytest.approx(case["batch_mean_out"], abs=STAT_TOL)
        assert head.batch_std.item() == pytest.approx(case["batch_std_out"], abs=STAT_TOL)


def _max_diff(actual: torch.Tensor, expected) -> float:
    return (actual.detach().double() - torch.tensor(expected, dtype=torch.float64)).abs().max().item()


def test_fixture_covers_every_kind_and_situation():
    seen = {(c["kind"], c["easy_targets"], c["has_negatives"]) for c in CASES}
    for kind in ("adaface", "arcface", "cosface"):
        assert {(kind, False, False), (kind, True, False), (kind, False, True)} <= seen


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_build_margin_matches_the_official_head(case):
    cos, labels, norms = _tensors(case)
    cos.requires_grad_(True)
    head = _margin(case)
    logits = head(cos, labels, norms)
    loss = _reference_loss(logits, labels)
    loss.backward()
    assert _max_diff(logits, case["logits"]) <= LOGIT_TOL
    assert _max_diff(cos.grad, case["grad_cos"]) <= LOGIT_TOL
    assert loss.item() == pytest.approx(case["loss"], rel=1e-5)
    _check_stats(head, case)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_exact_gradient_keeps_the_logits_and_changes_only_the_target_gradient(case):
    cos, labels, norms = _tensors(case)
    cos.requires_grad_(True)
    logits = _margin(case, "exact")(cos, labels, norms)
    _reference_loss(logits, labels).backward()
    assert _max_diff(logits, case["logits"]) <= LOGIT_TOL
    off_target = torch.ones_like(cos, dtype=torch.bool)
    rows = torch.nonzero(labels >= 0).squeeze(1)
    off_target[rows, labels[rows]] = False
    reference = torch.tensor(case["grad_cos"])
    assert (cos.grad - reference)[off_target].abs().max().item() <= LOGIT_TOL


def _partial_fc_through(case: dict, world_size: int):
    """Run the case through PartialFC in one process, with the reference cosines put in front of the margin.

    ``world_size`` 2 (rank 0, no process group: the collectives are no-ops) is how a -1 row arises for real:
    its label belongs to the other process's classes."""
    cos_ref, labels, norms = _tensors(case)
    batch, columns = cos_ref.shape
    dim = 8
    generator = torch.Generator().manual_seed(case["seed"])
    directions = F.normalize(torch.randn(batch, dim, generator=generator), dim=1)
    embeddings = (directions * norms[:, None]).requires_grad_(True)
    global_labels = torch.where(labels >= 0, labels, columns + torch.arange(batch) % columns)
    head = PartialFC(dim, columns * world_size, _margin(case), rank=0, world_size=world_size)
    assert head.num_local == columns
    cos = cos_ref.clone().requires_grad_(True)
    seen = {}

    def use_reference_cosines(module, args):
        assert args[0].shape == cos.shape  # the head's own cosines, replaced by the reference ones
        seen["labels"], seen["norms"] = args[1], args[2]
        return (cos, *args[1:])

    head.margin.register_forward_pre_hook(use_reference_cosines)
    head.margin.register_forward_hook(lambda module, args, out: seen.update(logits=out))
    loss, _ = head(embeddings, global_labels)
    loss.backward()  # reaches the reference cosines, not the embeddings (the hook cut that path)
    assert torch.equal(seen["labels"], labels)
    assert torch.allclose(seen["norms"].reshape(-1), norms, rtol=1e-5)
    return head, loss, seen["logits"], cos.grad


@pytest.mark.parametrize("case", [c for c in CASES if not c["has_negatives"]], ids=_case_id)
def test_partial_fc_one_process_matches_the_official_head(case):
    head, loss, logits, grad_cos = _partial_fc_through(case, world_size=1)
    assert _max_diff(logits, case["logits"]) <= LOGIT_TOL
    assert _max_diff(grad_cos, case["grad_cos"]) <= LOGIT_TOL
    assert loss.item() == pytest.approx(case["loss"], rel=1e-5)
    _check_stats(head.margin, case)


@pytest.mark.parametrize("case", [c for c in CASES if c["has_negatives"]], ids=_case_id)
def test_partial_fc_rows_whose_class_is_elsewhere(case):
    """Rows labelled -1 get no margin and count in the AdaFace statistics; rows with a target here get the
    reference gradient. A -1 row's own gradient is ``s * softmax / B`` (its share of the global softmax, the
    official distributed cross-entropy), which the reference's single-process loss leaves out."""
    head, _, logits, grad_cos = _partial_fc_through(case, world_size=2)
    labels = torch.tensor(case["labels"])
    here = labels >= 0
    assert _max_diff(logits, case["logits"]) <= LOGIT_TOL
    assert _max_diff(grad_cos[here], torch.tensor(case["grad_cos"])[here].tolist()) <= LOGIT_TOL
    scale = case["params"]["s"]
    reference_logits = torch.tensor(case["logits"], dtype=torch.float64)
    elsewhere = scale * torch.softmax(reference_logits[~here], dim=1) / labels.shape[0]
    assert (grad_cos[~here].double() - elsewhere).abs().max().item() <= LOGIT_TOL
    _check_stats(head.margin, case)
