"""The "See KP-RPE" view's numbers: one query patch's row of the model's own KP-RPE logit bias.

The row comes from the model's :class:`~kprpe.nn.keypoint_rpe.KeypointRPE` through ``layer_biases`` — the
bias path the forward pass adds to attention — not from a re-implementation. The comparison row is the same
module at the ArcFace template keypoints: with the keypoints held fixed, KP-RPE is a plain RPE (one learned
bias per relative-position bucket), so that row is the position-only bias the face's keypoints modulate
(the paper's Figure 3 contrast).
"""

from __future__ import annotations

import numpy as np

from ..errors import KprpeError

__all__ = ["KprpeView", "NotKprpeModel"]


class NotKprpeModel(KprpeError):
    """The served model has no keypoint-dependent bias to show."""


class KprpeView:
    """Bias rows of a ViT KP-RPE model; build with :meth:`of` (raises :class:`NotKprpeModel` otherwise)."""

    def __init__(self, model, module) -> None:
        self.model, self.module = model, module
        self.grid = int(module.grid)
        self.depth = int(module.depth)
        self.heads = int(module.num_heads)

    @classmethod
    def of(cls, model) -> KprpeView:
        module = getattr(model, "kprpe", None)
        if module is None or not getattr(module, "uses_keypoints", False):
            name = type(model).__name__
            raise NotKprpeModel(f"this server's model ({name}) has no KP-RPE keypoint bias; the view needs a "
                                "ViT KP-RPE model")
        return cls(model, module)

    def describe(self) -> dict:
        return {"grid": self.grid, "layers": self.depth, "heads": self.heads}

    def rows(self, keypoints: np.ndarray, query: int, layer: int, head: int | None) -> dict:
        """``keypoints`` ``(5, 2)`` in [0, 1] of the crop; ``head`` None averages the heads. Returns the
        KP-RPE row and the template (position-only) row, each ``grid x grid`` nested lists."""
        import torch

        from ..keypoints import ARCFACE_TEMPLATE_112
        from ..nn.position import BucketBias

        n = self.grid * self.grid
        if not 0 <= query < n:
            raise ValueError(f"query patch must be in [0, {n}), got {query}")
        if not 0 <= layer < self.depth:
            raise ValueError(f"layer must be in [0, {self.depth}), got {layer}")
        if head is not None and not 0 <= head < self.heads:
            raise ValueError(f"head must be in [0, {self.heads}) or 'mean', got {head}")
        template = np.asarray(ARCFACE_TEMPLATE_112, dtype=np.float64) / 112.0
        points = torch.as_tensor(np.stack([keypoints, template]), dtype=torch.float32)
        device = next(self.module.parameters()).device
        with torch.inference_mode():
            bias = self.module.layer_biases(points.to(device))(layer)  # (2, H, N, N): the forward's own path
            if isinstance(bias, BucketBias):  # FlexAttention models keep the table; densify it the same way
                bias = bias.dense()
            bias = bias.float()[:, :, query, :].expand(2, self.heads, n)
            row = bias.mean(1) if head is None else bias[:, head]
        row = row.cpu().numpy().reshape(2, self.grid, self.grid)
        return {"kprpe": row[0].round(6).tolist(), "rpe": row[1].round(6).tolist()}
