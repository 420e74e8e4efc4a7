"""Joint silhouette + keypoint augmentation: whatever moves the silhouettes moves the keypoints the same way.

OpenGait's transforms touch only the silhouettes (NOTES 1.5); a KP-RPE model needs the pose to follow. A
horizontal flip maps pixel column ``j`` to ``W - 1 - j`` (pixel-index coordinates, docs/gait.md), so a joint's
``x`` becomes ``W - 1 - x``, and the left and right joints trade places (a flipped left knee is drawn where a
right knee would be). Undetected joints (all zero) stay ``(0, 0, 0)``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["COCO_FLIP_ORDER", "flip_sequence", "RandomFlip"]

# COCO-17: nose, then (left, right) eyes, ears, shoulders, elbows, wrists, hips, knees, ankles
COCO_FLIP_ORDER = np.array([0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15])


def flip_sequence(sils: np.ndarray, pose: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Mirror ``sils [T, H, W]`` left-right and ``pose [T, 17, 3]`` (silhouette-frame pixels) with it."""
    flipped = np.ascontiguousarray(sils[..., ::-1])
    if pose is None:
        return flipped, None
    width = sils.shape[-1]
    out = np.array(pose, dtype=np.float32, copy=True)
    detected = np.any(out != 0, axis=-1)
    out[..., 0] = np.where(detected, width - 1 - out[..., 0], 0.0)
    return flipped, out[:, COCO_FLIP_ORDER]


class RandomFlip:
    """``transform(item, rng)`` for :class:`~kprpe.gait.GaitDataset`: flip a whole sequence with
    probability ``p`` (one draw per sequence, as OpenGait's transforms draw per sequence)."""

    def __init__(self, p: float = 0.2) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        if self.p and rng.random() < self.p:
            item = dict(item)
            item["sils"], pose = flip_sequence(item["sils"], item.get("pose"))
            if pose is not None:
                item["pose"] = pose
        return item
