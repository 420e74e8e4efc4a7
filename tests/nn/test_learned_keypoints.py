"""The learned-keypoints KP-RPE wrapper: same numbers as the core ViT for the same points, and a gradient
that reaches the keypoint predictor (the core detaches given keypoints)."""

from __future__ import annotations

import pytest
import torch

from kprpe.nn import VisionTransformer
from kprpe.nn.learned_keypoints import LearnedKeypointViT, SoftArgmaxKeypoints


def _vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
               output_dim=16, num_keypoints=5, rel_pos="kprpe", abs_pos=False, head="mean")
    cfg.update(kw)
    vit = VisionTransformer(**cfg)
    torch.nn.init.normal_(vit.keypoint_linear.weight, std=0.5)  # f != 0, so keypoints matter
    return vit.eval()


@pytest.mark.parametrize("kp_hidden", [0, 8])
def test_wrapper_matches_the_core_forward_for_the_same_points(kp_hidden):
    vit = _vit(kp_hidden=kp_hidden)
    model = LearnedKeypointViT(vit).eval()
    images = torch.randn(3, 1, 32, 32)
    points = torch.rand(3, 5, 2)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_with_keypoints(images, points), vit(images, points),
                                   rtol=1e-4, atol=1e-5)


def test_predicted_points_are_in_the_image_and_receive_gradient():
    model = LearnedKeypointViT(_vit()).train()
    images = torch.randn(4, 1, 32, 32)
    points = model.predict_keypoints(images)
    assert points.shape == (4, 5, 2) and bool(((points > 0) & (points < 1)).all())
    model(images, torch.zeros(4, 5, 2)).pow(2).sum().backward()  # given keypoints are ignored
    grad = model.predictor.heatmaps.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_soft_argmax_finds_a_single_bright_spot():
    predictor = SoftArgmaxKeypoints(1, 1, width=4)
    with torch.no_grad():
        for m in predictor.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
                m.bias.zero_()
        predictor.heatmaps.bias.fill_(0.0)
    # with all-zero weights every cell has the same logit: the point is the image centre
    centre = predictor(torch.randn(2, 1, 32, 32))
    torch.testing.assert_close(centre, torch.full((2, 1, 2), 0.5))


def test_non_kprpe_backbone_is_refused():
    with pytest.raises(ValueError, match="rel_pos='kprpe'"):
        LearnedKeypointViT(VisionTransformer(img_size=32, patch_size=4, in_chans=1, embed_dim=16, depth=1,
                                             num_heads=2, output_dim=16, rel_pos="rpe"))
