"""Make docs/results/gait/pretreatment.png: synthetic walkers before and after the pretreatment, with their
keypoints drawn.

Run from the repo root: ``python docs/results/gait/make_figure.py`` (seeded: the same picture each run).
Row 1: raw frames (the "human crop" a data set ships) with the detector-like keypoints. Row 2: the same frames
after `kprpe gait pack`'s pretreatment (64 x 44), keypoints moved by the same transform. Row 3: `--misalign`.
Green: confidence >= 0.5; red: below (dropped or occluded joints).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from kprpe.files import write_png
from kprpe.gait.pretreatment import pretreat_frame_and_keypoints
from kprpe.gait.synthetic import SyntheticConfig, draw_identity, render_walk, walk_sequence

OUT = Path(__file__).resolve().parent / "pretreatment.png"
LIMBS = [(5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16), (5, 6), (11, 12), (5, 11),
         (6, 12), (0, 1), (0, 2), (1, 3), (2, 4)]  # fmt: skip


def draw(frame: np.ndarray, keypoints: np.ndarray, zoom: int) -> np.ndarray:
    """A grey silhouette, zoomed with nearest neighbour, with the skeleton and joints on top (RGB)."""
    big = cv2.resize(frame, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST) // 2
    rgb = np.repeat(big[..., None], 3, axis=2)
    # pixel centres: output pixel j covers [j*zoom, (j+1)*zoom), its centre at (j + 0.5) * zoom
    points = [(int(round((x + 0.5) * zoom)), int(round((y + 0.5) * zoom))) for x, y, _ in keypoints]
    for a, b in LIMBS:
        if keypoints[a, 2] >= 0.5 and keypoints[b, 2] >= 0.5:
            cv2.line(rgb, points[a], points[b], (90, 160, 255), 1, cv2.LINE_AA)
    for (x, y), c in zip(points, keypoints[:, 2], strict=True):
        colour = (40, 220, 40) if c >= 0.5 else (230, 40, 40)
        cv2.circle(rgb, (x, y), max(2, zoom // 2), colour, -1, cv2.LINE_AA)
    return rgb


def main() -> None:
    config = SyntheticConfig(seed=0, views=(90, 60, 120), occluder_probability=0.0, dropout=0.08)
    raw_row, packed_row, shifted_row = [], [], []
    for walker in range(3):
        identity = draw_identity(np.random.default_rng([0, walker, 0]))
        frames, keypoints, _ = render_walk(identity, np.random.default_rng([0, walker, 1]), config)
        misaligned = SyntheticConfig(seed=0, views=(90, 60, 120), occluder_probability=0.0, misalign=True)
        sils, pose, _ = walk_sequence(identity, np.random.default_rng([0, walker, 1]), misaligned)
        for k in (0, 6):
            raw_row.append(draw(frames[k], keypoints[k], 2))  # 128 x 112 -> 256 x 224
            frame, moved, _ = pretreat_frame_and_keypoints(frames[k], keypoints[k], 44)
            packed_row.append(cv2.copyMakeBorder(draw(frame, moved, 4), 0, 0, 0, 48, cv2.BORDER_CONSTANT))
            shifted = draw(sils[k], pose[k], 4)
            shifted_row.append(cv2.copyMakeBorder(shifted, 0, 0, 0, 48, cv2.BORDER_CONSTANT))
    gap = np.full((256, 8, 3), 255, np.uint8)
    rows = [np.concatenate([x for tile in row for x in (tile, gap)], axis=1) for row in (raw_row, packed_row,
                                                                                        shifted_row)]
    width = max(r.shape[1] for r in rows)
    rows = [cv2.copyMakeBorder(r, 0, 8, 0, width - r.shape[1], cv2.BORDER_CONSTANT, value=(255, 255, 255))
            for r in rows]  # fmt: skip
    write_png(OUT, np.concatenate(rows, axis=0))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
