"""Draw docs/results/face/aligners.png: the README's example photo (skimage.data.astronaut()) through both
aligners, dlib (HOG + 68 points, similarity warp) and the DFA (its own crop), keypoints drawn.

The DFA weights used here are the repository's reference weights (tests/fixtures/dfa), which are RANDOM, not
trained: the DFA panel shows the pipeline (the official crop and keypoints of whatever the network predicts),
not the quality of the trained aligner. Pass --aligner-weights minchul/cvlface_DFA_mobilenet (or a local copy)
to draw the trained one.

    PYTHONPATH=src python docs/results/face/make_aligners.py [--aligner-weights W] [-o aligners.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
REFERENCE_DFA = REPO / "tests" / "fixtures" / "dfa" / "dfa_weights.safetensors"


def _reference_checkpoint(folder: Path) -> Path:
    """The reference DFA weights laid out as the official checkpoint (pretrained_model/model.pt)."""
    import torch
    from safetensors.torch import load_file

    (folder / "pretrained_model").mkdir(parents=True, exist_ok=True)
    torch.save(load_file(REFERENCE_DFA), folder / "pretrained_model" / "model.pt")
    return folder


def _panel(face, title: str, scale: int = 3) -> np.ndarray:
    from kprpe.face import draw_keypoints

    big = draw_keypoints(face, scale=scale)
    bar = np.full((28, big.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([bar, big])


def main() -> None:
    from skimage.data import astronaut

    from kprpe.face import DfaAligner, DlibDetector, FacePipeline
    from kprpe.files import write_png

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aligner-weights", default=None, help="DFA weights (default: the random reference)")
    parser.add_argument("-o", "--output", default=str(HERE / "aligners.png"))
    args = parser.parse_args()
    photo = astronaut()
    dlib_face = FacePipeline(DlibDetector()).faces_in_image(photo)[0]
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.aligner_weights or _reference_checkpoint(Path(tmp))
        dfa_face = FacePipeline(DfaAligner(weights)).faces_in_image(photo)[0]
    label = "trained" if args.aligner_weights else "RANDOM reference weights"
    panels = [
        _panel(dlib_face, "dlib HOG + 68 points"),
        _panel(dfa_face, f"DFA ({label}) score {dfa_face.score:.2f}"),
    ]
    gap = np.full((panels[0].shape[0], 12, 3), 255, np.uint8)
    print(write_png(args.output, np.hstack([panels[0], gap, panels[1]])))


if __name__ == "__main__":
    main()
