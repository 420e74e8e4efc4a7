"""The AffNIST-like protocol on real handwriting: scikit-learn's UCI digits placed on a larger canvas,
moved by affine transforms, with five keypoints (box corners + centre) that move with the digit.

Coordinates follow the library's convention (:mod:`kprpe.keypoints`): OpenCV pixel coordinates, pixel
centres at integers, normalised keypoints = pixel / canvas size. ``cv2.warpAffine`` uses the same pixel
convention, so a 2x3 matrix ``M`` maps an image *and* its keypoints consistently: ``p' = M @ [x, y, 1]``.

Everything random here takes an explicit ``numpy.random.Generator`` (or a seed), so a protocol is a
deterministic function of its seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "DigitsCanvas",
    "AffineRange",
    "TRAIN_AUGMENTATION",
    "PLACED_AUGMENTATION",
    "MEDIUM_AUGMENTATION",
    "CALIBRATED_AUGMENTATION",
    "WIDE_AUGMENTATION",
    "WIDER_AUGMENTATION",
    "AFFNIST_MIX",
    "SWEEPS",
    "TestSet",
    "load_canvas_digits",
    "centre_on_canvas",
    "split_indices",
    "digit_box_keypoints",
    "affine_about",
    "transform_keypoints",
    "warp_images",
    "sample_affines",
    "sweep_affines",
    "build_test_sets",
    "keypoint_marks",
]

NUM_CLASSES = 10
NUM_KEYPOINTS = 5
INK_THRESHOLD = 0.2  # of the [0, 1] intensity: a pixel darker than this is background when boxing the digit


@dataclass
class DigitsCanvas:
    """All digits on the canvas, centred and untransformed.

    ``images`` float32 ``(N, S, S)`` in [0, 1] (ink = 1); ``labels`` int64 ``(N,)``;
    ``keypoints`` float32 ``(N, 5, 2)`` in *pixels* (top-left, top-right, bottom-right, bottom-left corner
    of the digit's box, then its centre) — what the models are given. ``ink_boxes`` has the same layout for
    the tight ink box whatever the keypoint definition: the protocol's "keep the digit inside the canvas"
    limits use it, so the test images do not change when the keypoint definition does.
    """

    images: np.ndarray
    labels: np.ndarray
    keypoints: np.ndarray
    canvas: int
    digit: int
    ink_boxes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.ink_boxes is None:
            self.ink_boxes = self.keypoints

    def __len__(self) -> int:
        return len(self.labels)


def load_canvas_digits(canvas: int = 32, digit: int = 16, box: str = "ink") -> DigitsCanvas:
    """Load scikit-learn's 1,797 UCI handwritten digits (8x8, 13 writers; shipped with the package: no
    download),
    upsample each to ``digit x digit`` (bicubic, clipped) and paste it in the centre of a ``canvas`` square.

    ``box='ink'``: keypoints from the tight box of the ink (the "box around the digit");
    ``box='frame'``: the fixed ``digit x digit`` frame the digit was pasted into (same for every sample).
    """
    if digit > canvas:
        raise ValueError(f"digit size {digit} must not exceed the canvas size {canvas}")
    if digit < 8:
        raise ValueError(f"digit size must be >= 8 (the source digits are 8x8), got {digit}")
    if box not in ("ink", "frame"):
        raise ValueError(f"box must be 'ink' or 'frame', got {box!r}")
    from sklearn.datasets import load_digits

    data = load_digits()
    source = data.images.astype(np.float32) / 16.0  # (N, 8, 8), values 0..16 in the original
    upsampled = np.stack(
        [np.clip(cv2.resize(img, (digit, digit), interpolation=cv2.INTER_CUBIC), 0.0, 1.0) for img in source]
    )
    return centre_on_canvas(upsampled, data.target.astype(np.int64), canvas, box)


def centre_on_canvas(digits: np.ndarray, labels: np.ndarray, canvas: int, box: str = "ink") -> DigitsCanvas:
    """Paste ``(N, d, d)`` digits in [0, 1] in the centre of a black ``canvas`` square and box them (see
    :func:`load_canvas_digits` for ``box``). MNIST's 28x28 digits on a 40x40 canvas give affNIST's
    "just centred" images: a border of 6 background pixels."""
    digit = digits.shape[-1]
    if digits.ndim != 3 or digits.shape[1] != digit:
        raise ValueError(f"digits must be square images (N, d, d), got shape {digits.shape}")
    if digit > canvas:
        raise ValueError(f"digit size {digit} must not exceed the canvas size {canvas}")
    if box not in ("ink", "frame"):
        raise ValueError(f"box must be 'ink' or 'frame', got {box!r}")
    offset = (canvas - digit) // 2
    images = np.zeros((len(digits), canvas, canvas), np.float32)
    images[:, offset : offset + digit, offset : offset + digit] = digits
    ink_boxes = np.stack([digit_box_keypoints(img, "ink") for img in images]).astype(np.float32)
    keypoints = (
        ink_boxes
        if box == "ink"
        else np.stack([digit_box_keypoints(img, box, offset, digit) for img in images]).astype(np.float32)
    )
    return DigitsCanvas(
        images=images, labels=labels, keypoints=keypoints, canvas=canvas, digit=digit, ink_boxes=ink_boxes
    )


def digit_box_keypoints(image: np.ndarray, box: str = "ink", offset: int = 0, digit: int = 0) -> np.ndarray:
    """``(5, 2)`` pixel keypoints: the 4 corners (clockwise from top-left) and the centre of the digit's box.

    The box spans pixel centres, so a box over columns ``x0..x1`` has corners at ``x0`` and ``x1``.
    """
    if box == "frame":
        x0 = y0 = float(offset)
        x1 = y1 = float(offset + digit - 1)
    else:
        ys, xs = np.nonzero(image > INK_THRESHOLD)
        if len(xs) == 0:
            raise ValueError("digit image has no ink above the threshold; cannot box it")
        x0, x1, y0, y1 = float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max())
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [(x0 + x1) / 2, (y0 + y1) / 2]], np.float64)


def split_indices(
    labels: np.ndarray, test_fraction: float = 0.22, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, class-stratified, disjoint train/test split (sorted index arrays)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ---------------------------------------------------------------------------------------------- affines
def affine_about(
    centre: tuple[float, float],
    *,
    rotation_deg: float = 0.0,
    scale_x: float = 1.0,
    scale_y: float = 1.0,
    shear: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """2x3 matrix: about ``centre``, scale (x, y), then shear (x += shear * y), then rotate
    (counter-clockwise on screen for positive angles), then translate by ``shift`` pixels."""
    a = math.radians(rotation_deg)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])  # y points down
    lin = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([scale_x, scale_y])
    c = np.asarray(centre, np.float64)
    t = c - lin @ c + np.asarray(shift, np.float64)
    return np.concatenate([lin, t[:, None]], axis=1)


def transform_keypoints(keypoints: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Map pixel keypoints ``(..., K, 2)`` through 2x3 matrices ``(..., 2, 3)`` (the image's own warp)."""
    return np.einsum("...ij,...kj->...ki", matrices[..., :2], keypoints) + matrices[..., None, :, 2]


def warp_images(images: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Warp each ``(S, S)`` image by its 2x3 matrix (bilinear, black border) — the same map as
    :func:`transform_keypoints`."""
    size = images.shape[-1]
    out = np.empty_like(images)
    for i, (img, m) in enumerate(zip(images, matrices, strict=True)):
        out[i] = cv2.warpAffine(
            img, m.astype(np.float64), (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0
        )
    return out


@dataclass(frozen=True)
class AffineRange:
    """A distribution of affines. Scalars are maxima of symmetric uniform ranges; ``shift`` is the maximum
    translation as a fraction of the canvas, or ``None`` for "anywhere that keeps the digit inside"."""

    scale: tuple[float, float] = (1.0, 1.0)
    independent_xy: bool = False
    rotation_deg: float = 0.0
    shear: float = 0.0
    shift: float | None = 0.0

    def describe(self) -> str:
        xy = "independent x/y " if self.independent_xy else ""
        shift = (
            "anywhere inside the canvas" if self.shift is None else f"up to {self.shift:.0%} of the canvas"
        )
        return (
            f"{xy}scale {self.scale[0]:g}-{self.scale[1]:g}, rotation up to {self.rotation_deg:g} deg, "
            f"shear up to {self.shear:g}, shift {shift}"
        )


TRAIN_AUGMENTATION = AffineRange(scale=(0.9, 1.1), rotation_deg=10.0, shift=0.10)
# The usual affNIST training protocol (Sabour et al. 2017, CapsNet, sec. 5.2: "each example is an MNIST digit
# placed randomly on a black background of 40x40 pixels"): a translation anywhere that keeps the digit inside,
# no rotation, scale or shear. A candidate for calibrating against the paper's 77.27% (docs/experiments.md).
PLACED_AUGMENTATION = AffineRange(shift=None)
# Between the two (calibration, issue 28): "mild" leaves affNIST's 7-10 px shifts unseen (55% on the affNIST
# protocol), "placed" sees them all (82%, above the paper's 77.27%); these widen mild's shift to 5, 6 and 8 px
# on the 40x40 canvas (12.5%, 15% and 20%) and keep its rotation and scale. "calibrated": 14% (5.6 px), where
# Abs-PE's affNIST accuracy interpolates to the paper's between medium (71.15%) and wide (81.00%) at 10,000
# digits x 30 epochs (docs/experiments.md, "Calibration").
CALIBRATED_AUGMENTATION = AffineRange(scale=(0.9, 1.1), rotation_deg=10.0, shift=0.14)
MEDIUM_AUGMENTATION = AffineRange(scale=(0.9, 1.1), rotation_deg=10.0, shift=0.125)
WIDE_AUGMENTATION = AffineRange(scale=(0.9, 1.1), rotation_deg=10.0, shift=0.15)
WIDER_AUGMENTATION = AffineRange(scale=(0.9, 1.1), rotation_deg=10.0, shift=0.20)
# affNIST's random affines (https://www.cs.toronto.edu/~tijmen/affNIST/, "transformations"): rotation
# uniform in +-20 deg, shear in +-0.2, horizontal and vertical scale each in 0.8-1.2, then a translation
# that keeps the digit inside the 40x40 image. Inferred, as the page does not say: uniform draws, the shear
# is along x, the order scale -> shear -> rotation, "inside" = the ink box (pixels > INK_THRESHOLD) inside
# the canvas, the translation uniform over the positions that allow (docs/experiments.md, "Real MNIST").
AFFNIST_MIX = AffineRange(scale=(0.8, 1.2), independent_xy=True, rotation_deg=20.0, shear=0.2, shift=None)
# One-factor sweeps: each level is applied at exactly that strength (with a random sign/direction).
SWEEPS: dict[str, tuple[float, ...]] = {
    "rotation": (20.0, 35.0, 50.0),  # degrees, random sign (training sees at most 10)
    "scale": (0.7, 0.8, 1.2, 1.35),  # isotropic factor (training: 0.9-1.1)
    "translation": (4.0, 6.0, 8.0),  # pixels along x and y, random signs, digit kept inside (training: 3.2)
    "shear": (0.25, 0.5, 0.75),  # x-shear factor, random sign (training: none)
}
SWEEP_UNITS = {
    "rotation": "degrees",
    "scale": "factor",
    "translation": "pixels (each axis)",
    "shear": "x-shear",
}


def _inside_shift_range(corners: np.ndarray, size: int, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis (low, high) shifts that keep all ``corners (K, 2)`` within ``[margin, size-1-margin]``."""
    low = margin - corners.min(axis=0)
    high = (size - 1 - margin) - corners.max(axis=0)
    return low, high


def sample_affines(
    keypoints: np.ndarray, size: int, spec: AffineRange, rng: np.random.Generator
) -> np.ndarray:
    """One random affine per digit ``(N, 2, 3)`` about the canvas centre; the translation is limited so the
    digit's box stays inside the canvas (when the box cannot move, it stays where the linear part put it)."""
    centre = ((size - 1) / 2.0, (size - 1) / 2.0)
    mats = np.empty((len(keypoints), 2, 3))
    for i, kp in enumerate(keypoints):
        sx = rng.uniform(*spec.scale)
        sy = rng.uniform(*spec.scale) if spec.independent_xy else sx
        m = affine_about(
            centre,
            rotation_deg=rng.uniform(-spec.rotation_deg, spec.rotation_deg),
            scale_x=sx,
            scale_y=sy,
            shear=rng.uniform(-spec.shear, spec.shear),
        )
        low, high = _inside_shift_range(transform_keypoints(kp[:4], m), size)
        if spec.shift is not None:
            limit = spec.shift * size
            low, high = np.maximum(low, -limit), np.minimum(high, limit)
        shift = np.where(high >= low, rng.uniform(np.minimum(low, high), np.maximum(low, high)), 0.0)
        m[:, 2] += shift
        mats[i] = m
    return mats


def sweep_affines(
    keypoints: np.ndarray, size: int, factor: str, level: float, rng: np.random.Generator
) -> np.ndarray:
    """``(N, 2, 3)`` affines that change one factor by exactly ``level`` (random sign where it has one)."""
    if factor not in SWEEPS:
        raise ValueError(f"unknown sweep factor {factor!r}; expected one of {sorted(SWEEPS)}")
    centre = ((size - 1) / 2.0, (size - 1) / 2.0)
    mats = np.empty((len(keypoints), 2, 3))
    for i, kp in enumerate(keypoints):
        sign = rng.choice([-1.0, 1.0], size=2)
        if factor == "rotation":
            m = affine_about(centre, rotation_deg=sign[0] * level)
        elif factor == "scale":
            m = affine_about(centre, scale_x=level, scale_y=level)
        elif factor == "shear":
            m = affine_about(centre, shear=sign[0] * level)
        else:
            m = affine_about(centre)
            low, high = _inside_shift_range(kp[:4], size)
            # the requested shift, reduced only if that digit would leave the canvas
            m[:, 2] = np.clip(sign * level, low, high)
        mats[i] = m
    return mats


@dataclass
class TestSet:
    """One evaluation condition: images ``(M, S, S)``, labels ``(M,)``, pixel keypoints ``(M, 5, 2)``."""

    name: str
    factor: str  # clean | affnist | rotation | scale | translation | shear
    level: float
    images: np.ndarray
    labels: np.ndarray
    keypoints: np.ndarray


def build_test_sets(
    data: DigitsCanvas,
    test_idx: np.ndarray,
    seed: int = 1234,
    draws: int = 1,
    affnist_draws: int = 3,
    sweeps: dict | None = None,
) -> list[TestSet]:
    """The clean test digits, the AffNIST-style mix (``affnist_draws`` random affines per test digit) and
    the one-factor sweeps (``draws`` per digit and level). Fixed seed: every model sees the same images."""
    sweeps = SWEEPS if sweeps is None else sweeps
    rng = np.random.default_rng(seed)
    imgs, labels, kps = data.images[test_idx], data.labels[test_idx], data.keypoints[test_idx]
    boxes = data.ink_boxes[test_idx]
    sets = [TestSet("clean", "clean", 0.0, imgs, labels, kps)]

    def add(name: str, factor: str, level: float, n: int, sample) -> None:
        rep_imgs, rep_labels, rep_kps = np.repeat(imgs, n, 0), np.repeat(labels, n), np.repeat(kps, n, 0)
        mats = sample(
            np.repeat(boxes, n, 0)
        )  # limits from the ink box: same images for any keypoint definition
        warped_kps = transform_keypoints(rep_kps, mats).astype(np.float32)
        sets.append(TestSet(name, factor, level, warp_images(rep_imgs, mats), rep_labels, warped_kps))

    add("affnist", "affnist", 1.0, affnist_draws, lambda k: sample_affines(k, data.canvas, AFFNIST_MIX, rng))
    for factor, levels in sweeps.items():
        for level in levels:
            add(
                f"{factor}@{level:g}",
                factor,
                float(level),
                draws,
                lambda k, f=factor, lv=level: sweep_affines(k, data.canvas, f, lv, rng),
            )
    return sets


def keypoint_marks(keypoints: np.ndarray, size: int, sigma: float = 0.7) -> np.ndarray:
    """Abs-PE*'s extra input channel: a small Gaussian blob at each pixel keypoint, ``(N, S, S)`` in [0,
    1]."""
    grid = np.arange(size, dtype=np.float32)
    dx = grid[None, None, :] - keypoints[:, :, 0:1]  # (N, K, S)
    dy = grid[None, None, :] - keypoints[:, :, 1:2]
    gx = np.exp(-(dx**2) / (2 * sigma**2))
    gy = np.exp(-(dy**2) / (2 * sigma**2))
    blobs = np.einsum("nky,nkx->nkyx", gy, gx)
    return blobs.max(axis=1).astype(np.float32)
