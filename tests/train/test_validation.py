"""Training validation is the evaluation, called: the same reader, faces and 10-fold accuracy."""

from __future__ import annotations

import cv2
import numpy as np
import torch

import kprpe
from kprpe.eval import EvalSettings, ModelHandle, evaluate_bins, write_verification_bin
from kprpe.train import load_verification_bin, validation_accuracy


def test_training_validation_reports_the_eval_number(tmp_path):
    rng = np.random.default_rng(0)
    images = [cv2.imencode(".png", rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))[1].tobytes()
              for _ in range(40)]
    write_verification_bin(tmp_path / "toy.bin", images, [True, False] * 10)
    torch.manual_seed(0)
    model = kprpe.create_model("vit_tiny_kprpe", depth=2)
    with torch.no_grad():
        model.keypoint_linear.weight.normal_(0, 0.1)
    weights = kprpe.save_model(model, tmp_path / "model.safetensors")
    model.train()

    acc, std = validation_accuracy(
        model, load_verification_bin(tmp_path / "toy.bin"), image_size=112, batch_size=8
    )
    assert model.training  # the trainer's mode is given back
    settings = EvalSettings(batch_size=8, progress=False)
    kfold = evaluate_bins(ModelHandle(weights), [tmp_path / "toy.bin"], settings,
                          keypoint_source="template")["sets"]["toy"]["kfold"]
    assert (acc, std) == (kfold["accuracy_mean"], kfold["accuracy_std"])
