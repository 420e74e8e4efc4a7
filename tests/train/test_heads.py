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
            c = min(max(cos[i, j].item(), -1 + eps), 1 - eps)
            theta = math.acos(c)
            if j == labels[i]:
                theta = min(max(theta - m * scaler, eps), math.pi - eps)
                want = s * (math.cos(theta) - (m + m * scaler))
            else:
                want = s * math.cos(min(max(theta, eps), math.pi - eps))
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
