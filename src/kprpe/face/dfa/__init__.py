"""The official Differentiable Face Aligner (DFA) of CVLface, reimplemented in plain torch.

>>> from kprpe.face.dfa import load_aligner
>>> aligner = load_aligner("path/to/cvlface_DFA_mobilenet")       # folder, model.pt or model.safetensors
>>> out = aligner(rgb)           # rgb: (B, 3, H, W) float in [-1, 1]
>>> out.aligned_x, out.aligned_ldmks, out.score                    # (B,3,112,112), (B,5,2) in [0,1], (B,1)
"""

from __future__ import annotations

from .aligner import (
    OUTPUT_SIZE,
    AlignerInputError,
    AlignerOutput,
    DifferentiableFaceAligner,
    input_landmarks,
)
from .checkpoint import AlignerCheckpointError, load_aligner
from .retinaface import INPUT_SIZE

__all__ = [
    "INPUT_SIZE",
    "OUTPUT_SIZE",
    "AlignerCheckpointError",
    "AlignerInputError",
    "AlignerOutput",
    "DifferentiableFaceAligner",
    "input_landmarks",
    "load_aligner",
]
