"""A small synthetic face-like data set for examples and tests (no real faces, no downloads).

Each identity is a smooth random colour pattern with five coloured blobs at a jittered ArcFace template; each
image of it is that identity seen under a random similarity transform, brightness change and noise, and its
landmarks are the template moved by the same transform — so the landmark file is exact and learnable.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..keypoints import ARCFACE_TEMPLATE_112
from ..landmarks import write_landmarks

__all__ = ["make_synthetic_faces"]

_BLOB_COLOURS = np.array(
    [[255, 40, 40], [40, 255, 40], [40, 40, 255], [255, 255, 40], [40, 255, 255]], dtype=np.uint8
)


def _identity_prototype(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    base = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    kp = ARCFACE_TEMPLATE_112 / 112.0 * size + rng.normal(0, size * 0.03, size=(5, 2))
    radius = max(1, size // 16)
    for k, (x, y) in enumerate(kp):
        cv2.circle(base, (int(round(x)), int(round(y))), radius, tuple(int(c) for c in _BLOB_COLOURS[k]), -1)
    return base, kp


def make_synthetic_faces(
    folder: str | os.PathLike,
    *,
    num_identities: int = 20,
    images_per_identity: int = 16,
    size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Write ``folder/id_XXXX/img_XXX.png`` and ``folder/landmarks.csv`` (sample index = sorted listing order,
    the order :class:`FolderSource` and ``kprpe pack`` use). Returns ``(folder, landmarks path)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    all_kp = []
    for ident in tqdm(range(num_identities), desc="synthetic identities", disable=not progress):
        proto, proto_kp = _identity_prototype(rng, size)
        (folder / f"id_{ident:04d}").mkdir(exist_ok=True)
        for j in range(images_per_identity):
            angle = rng.uniform(-15, 15)
            scale = rng.uniform(0.85, 1.15)
            m = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), angle, scale)
            m[:, 2] += rng.uniform(-0.08, 0.08, size=2) * size
            img = cv2.warpAffine(
                proto, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
            )
            img = img.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.normal(0, 8, size=img.shape)
            img = np.clip(img, 0, 255).astype(np.uint8)
            kp = proto_kp @ m[:, :2].T + m[:, 2]
            cv2.imwrite(
                str(folder / f"id_{ident:04d}" / f"img_{j:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
            )
            all_kp.append(kp / size)
    landmarks = write_landmarks(folder / "landmarks.csv", np.arange(len(all_kp)), np.stack(all_kp))
    return folder, landmarks
