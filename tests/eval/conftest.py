from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from kprpe.keypoints import ARCFACE_TEMPLATE_112

REPO = Path(__file__).resolve().parents[2]
TINY_KPRPE = REPO / "tests" / "fixtures" / "tiny_kprpe.safetensors"
TINY_VIT = REPO / "tests" / "fixtures" / "tiny_vit.safetensors"


def synthetic_photo(rng: np.random.Generator, size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """A textured RGB photo with a face-like layout and its 5 landmarks (pixels), randomly posed."""
    image = cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (5, 5), 0)
    angle = rng.uniform(-0.3, 0.3)
    scale = rng.uniform(0.9, 1.2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([size / 2, size / 2]) + rng.uniform(-8, 8, 2)
    lm = (ARCFACE_TEMPLATE_112 - [56, 64]) * scale @ rot.T + centre
    for x, y in lm:
        cv2.circle(image, (int(round(x)), int(round(y))), 4, (255, 255, 255), -1)
    return image, lm


def write_rgb(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


@pytest.fixture
def photo_pairs(tmp_path):
    """12 photos, 20 pairs (CSV), a pixel landmark file: the input of `pairs` and `sweep`."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    names, lines = [], []
    for i in range(12):
        image, lm = synthetic_photo(rng)
        name = f"img{i:02d}.png"
        write_rgb(root / name, image)
        names.append(name)
        lines.append(name + " " + " ".join(f"{v:.3f}" for v in lm.reshape(-1)) + " 0.99")
    (root / "landmarks.txt").write_text("\n".join(lines) + "\n")
    rows = ["image_a,image_b,label"]
    for k in range(20):
        a, b = names[k % 12], names[(k * 5 + 1) % 12]
        rows.append(f"{a},{b},{k % 2}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root
