"""Joint silhouette + keypoint augmentation: whatever moves the silhouettes moves the keypoints the same way.

OpenGait's transforms touch only the silhouettes (docs/gait.md); a KP-RPE model needs the pose to follow. A
horizontal flip maps pixel column ``j`` to ``W - 1 - j`` (pixel-index coordinates, docs/gait.md), so a joint's
``x`` becomes ``W - 1 - x``, and the left and right joints trade places (a flipped left knee is drawn where a
right knee would be). Undetected joints (all zero) stay ``(0, 0, 0)``.

OpenGait's SwinGait recipe also draws ``RandomRotate`` (+-10 degrees about OpenGait's ``(h // 2, w // 2)``
point, a quirk kept: it passes (h, w) as (x, y)) and ``RandomPerspective`` (the top and bottom corners moved
inwards by up to 10 columns, stretched back to the frame). Both warp with OpenCV, whose matrices map input
pixel-index coordinates to output ones, so a joint moves by the same matrix (docs/gait.md).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "COCO_FLIP_ORDER",
    "KEYPOINT_CONTROLS",
    "Compose",
    "KeypointControl",
    "RandomFlip",
    "RandomPerspective",
    "RandomRotate",
    "warp_sequence",
    "draw_keypoints",
    "flip_sequence",
    "noise_keypoints",
    "shuffle_keypoints",
]

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


def warp_sequence(sils: np.ndarray, pose: np.ndarray | None, matrix: np.ndarray):
    """Warp every frame of ``sils [T, H, W]`` by ``matrix`` (2x3 affine or 3x3 homography, OpenCV's
    input -> output convention, bilinear) and move ``pose [T, 17, 3]``'s detected joints by the same map."""
    import cv2

    height, width = sils.shape[1:]
    if matrix.shape == (2, 3):
        frames = [cv2.warpAffine(f, matrix, (width, height)) for f in sils]
        matrix = np.vstack([matrix, [0.0, 0.0, 1.0]])
    else:
        frames = [cv2.warpPerspective(f, matrix, (width, height)) for f in sils]
    warped = np.stack(frames).astype(sils.dtype, copy=False)
    if pose is None:
        return warped, None
    out = np.array(pose, dtype=np.float32, copy=True)
    detected = np.any(out != 0, axis=-1)
    points = np.concatenate([out[..., :2].astype(np.float64), np.ones(out.shape[:-1] + (1,))], axis=-1)
    moved = points @ matrix.T
    moved = moved[..., :2] / moved[..., 2:]
    out[..., :2] = np.where(detected[..., None], moved, 0.0)
    return warped, out


class _RandomWarp:
    """A whole sequence warped with probability ``p`` by the ``matrix(frame_size, rng)`` a subclass draws."""

    p: float

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        if not (self.p and rng.random() < self.p):
            return item
        item = dict(item)
        item["sils"], pose = warp_sequence(
            item["sils"], item.get("pose"), self.matrix(item["sils"].shape[1:], rng)
        )
        if pose is not None:
            item["pose"] = pose
        return item


class RandomRotate(_RandomWarp):
    """OpenGait's ``RandomRotate``: with probability ``p`` a whole sequence turns by a uniform angle in
    ``[-degrees, degrees]`` about ``(h // 2, w // 2)`` taken as (x, y), as OpenGait passes it; joints
    follow."""

    def __init__(self, p: float = 0.2, degrees: float = 10.0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"rotation probability must be in [0, 1], got {p}")
        self.p, self.degrees = float(p), float(degrees)

    def matrix(self, frame_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        import cv2

        height, width = frame_size
        angle = rng.uniform(-self.degrees, self.degrees)
        return cv2.getRotationMatrix2D((height // 2, width // 2), angle, 1.0)


class RandomPerspective(_RandomWarp):
    """OpenGait's ``RandomPerspective``: with probability ``p`` the top and bottom corners of a sequence's
    frames are each moved inwards by a random ``0 .. cut - 1`` columns (``cut = W // 44 * 10``) and the
    quadrilateral is stretched back to the frame; joints follow."""

    def __init__(self, p: float = 0.2) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"perspective probability must be in [0, 1], got {p}")
        self.p = float(p)

    def matrix(self, frame_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        import cv2

        height, width = frame_size
        cut = width // 44 * 10
        left = rng.integers(0, cut, 2)
        right = rng.integers(width - cut, width, 2)
        corners = np.float32([(left[0], 0), (right[0], 0), (right[1], height), (left[1], height)])
        canvas = np.float32([(0, 0), (width, 0), (width, height), (0, height)])
        return cv2.getPerspectiveTransform(corners, canvas)


# ---------------------------------------------------------------------- keypoint controls (experiments)
KEYPOINT_CONTROLS = ("real", "shuffled", "noise", "drawn")


def shuffle_keypoints(pose: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Control: the sequence's keypoints with their frames permuted (right people, wrong moments)."""
    return np.array(pose[rng.permutation(pose.shape[0])], copy=True)


def noise_keypoints(pose: np.ndarray, frame_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Control: uniform random joints over the frame, confidences uniform in [0, 1] (no information)."""
    h, w = frame_size
    out = np.empty(pose.shape, np.float32)
    out[..., 0] = rng.uniform(0, w - 1, pose.shape[:-1])
    out[..., 1] = rng.uniform(0, h - 1, pose.shape[:-1])
    out[..., 2] = rng.uniform(0, 1, pose.shape[:-1])
    return out


def draw_keypoints(sils: np.ndarray, pose: np.ndarray, threshold: float = 0.3, value: int = 128):
    """Control (Abs-PE*-style input): the keypoints drawn into the silhouettes as 3x3 grey marks, for a model
    that sees them only as pixels at absolute positions."""
    out = np.array(sils, copy=True)
    h, w = out.shape[1:]
    t, j = np.nonzero(pose[..., 2] >= threshold)
    xs = np.clip(np.rint(pose[t, j, 0]).astype(int), 0, w - 1)
    ys = np.clip(np.rint(pose[t, j, 1]).astype(int), 0, h - 1)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out[t, np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)] = value
    return out


class KeypointControl:
    """``transform(item, rng)`` applying one of :data:`KEYPOINT_CONTROLS` to a sequence's pose."""

    def __init__(self, kind: str, frame_size: tuple[int, int] = (64, 44)) -> None:
        if kind not in KEYPOINT_CONTROLS:
            raise ValueError(f"unknown keypoint control {kind!r}; expected one of {KEYPOINT_CONTROLS}")
        self.kind, self.frame_size = kind, tuple(frame_size)

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        if self.kind == "real":
            return item
        item = dict(item)
        if self.kind == "shuffled":
            item["pose"] = shuffle_keypoints(item["pose"], rng)
        elif self.kind == "noise":
            item["pose"] = noise_keypoints(item["pose"], self.frame_size, rng)
        else:
            item["sils"] = draw_keypoints(item["sils"], item["pose"])
        return item


class Compose:
    """Apply transforms ``f(item, rng)`` in order (None entries are skipped)."""

    def __init__(self, *transforms) -> None:
        self.transforms = [t for t in transforms if t is not None]

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        for transform in self.transforms:
            item = transform(item, rng)
        return item
