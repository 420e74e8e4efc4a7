"""The models compared in the digits experiment: one shallow ViT from the library's core, with different
position encodings (``kprpe.nn.VisionTransformer`` options only — no separate toy implementation)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn import VisionTransformer
from .digits_data import NUM_CLASSES, NUM_KEYPOINTS

__all__ = [
    "ModelSpec",
    "MODEL_SPECS",
    "DEFAULT_MODELS",
    "EXTRA_MODELS",
    "QUICK_MEAN_HEAD_MODELS",
    "DigitClassifier",
    "build_classifier",
    "resolve_models",
]


@dataclass(frozen=True)
class ModelSpec:
    """One compared model: ``overrides`` are :class:`kprpe.ViTConfig` fields; ``marks`` adds Abs-PE*'s
    keypoint channel to the image."""

    name: str
    label: str
    overrides: dict = field(default_factory=dict)
    marks: bool = False
    group: str = "main"  # main | ablation | control | learned (keypoints from a learned predictor)
    note: str = ""
    learned_keypoints: bool = False  # keypoints predicted from the image (LearnedKeypointViT), no labels
    # training-time keypoint noise: per image, Gaussian noise of a sigma drawn uniformly in [0, this] canvas
    # pixels is added to the keypoints the model sees (the image is untouched)
    train_keypoint_noise: float = 0.0


MODEL_SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            "abs", "Abs-PE", dict(abs_pos=True, rel_pos="none"), note="learned absolute embedding only"
        ),
        ModelSpec(
            "abs_marks",
            "Abs-PE*",
            dict(abs_pos=True, rel_pos="none"),
            marks=True,
            note="keypoints drawn as an extra input channel",
        ),
        ModelSpec("rpe", "RPE", dict(rel_pos="rpe"), note="bias table per head and bucket, plus Abs-PE"),
        ModelSpec(
            "irpe", "iRPE", dict(rel_pos="irpe"), note="contextual product iRPE (q, k, v), plus Abs-PE"
        ),
        ModelSpec(
            "kprpe",
            "KP-RPE",
            dict(rel_pos="kprpe"),
            note="paper's final: relative f(P), multi-head per-layer, plus Abs-PE",
        ),
        ModelSpec(
            "kprpe_noabs",
            "KP-RPE, no Abs-PE",
            dict(rel_pos="kprpe", abs_pos=False),
            note="keypoint bias is the only position signal",
        ),
        ModelSpec(
            "fp_absolute",
            "f(P) absolute",
            dict(rel_pos="kprpe", kp_input="absolute", kp_sharing="shared"),
            group="ablation",
            note="one table from the flattened keypoints, same for every query",
        ),
        ModelSpec(
            "fp_relative",
            "f(P) relative",
            dict(rel_pos="kprpe", kp_sharing="shared"),
            group="ablation",
            note="relative f(P), one table shared by heads and layers",
        ),
        ModelSpec(
            "fp_multihead",
            "f(P) multi-head",
            dict(rel_pos="kprpe", kp_sharing="head"),
            group="ablation",
            note="relative f(P), per head, shared across layers",
        ),
        ModelSpec(
            "qpos_rpe",
            "query-position RPE",
            dict(rel_pos="kprpe", kp_input="query_position"),
            group="control",
            note="KP-RPE's keypoint-free half: table depends on the query position only",
        ),
        ModelSpec(
            "kprpe_mlp",
            "KP-RPE, MLP f",
            dict(rel_pos="kprpe", kp_hidden=64),
            group="control",
            note="non-linear f (one hidden layer of 64, GELU)",
        ),
        ModelSpec(
            "rpe_noabs",
            "RPE, no Abs-PE",
            dict(rel_pos="rpe", abs_pos=False),
            group="control",
            note="relative-only, no keypoints (not in the default run; pair it with the mean head)",
        ),
        ModelSpec(
            "kprpe_noabs_kpnoise",
            "KP-RPE, no Abs-PE, keypoint-noise aug.",
            dict(rel_pos="kprpe", abs_pos=False),
            group="control",
            train_keypoint_noise=4.0,
            note="kprpe_noabs trained with noisy keypoints (sigma ~ U(0, 4) px per image; not in the default "
            "run)",
        ),
        ModelSpec(
            "kprpe_learned_noabs",
            "KP-RPE, learned keypoints, no Abs-PE",
            dict(rel_pos="kprpe", abs_pos=False),
            group="learned",
            learned_keypoints=True,
            note="learned-keypoints model: 5 points from a tiny CNN + soft-argmax, trained end to end, "
            "no landmark labels (not in the default run)",
        ),
    )
}
# the default full run (rpe_noabs is an extra control, used in the investigations)
EXTRA_MODELS = ("rpe_noabs", "kprpe_noabs_kpnoise", "kprpe_learned_noabs")
DEFAULT_MODELS = tuple(name for name in MODEL_SPECS if name not in EXTRA_MODELS)
# --quick: the three models whose comparison is the study's clearest result, all with the mean-pooling head
# (the head that lets a relative encoding matter): Abs-PE, relative-only RPE, relative-only KP-RPE
QUICK_MEAN_HEAD_MODELS = ("abs", "rpe_noabs", "kprpe_noabs")


def resolve_models(names: list[str] | tuple[str, ...] | None) -> list[ModelSpec]:
    """Specs for ``names`` (all when None); unknown names raise a ValueError listing the known ones."""
    if not names:
        return list(MODEL_SPECS.values())
    unknown = [n for n in names if n not in MODEL_SPECS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(MODEL_SPECS)}")
    return [MODEL_SPECS[n] for n in dict.fromkeys(names)]


class DigitClassifier(nn.Module):
    """The core ViT (embedding head) followed by a linear layer to the 10 digit classes."""

    def __init__(self, backbone: VisionTransformer, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.config.output_dim, num_classes)

    def forward(self, images: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.backbone(images, keypoints))


def build_classifier(
    spec: ModelSpec,
    *,
    canvas: int,
    patch: int,
    width: int,
    depth: int,
    heads: int,
    mlp_ratio: float,
    head: str,
) -> DigitClassifier:
    """Same width/depth/heads for every model; only the position encoding (and Abs-PE*'s channel) differ."""
    overrides = dict(
        img_size=canvas,
        patch_size=patch,
        in_chans=2 if spec.marks else 1,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        output_dim=width,
        num_keypoints=NUM_KEYPOINTS,
        head=head,
    )
    overrides.update(spec.overrides)
    vit = VisionTransformer(**overrides)
    if spec.learned_keypoints:
        from ..nn.learned_keypoints import LearnedKeypointViT

        return DigitClassifier(LearnedKeypointViT(vit))
    return DigitClassifier(vit)
