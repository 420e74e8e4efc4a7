"""Margins and partial FC against straightforward per-element formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kprpe.train.heads import AdaFaceMargin, CombinedMargin, PartialFC, PlainLogits, build_margin, class_shard


def _cos_labels(b=6, c=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    cos = torch.rand(b, c, generator=g, dtype=torch.float64) * 1.8 - 0.9
    labels = torch.randint(0, c, (b,), generator=g)
    return cos, labels


@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.0, 0.3, 0.2), (1.2, 0.1, 0.05)])
def test_combined_margin_matches_formula(m1, m2, m3):
    cos, labels = _cos_labels()
    out = CombinedMargin(64.0, m1, m2, m3)(cos, labels)
    for i in range(cos.shape[0]):
        for j in range(cos.shape[1]):
            c = cos[i, j].item()
            want = 64 * (math.cos(m1 * math.acos(c) + m2) - m3) if j == labels[i] else 64 * c
            assert out[i, j].item() == pytest.approx(want, abs=1e-9)


def test_named_margins():
    cos, labels = _cos_labels()
    arc, cosface = build_margin("arcface"), build_margin("cosface")
    i = 0
    t = labels[i].item()
    assert arc(cos, labels)[i, t].item() == pytest.approx(64 * math.cos(math.acos(cos[i, t].item()) + 0.5))
    assert cosface(cos, labels)[i, t].item() == pytest.approx(64 * (cos[i, t].item() - 0.4))
    assert build_margin("cosface", margin=0.35).m3 == 0.35
    assert isinstance(build_margin("softmax"), PlainLogits)
    with pytest.raises(ValueError, match="unknown head type"):
        build_margin("sphere")


def test_labels_minus_one_get_no_margin():
    cos, labels = _cos_labels()
    labels[2] = -1
    out = CombinedMargin(10.0, 1.0, 0.5, 0.0)(cos, labels)
    assert torch.allclose(out[2], 10 * cos[2])


def test_adaface_matches_formula_and_updates_its_statistics():
    cos, labels = _cos_labels(b=5)
    norms = torch.tensor([[5.0], [12.0], [20.0], [31.0], [44.0]], dtype=torch.float64)
    m, h, s, t_alpha, eps = 0.4, 0.333, 64.0, 0.01, 1e-3
    head = AdaFaceMargin(s, m, h, t_alpha).double()
    out = head(cos, labels, norms)
    mean = 20 * (1 - t_alpha) + t_alpha * norms.mean().item()
    std = 100 * (1 - t_alpha) + t_alpha * norms.std().item()  # unbiased std, as torch.std
    assert head.batch_mean.item() == pytest.approx(mean) and head.batch_std.item() == pytest.approx(std)
    for i in range(5):
        scaler = max(-1.0, min(1.0, (norms[i].item() - mean) / (std + eps) * h))
        for j in range(cos.shape[1]):
            c = cos[i, j].item()
            if j == labels[i]:
                want = s * (math.cos(math.acos(c) - m * scaler) - (m + m * scaler))
            else:
                want = s * c
            assert out[i, j].item() == pytest.approx(want, abs=1e-9)
    assert set(head.state_dict()) == {"batch_mean", "batch_std"}  # saved with the head
    head.eval()
    head(cos, labels, norms)
    assert head.batch_mean.item() == pytest.approx(mean)  # frozen in eval mode


def test_class_shards_cover_all_classes():
    for classes, world in [(10, 3), (7, 7), (206, 4)]:
        shards = [class_shard(classes, world, r) for r in range(world)]
        covered = [c for start, n in shards for c in range(start, start + n)]
        assert covered == list(range(classes))
        assert max(n for _, n in shards) - min(n for _, n in shards) <= 1


@pytest.mark.parametrize("kind", ["arcface", "cosface", "adaface", "softmax"])
def test_partial_fc_full_rate_is_plain_cross_entropy(kind):
    torch.manual_seed(0)
    emb = torch.randn(8, 16, requires_grad=True)
    labels = torch.randint(0, 11, (8,))
    margin = build_margin(kind, scale=16.0)
    head = PartialFC(16, 11, margin, rank=0, world_size=1)
    loss, _ = head(emb, labels)
    reference_margin = build_margin(kind, scale=16.0)
    if kind == "softmax":
        logits = emb @ head.weight.t()
    else:
        cos = F.normalize(emb, dim=1) @ F.normalize(head.weight, dim=1).t()
        logits = reference_margin(cos.clamp(-1, 1), labels, emb.norm(dim=1, keepdim=True))
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    loss.backward()
    assert emb.grad is not None and head.weight.grad is not None


def test_partial_fc_sampling_keeps_positives_and_is_cross_entropy_over_the_sample():
    torch.manual_seed(1)
    emb = torch.randn(6, 8)
    labels = torch.tensor([3, 3, 17, 40, 41, 99])
    head = PartialFC(
        8, 100, build_margin("cosface", scale=8.0), sample_rate=0.2, rank=0, world_size=1, seed=5
    )
    loss, _ = head(emb, labels)
    index = head.last_sampled
    assert index.numel() == 20 and set(labels.tolist()) <= set(index.tolist())
    assert torch.equal(index, index.sort().values)
    sub_labels = torch.searchsorted(index, labels)
    cos = F.normalize(emb, dim=1) @ F.normalize(head.weight[index], dim=1).t()
    logits = build_margin("cosface", scale=8.0)(cos, sub_labels)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, sub_labels).item(), rel=1e-5)
    state = head.extra_state()
    first = head(emb, labels) and head.last_sampled.clone()
    head.load_extra_state(state)
    head(emb, labels)
    assert torch.equal(head.last_sampled, first)  # the sampler state resumes exactly


def test_partial_fc_masks_invalid_samples_and_checks_labels():
    emb = torch.randn(4, 8)
    head = PartialFC(8, 5, build_margin("arcface"), rank=0, world_size=1)
    labels = torch.tensor([0, 1, 2, 3])
    valid = torch.tensor([True, False, True, True])
    loss_masked, _ = head(emb, labels, valid)
    loss_subset, _ = head(emb[valid], labels[valid])
    assert loss_masked.item() == pytest.approx(loss_subset.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"labels \[7\] are outside 0..4"):
        head(emb, torch.tensor([0, 1, 7, 3]))
    with pytest.raises(ValueError, match="embeddings must be"):
        head(torch.randn(4, 9), labels)


def _easy_batch(target_cos: float, b: int = 4, c: int = 7):
    """Every row's target cosine is ``target_cos``; the others are spread over [0.7, 0.98] (so the softmax
    is not saturated and the target's gradient is not negligible)."""
    cos = torch.linspace(0.7, 0.98, b * c, dtype=torch.float64).reshape(b, c)
    labels = torch.arange(b) % c
    cos[torch.arange(b), labels] = target_cos
    return cos.requires_grad_(True), labels


def _low_norm_adaface(gradient: str) -> AdaFaceMargin:
    """Frozen statistics under which a norm of 10 gets the full negative scaler (-1): the largest angle."""
    head = build_margin("adaface", scale=64.0, gradient=gradient).double().eval()
    head.batch_mean.fill_(20.0)
    head.batch_std.fill_(1.0)
    return head


@pytest.mark.parametrize("kind", ["arcface", "adaface", "cosface"])
def test_gradient_on_an_easy_target_stays_bounded(kind):
    """Straight-through (default): |d loss / d cos| <= s / B however close the target is to 1. The exact
    derivative of an angular margin is that times d margined / d cos (sin(theta + m) / sin(theta) for
    ArcFace), which grows without bound as the target gets easy (limited only by the clamp eps)."""
    s, b = 64.0, 4
    norms = torch.full((b,), 10.0, dtype=torch.float64)

    def target_grads(gradient: str, target: float) -> torch.Tensor:
        cos, labels = _easy_batch(target, b=b)
        if kind == "adaface":
            head = _low_norm_adaface(gradient)
        else:
            head = build_margin(kind, scale=s, gradient=gradient)
        F.cross_entropy(head(cos, labels, norms), labels).backward()
        assert torch.isfinite(cos.grad).all()
        return cos.grad, cos.grad[torch.arange(b), labels]

    for target in (0.9, 0.99, 0.9999, 1.0 - 1e-6, 1.0):
        grad, _ = target_grads("straight_through", target)
        assert grad.abs().max().item() <= s / b + 1e-9
    _, straight = target_grads("straight_through", 1.0 - 1e-6)
    _, exact = target_grads("exact", 1.0 - 1e-6)
    ratio = (exact / straight).min().item()  # same logits, so same softmax: the ratio is d margined / d cos
    if kind == "cosface":  # an additive margin has the same derivative either way
        assert ratio == pytest.approx(1.0)
    else:
        assert ratio > 5.0


def test_straight_through_gradient_is_the_softmax_gradient_times_s():
    cos, labels = _cos_labels(b=5, c=6, seed=3)
    cos.requires_grad_(True)
    logits = build_margin("arcface", scale=30.0)(cos, labels)
    F.cross_entropy(logits, labels).backward()
    want = 30.0 * (torch.softmax(logits.detach(), 1) - F.one_hot(labels, 6)) / 5
    assert torch.allclose(cos.grad, want, atol=1e-12)


def test_adaface_does_not_clip_the_margined_angle():
    """An easy target with a high norm: theta - m * scaler < 0, and the logit is the cosine of that negative
    angle, not of an angle clipped to [eps, pi - eps]."""
    head = AdaFaceMargin(64.0, 0.4, 0.333, t_alpha=0.01).double().eval()
    cos, labels = _easy_batch(0.9995, b=2)
    norms = torch.tensor([100.0, 100.0], dtype=torch.float64)
    out = head(cos, labels, norms)
    scaler = min(1.0, (100.0 - 20.0) / (100.0 + 1e-3) * 0.333)
    angle = math.acos(0.9995) - 0.4 * scaler
    assert angle < 0
    assert out[0, labels[0]].item() == pytest.approx(64 * (math.cos(angle) - 0.4 - 0.4 * scaler), abs=1e-9)


def test_unknown_margin_gradient_is_refused():
    with pytest.raises(ValueError, match="must be one of straight_through, exact, got 'textbook'"):
        build_margin("arcface", gradient="textbook")
    with pytest.raises(ValueError, match=r"labels \[9\] are outside the 7 columns"):
        build_margin("cosface")(torch.zeros(2, 7), torch.tensor([0, 9]))


def test_partial_fc_computes_in_float32_inside_a_bf16_autocast():
    """The head sees the (bf16-rounded) embeddings it is given, but its cosines, margin and softmax stay
    float32 even when called inside an autocast region."""
    torch.manual_seed(2)
    emb = torch.randn(6, 16).bfloat16()
    labels = torch.randint(0, 9, (6,))
    head = PartialFC(16, 9, build_margin("arcface", scale=64.0), rank=0, world_size=1)
    reference, _ = head(emb.float(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, _ = head(emb, labels)
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(reference.item(), rel=1e-6)
