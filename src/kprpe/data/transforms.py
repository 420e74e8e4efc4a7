"""Keypoint-consistent augmentation: every geometric change is one affine map applied to the image *and* the
keypoints, so the keypoints stay on the same facial content.

Conventions (see :mod:`kprpe.keypoints`): images are uint8 RGB ``(H, W, 3)``; keypoints ``(K, 2)`` are (x, y)
pixel coordinates (OpenCV: pixel centre at integer coordinates) divided by the width / height. A horizontal
flip mirrors x about the image centre and swaps left/right points with :data:`FACE_FLIP_PERMUTATION`.

Randomness comes only from the ``numpy.random.Generator`` passed in, so a sample's augmentation is a pure
function of its seed — which is what makes resumed training repeat an uninterrupted run exactly, whatever
the number of DataLoader workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import cv2
import numpy as np

from ..keypoints import FACE_FLIP_PERMUTATION

__all__ = ["AugmentConfig", "FaceAugment", "geometric_matrix", "apply_affine_to_keypoints", "image_to_tensor"]


@dataclass
class AugmentConfig:
    """Probabilities and ranges of each augmentation (defaults: the official recipe's geometry,
    docs/training.md "The paper's recipe"; photometric/blur/low-resolution/cutout off unless enabled)."""

    flip_p: float = 0.5
    scale_min: float = 0.8
    scale_max: float = 1.2
    rotation_p: float = 0.2
    rotation_deg: float = 20.0
    translate: float = 0.1  # maximum shift, as a fraction of the output size, in x and y
    photometric_p: float = 0.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma_max: float = 2.0
    lowres_p: float = 0.0
    lowres_min_scale: float = 0.25  # downsample to this fraction of the size at most, then back up
    cutout_p: float = 0.0
    cutout_max_fraction: float = 0.4  # side of the erased square, as a fraction of the size

    def validate(self, prefix: str = "augmentation") -> AugmentConfig:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{prefix}.{f.name} must be a number, got {value!r}")
            if f.name.endswith("_p") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{prefix}.{f.name} is a probability and must be in [0, 1], got {value}")
            if value < 0:
                raise ValueError(f"{prefix}.{f.name} must be >= 0, got {value}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(
                f"{prefix}: need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}"
            )
        if not 0 < self.lowres_min_scale <= 1:
            raise ValueError(f"{prefix}.lowres_min_scale must be in (0, 1], got {self.lowres_min_scale}")
        if self.cutout_max_fraction > 1:
            raise ValueError(f"{prefix}.cutout_max_fraction must be <= 1, got {self.cutout_max_fraction}")
        return self

    @classmethod
    def disabled(cls) -> AugmentConfig:
        """No augmentation at all (evaluation, or exactness tests)."""
        return cls(flip_p=0.0, scale_min=1.0, scale_max=1.0, rotation_p=0.0, translate=0.0)


def geometric_matrix(
    rng: np.random.Generator | None,
    in_size: tuple[int, int],
    out_size: int,
    cfg: AugmentConfig,
) -> tuple[np.ndarray, bool]:
    """The ``2x3`` pixel-coordinate affine map from the input ``(width, height)`` to the ``out_size`` square,
    and whether it flips. Composition: resize -> (scale, rotate about the centre, translate) -> flip."""
    in_w, in_h = in_size
    sx, sy = out_size / in_w, out_size / in_h
    # pixel centres: x_out + 0.5 = (x_in + 0.5) * sx
    resize = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]], dtype=np.float64)
    m = resize
    flipped = False
    if rng is not None:
        scale = rng.uniform(cfg.scale_min, cfg.scale_max) if cfg.scale_max > cfg.scale_min else cfg.scale_min
        angle = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg) if rng.random() < cfg.rotation_p else 0.0
        tx, ty = (
            (rng.uniform(-cfg.translate, cfg.translate, size=2) * out_size)
            if cfg.translate > 0
            else (0.0, 0.0)
        )
        flipped = bool(rng.random() < cfg.flip_p)
        c = (out_size - 1) / 2.0
        a = math.radians(angle)
        cos, sin = scale * math.cos(a), scale * math.sin(a)
        # x' = R (x - c) + c + t
        aug = np.array(
            [[cos, -sin, c - cos * c + sin * c + tx], [sin, cos, c - sin * c - cos * c + ty], [0, 0, 1]],
            dtype=np.float64,
        )
        m = aug @ m
        if flipped:
            flip = np.array([[-1, 0, out_size - 1], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
            m = flip @ m
    return m[:2], flipped


def apply_affine_to_keypoints(
    keypoints: np.ndarray, matrix: np.ndarray, in_size: tuple[int, int], out_size: int
) -> np.ndarray:
    """Normalised keypoints of the input -> normalised keypoints of the warped ``out_size`` image."""
    in_w, in_h = in_size
    px = np.asarray(keypoints, dtype=np.float64) * np.array([in_w, in_h])
    moved = px @ matrix[:, :2].T + matrix[:, 2]
    return moved / out_size


class FaceAugment:
    """Callable ``(image, keypoints, rng) -> (image, keypoints)``: the training augmentation at ``out_size``.

    With ``rng=None`` (evaluation) it only resizes. ``flip_permutation`` reorders keypoints after a flip
    (``None`` for point sets without a left/right structure).
    """

    def __init__(self, cfg: AugmentConfig, out_size: int, flip_permutation=FACE_FLIP_PERMUTATION) -> None:
        self.cfg = cfg.validate()
        self.out_size = int(out_size)
        self.flip_permutation = list(flip_permutation) if flip_permutation is not None else None

    def __call__(
        self, image: np.ndarray, keypoints: np.ndarray, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 RGB image (H, W, 3), got dtype {image.dtype} shape {image.shape}"
            )
        h, w = image.shape[:2]
        matrix, flipped = geometric_matrix(rng, (w, h), self.out_size, self.cfg)
        identity = np.allclose(matrix, [[1, 0, 0], [0, 1, 0]])
        out = image if identity else cv2.warpAffine(
            image, matrix, (self.out_size, self.out_size), flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0),
        )
        kp = apply_affine_to_keypoints(keypoints, matrix, (w, h), self.out_size)
        if flipped and self.flip_permutation is not None:
            if kp.shape[0] != len(self.flip_permutation):
                raise ValueError(
                    f"flip permutation has {len(self.flip_permutation)} points, keypoints have {kp.shape[0]}"
                )
            kp = kp[self.flip_permutation]
        if rng is not None:
            out = self._pixel_augment(np.ascontiguousarray(out), rng)
        return out, kp.astype(np.float32)

    def _pixel_augment(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Photometric, grayscale, blur, low resolution and cutout: they change pixels, never positions."""
        cfg, size = self.cfg, self.out_size
        if cfg.photometric_p > 0 and rng.random() < cfg.photometric_p:
            x = img.astype(np.float32)
            b = 1.0 + rng.uniform(-cfg.brightness, cfg.brightness)
            c = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
            s = 1.0 + rng.uniform(-cfg.saturation, cfg.saturation)
            x = x * b
            x = (x - x.mean()) * c + x.mean()
            gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            x = (x - gray[..., None]) * s + gray[..., None]
            img = np.clip(x, 0, 255).astype(np.uint8)
        if cfg.grayscale_p > 0 and rng.random() < cfg.grayscale_p:
            gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
            img = np.repeat(gray[..., None], 3, axis=2)
        if cfg.blur_p > 0 and rng.random() < cfg.blur_p:
            sigma = rng.uniform(min(0.5, cfg.blur_sigma_max), max(cfg.blur_sigma_max, 0.1))
            img = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma)
        if cfg.lowres_p > 0 and rng.random() < cfg.lowres_p:
            small = max(2, int(round(size * rng.uniform(cfg.lowres_min_scale, 1.0))))
            interp = [cv2.INTER_LINEAR, cv2.INTER_AREA, cv2.INTER_NEAREST][int(rng.integers(3))]
            img = cv2.resize(
                cv2.resize(img, (small, small), interpolation=interp),
                (size, size),
                interpolation=cv2.INTER_LINEAR,
            )
        if cfg.cutout_p > 0 and rng.random() < cfg.cutout_p:
            side = max(1, int(round(size * rng.uniform(0.05, max(cfg.cutout_max_fraction, 0.05)))))
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            img = img.copy()
            img[y0 : y0 + side, x0 : x0 + side] = rng.integers(0, 256, size=3, dtype=np.uint8)
        return img


def image_to_tensor(image: np.ndarray):
    """uint8 RGB ``(H, W, 3)`` -> float tensor ``(3, H, W)`` in [-1, 1] (the model's input scaling)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
