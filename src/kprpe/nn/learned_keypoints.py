"""KP-RPE with keypoints the model finds itself (the paper's stated future work).

A tiny CNN predicts ``K`` heatmaps from the image; a spatial soft-argmax turns each into an (x, y) point in
[0, 1]. The points feed a KP-RPE :class:`~kprpe.nn.VisionTransformer` and are trained end to end from the task
loss alone — no landmark labels. The soft-argmax of a convolutional map moves with the image (up to the
stride and the borders), so the predicted points stay attached to the object the way detected landmarks do.

The core ViT detaches keypoints (no gradient flows into given landmarks, as in the official code), so the
wrapper runs the ViT's own layers with a keypoint bias that keeps the gradient: same modules, same weights,
same numbers for the same points (``tests/nn/test_learned_keypoints.py`` checks it against the core forward).
"""

from __future__ import annotations

import torch
from torch import nn

from .keypoint_rpe import patch_centres
from .vit import VisionTransformer

__all__ = ["SoftArgmaxKeypoints", "LearnedKeypointViT"]


class SoftArgmaxKeypoints(nn.Module):
    """Image ``(B, C, S, S)`` -> ``(B, K, 2)`` points in [0, 1]: three small convolutions (one of stride 2),
    ``K`` heatmaps, and the softmax-weighted mean of the heatmap cell centres."""

    def __init__(self, in_chans: int, num_keypoints: int, width: int = 16) -> None:
        super().__init__()
        if num_keypoints <= 0 or width <= 0:
            raise ValueError(f"num_keypoints and width must be positive, got {num_keypoints} and {width}")
        self.num_keypoints = num_keypoints
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
        )
        self.heatmaps = nn.Conv2d(width, num_keypoints, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.heatmaps(self.features(images))  # (B, K, h, w)
        b, k, h, w = logits.shape
        weights = logits.flatten(2).softmax(-1).view(b, k, h, w)
        xs = (torch.arange(w, device=images.device, dtype=weights.dtype) + 0.5) / w
        ys = (torch.arange(h, device=images.device, dtype=weights.dtype) + 0.5) / h
        x = (weights.sum(2) * xs).sum(-1)
        y = (weights.sum(3) * ys).sum(-1)
        return torch.stack([x, y], dim=-1)


class LearnedKeypointViT(nn.Module):
    """A KP-RPE ViT whose keypoints come from :class:`SoftArgmaxKeypoints` on the same image.

    ``forward(images, keypoints=None)`` ignores any given keypoints (pipelines may pass landmarks to every
    model alike); :meth:`predict_keypoints` returns the points the model uses.
    """

    def __init__(self, vit: VisionTransformer, predictor: nn.Module | None = None, width: int = 16) -> None:
        super().__init__()
        cfg = vit.config
        if cfg.rel_pos != "kprpe" or cfg.kp_input != "relative":
            raise ValueError(
                "learned keypoints need a KP-RPE ViT with relative f(P) (rel_pos='kprpe', "
                "kp_input='relative'), "
                f"got rel_pos={cfg.rel_pos!r}, kp_input={cfg.kp_input!r}"
            )
        self.vit = vit
        self.predictor = (
            predictor
            if predictor is not None
            else SoftArgmaxKeypoints(cfg.in_chans, cfg.num_keypoints, width)
        )

    @property
    def config(self):
        return self.vit.config

    def predict_keypoints(self, images: torch.Tensor) -> torch.Tensor:
        return self.predictor(images)

    def _keypoint_bias_layers(self, keypoints: torch.Tensor):
        """``layer -> (B, H, N, N)`` KP-RPE bias from ``keypoints`` *with* their gradient (the ViT's own path
        detaches them: landmarks from a detector carry no gradient)."""
        kprpe = self.vit.kprpe
        centres = patch_centres(self.vit.grid, self.vit.grid, device=keypoints.device)  # (N, 2)
        hidden = (centres[None, :, None, :] - keypoints[:, None, :, :]).flatten(2)  # (B, N, 2K)
        if kprpe.mlp is not None:
            hidden = kprpe.mlp(hidden)
        return lambda layer: kprpe.layer_bias(hidden, layer, "gather")

    def forward_with_keypoints(self, images: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        """The ViT's embedding with these keypoints, gradient flowing into them."""
        vit = self.vit
        vit.check_inputs(images, keypoints)
        x = vit.patch_embed(images)
        if vit.pos_embed is not None:
            x = x + vit.pos_embed
        x = vit.pos_drop(x)
        ids = vit.bucket_ids
        biases = self._keypoint_bias_layers(keypoints)
        for i, blk in enumerate(vit.blocks):
            x = blk(x, biases(i), ids)
        return vit.forward_head(vit.norm(x))

    def forward(self, images: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_keypoints(images, self.predict_keypoints(images))
