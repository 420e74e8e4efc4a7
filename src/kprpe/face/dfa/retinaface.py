"""RetinaFace with a MobileNet-0.25 body: the landmark network inside the official DFA aligner.

Module and parameter names follow the official checkpoint layout (``body.stage1.0.0.weight``, ``fpn.merge1``,
``ssh1.conv5X5_1``, ``ClassHead.0.conv1x1``, ``aggregator.0.mlp_tokens.fc1`` ...), so an official state dict
loads strictly. The network reads a BGR 160x160 image in [-1, 1] and predicts, for each of the 1050 anchors,
a box, a face/background logit pair and five landmarks; the aggregator turns those into one weighted average.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .aggregator import build_aggregator

__all__ = ["INPUT_SIZE", "PRIOR_VARIANCES", "RetinaFace", "decode_boxes", "decode_landmarks", "make_priors"]

INPUT_SIZE = 160
# Anchor sizes per level (pixels of the 160 frame) and level strides, as the official mobilenet0.25 config.
ANCHOR_MIN_SIZES = ((64, 80), (96, 112), (128, 144))
ANCHOR_STEPS = (8, 16, 32)
PRIOR_VARIANCES = (0.1, 0.2)
ANCHORS_PER_LOCATION = 2
# Every leaky ReLU of the mobilenet0.25 configuration (FPN and SSH use it because their channels are <= 64).
LEAKY_SLOPE = 0.1


def _conv_bn(
    inp: int, out: int, stride: int = 1, *, leaky: float | None = LEAKY_SLOPE, kernel: int = 3
) -> nn.Sequential:
    """Conv (no bias) + BatchNorm, followed by a leaky ReLU unless ``leaky`` is None."""
    layers: list[nn.Module] = [
        nn.Conv2d(inp, out, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out),
    ]
    if leaky is not None:
        layers.append(nn.LeakyReLU(negative_slope=leaky))
    return nn.Sequential(*layers)


def _conv_dw(inp: int, out: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 + BN + leaky ReLU, then pointwise 1x1 + BN + leaky ReLU (indices 0,1,2 and 3,4,5)."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.LeakyReLU(negative_slope=LEAKY_SLOPE),
        nn.Conv2d(inp, out, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out),
        nn.LeakyReLU(negative_slope=LEAKY_SLOPE),
    )


class MobileNetBody(nn.Module):
    """MobileNetV1 x0.25 cut after stage 3: the stride 8, 16, 32 feature maps (64, 128, 256 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv_bn(3, 8, 2),
            _conv_dw(8, 16, 1),
            _conv_dw(16, 32, 2),
            _conv_dw(32, 32, 1),
            _conv_dw(32, 64, 2),
            _conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(_conv_dw(64, 128, 2), *[_conv_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(_conv_dw(128, 256, 2), _conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        c3 = self.stage3(c2)
        return [c1, c2, c3]


class FeaturePyramid(nn.Module):
    """Top-down FPN: 1x1 lateral convs to 64 channels, nearest upsampling, 3x3 merge convs."""

    def __init__(self, in_channels: tuple[int, int, int], out_channels: int) -> None:
        super().__init__()
        self.output1 = _conv_bn(in_channels[0], out_channels, kernel=1)
        self.output2 = _conv_bn(in_channels[1], out_channels, kernel=1)
        self.output3 = _conv_bn(in_channels[2], out_channels, kernel=1)
        self.merge1 = _conv_bn(out_channels, out_channels)
        self.merge2 = _conv_bn(out_channels, out_channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        out1 = self.output1(features[0])
        out2 = self.output2(features[1])
        out3 = self.output3(features[2])
        out2 = self.merge2(out2 + F.interpolate(out3, size=out2.shape[-2:], mode="nearest"))
        out1 = self.merge1(out1 + F.interpolate(out2, size=out1.shape[-2:], mode="nearest"))
        return [out1, out2, out3]


class ContextModule(nn.Module):
    """SSH context module: 3x3, "5x5" (two 3x3) and "7x7" (three 3x3) branches concatenated, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels % 4:
            raise ValueError(f"SSH output channels must be a multiple of 4, got {out_channels}")
        quarter = out_channels // 4
        self.conv3X3 = _conv_bn(in_channels, out_channels // 2, leaky=None)
        self.conv5X5_1 = _conv_bn(in_channels, quarter)
        self.conv5X5_2 = _conv_bn(quarter, quarter, leaky=None)
        self.conv7X7_2 = _conv_bn(quarter, quarter)
        self.conv7x7_3 = _conv_bn(quarter, quarter, leaky=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3 = self.conv3X3(x)
        shared = self.conv5X5_1(x)
        branch5 = self.conv5X5_2(shared)
        branch7 = self.conv7x7_3(self.conv7X7_2(shared))
        return F.relu(torch.cat([branch3, branch5, branch7], dim=1))


class _AnchorHead(nn.Module):
    """1x1 conv predicting ``values`` numbers per anchor; output ``(B, H*W*anchors, values)``."""

    def __init__(self, in_channels: int, values: int, anchors: int = ANCHORS_PER_LOCATION) -> None:
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(in_channels, anchors * values, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1).contiguous()
        return out.view(out.shape[0], -1, self.values)


def feature_map_sizes(image_size: int = INPUT_SIZE) -> list[int]:
    """Side of the feature map at each level (ceil(size / stride))."""
    return [math.ceil(image_size / step) for step in ANCHOR_STEPS]


def make_priors(image_size: int = INPUT_SIZE) -> torch.Tensor:
    """Anchors ``(N, 4)``, ``(cx, cy, w, h) / image_size``; order: level, row, column, anchor size."""
    rows = []
    for side, step, sizes in zip(feature_map_sizes(image_size), ANCHOR_STEPS, ANCHOR_MIN_SIZES, strict=True):
        for i in range(side):
            for j in range(side):
                for size in sizes:
                    cx = (j + 0.5) * step / image_size
                    cy = (i + 0.5) * step / image_size
                    rows.append([cx, cy, size / image_size, size / image_size])
    return torch.tensor(rows, dtype=torch.float32)


def decode_boxes(regression: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Box regressions ``(B, N, 4)`` -> ``(x0, y0, x1, y1)`` normalised by the input size (SSD encoding)."""
    centre = priors[:, :2] + regression[..., :2] * PRIOR_VARIANCES[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(regression[..., 2:] * PRIOR_VARIANCES[1])
    top_left = centre - size / 2
    return torch.cat([top_left, top_left + size], dim=-1)


def decode_landmarks(regression: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Landmark regressions ``(B, N, 10)`` -> ``x0, y0, ..., x4, y4`` normalised by the input size."""
    batch, count, _ = regression.shape
    offsets = regression.view(batch, count, 5, 2) * PRIOR_VARIANCES[0] * priors[:, None, 2:]
    return (priors[:, None, :2] + offsets).reshape(batch, count, 10)


class RetinaFace(nn.Module):
    """Body, FPN, SSH and per-level heads, plus the mixer aggregator that averages the anchors' predictions.

    ``forward(bgr)`` takes ``(B, 3, 160, 160)`` BGR in [-1, 1] and returns ``agg`` ``(B, 16)``:
    ``[box (4), class logits (2), landmarks (10)]`` in the 160 frame normalised to [0, 1].
    """

    def __init__(self, image_size: int = INPUT_SIZE, channels: int = 64) -> None:
        super().__init__()
        self.image_size = image_size
        self.body = MobileNetBody()
        self.fpn = FeaturePyramid((64, 128, 256), channels)
        self.ssh1 = ContextModule(channels, channels)
        self.ssh2 = ContextModule(channels, channels)
        self.ssh3 = ContextModule(channels, channels)
        self.ClassHead = nn.ModuleList([_AnchorHead(channels, 2) for _ in range(3)])
        self.BboxHead = nn.ModuleList([_AnchorHead(channels, 4) for _ in range(3)])
        self.LandmarkHead = nn.ModuleList([_AnchorHead(channels, 10) for _ in range(3)])
        self.num_anchors = ANCHORS_PER_LOCATION * sum(s * s for s in feature_map_sizes(image_size))
        self.aggregator = build_aggregator(tokens=self.num_anchors, channels=16)
        self.register_buffer("priors", make_priors(image_size), persistent=False)

    def forward(self, bgr: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        """Aggregated prediction ``(B, 16)``; fills ``trace`` (if given) with every intermediate tensor."""
        body = self.body(bgr)
        pyramid = self.fpn(body)
        context = [self.ssh1(pyramid[0]), self.ssh2(pyramid[1]), self.ssh3(pyramid[2])]
        box_reg = torch.cat([head(f) for head, f in zip(self.BboxHead, context, strict=True)], dim=1)
        cls_logits = torch.cat([head(f) for head, f in zip(self.ClassHead, context, strict=True)], dim=1)
        ldmk_reg = torch.cat([head(f) for head, f in zip(self.LandmarkHead, context, strict=True)], dim=1)
        priors = self.priors.to(box_reg.dtype)
        boxes = decode_boxes(box_reg, priors)
        landmarks = decode_landmarks(ldmk_reg, priors)
        combined = torch.cat([boxes, cls_logits, landmarks], dim=-1)
        tokens = combined
        mixer_out = []
        for block in self.aggregator[:-1]:
            tokens = block(tokens)
            mixer_out.append(tokens)
        logits = self.aggregator[-1](tokens)
        weights = torch.softmax(logits, dim=1)
        agg = (weights * combined).sum(dim=1)
        if trace is not None:
            trace.update({f"body.{i + 1}": t for i, t in enumerate(body)})
            trace.update({f"fpn.{i}": t for i, t in enumerate(pyramid)})
            trace.update({f"ssh.{i + 1}": t for i, t in enumerate(context)})
            trace.update({f"mixer_out.{i}": t for i, t in enumerate(mixer_out)})
            trace.update(
                anchor_bbox_reg=box_reg,
                anchor_cls_logits=cls_logits,
                anchor_cls_softmax=torch.softmax(cls_logits, dim=-1),
                anchor_ldmk_reg=ldmk_reg,
                decoded_bbox=boxes,
                decoded_ldmk=landmarks,
                combined=combined,
                agg_logits=logits,
                agg_weights=weights,
                agg=agg,
            )
        return agg
