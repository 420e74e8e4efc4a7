"""A short smoke demo: build a KP-RPE ViT, embed synthetic face-like inputs aligned and misaligned, and show
that the keypoints steer the attention bias. Untrained weights: the numbers show plumbing, not accuracy."""

from __future__ import annotations

import time

import torch

from .errors import KprpeError
from .keypoints import template_keypoints
from .nn import create_model, normalize_embedding, num_parameters
from .nn.registry import preset_family


def run_demo(model_name: str = "vit_small_kprpe", batch_size: int = 4, seed: int = 0) -> int:
    try:
        family = preset_family(model_name)
    except ValueError as exc:
        raise KprpeError(str(exc)) from None
    if family.name == "swingait":
        # gait models take silhouette sequences, not face images
        raise KprpeError(
            f"{model_name} is a gait model (silhouette sequences); this demo embeds face images. "
            "Try `kprpe experiment gait --quick` for gait."
        )
    torch.manual_seed(seed)
    model = create_model(model_name).eval()
    # A fresh model's keypoint table is zero (it starts as a plain ViT); give it small random values so the
    # demo shows keypoints at work.
    # (ViT has one table, Swin one per stage: every `kprpe.*linear.weight`).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("kprpe.") and name.endswith("linear.weight"):
                param.normal_(0, 0.5)
    images = torch.rand(batch_size, 3, model.config.img_size, model.config.img_size) * 2 - 1
    keypoints = template_keypoints(batch_size)
    shifted = keypoints + torch.tensor([0.15, -0.1])
    # only ViT configs name a relative position encoding; other families say what they are
    position = getattr(model.config, "rel_pos", None)
    detail = f", rel_pos={position}" if position is not None else ""
    print(f"model {model_name} ({family.name}): {num_parameters(model):,} parameters{detail}")
    with torch.inference_mode():
        start = time.perf_counter()
        emb = model(images, keypoints)
        elapsed = time.perf_counter() - start
        emb_shift = model(images, shifted)
    unit, norm = normalize_embedding(emb)
    unit_shift, _ = normalize_embedding(emb_shift)
    cos = (unit * unit_shift).sum(-1)
    print(
        f"embedded {batch_size} images of {tuple(images.shape[1:])} in {elapsed:.2f}s -> {tuple(emb.shape)}"
    )
    print(f"embedding norms: {[round(v, 2) for v in norm.flatten().tolist()]}")
    print(f"cosine(same image, keypoints moved by (+0.15, -0.10)): {[round(v, 6) for v in cos.tolist()]}")
    if not any(name.startswith("kprpe.") for name, _ in model.named_parameters()):
        print(f"({model_name} has no KP-RPE: it ignores keypoints, so the cosines are 1)")
    print("(untrained weights: load a trained checkpoint with kprpe.load_official for real use)")
    return 0
