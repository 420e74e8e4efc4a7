"""Evaluation embeddings never depend on a timing: KP-RPE's ``auto`` bias path is pinned while embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kprpe
from kprpe.eval.embedding import FaceSource, embed_faces
from kprpe.nn.keypoint_rpe import KeypointRPE


def test_embed_faces_never_times_the_bias_paths(monkeypatch):
    def timed(self, keypoints):
        raise AssertionError("evaluation timed the bias paths: its numbers would follow the machine's load")

    monkeypatch.setattr(KeypointRPE, "_time_paths", timed)
    torch.manual_seed(0)
    model = kprpe.create_model("vit_tiny_kprpe", kp_bias_impl="auto", img_size=48).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    keypoints = rng.uniform(0.2, 0.8, (4, 5, 2)).astype(np.float32)
    source = FaceSource(4, lambda a, b: (images[a:b], keypoints[a:b]), "test")
    emb, norms = embed_faces(model, source, flip=False, batch_size=2, progress=False)
    assert emb.shape == (4, model.config.output_dim) and model.kprpe.last_impl == "gather"
    with pytest.raises(AssertionError, match="timed the bias paths"), torch.no_grad():
        model(torch.zeros(1, 3, 48, 48), torch.full((1, 5, 2), 0.5))  # outside evaluation: auto times
