"""The DFA anchor aggregator: MLP-Mixer blocks over the anchors, then one logit per anchor.

The blocks follow the MLP-Mixer block as timm defines it by default (the official aligner builds timm's
``MixerBlock(16, 1050)``): pre-LayerNorm (eps 1e-6) token-mixing MLP across anchors with hidden size
``int(0.5 * channels)``, then a channel MLP with hidden size ``4 * channels``, exact GELU, residual adds.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MixerBlock", "MixerMlp", "build_aggregator"]

TOKEN_MLP_RATIO = 0.5
CHANNEL_MLP_RATIO = 4.0
LAYER_NORM_EPS = 1e-6


class MixerMlp(nn.Module):
    """Linear -> GELU -> Linear (parameter names ``fc1``/``fc2`` as in the checkpoint)."""

    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    """``x + tokenMLP(LN(x)^T)^T``, then ``x + channelMLP(LN(x))``; input ``(B, tokens, channels)``."""

    def __init__(self, channels: int, tokens: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, eps=LAYER_NORM_EPS)
        self.mlp_tokens = MixerMlp(tokens, int(TOKEN_MLP_RATIO * channels))
        self.norm2 = nn.LayerNorm(channels, eps=LAYER_NORM_EPS)
        self.mlp_channels = MixerMlp(channels, int(CHANNEL_MLP_RATIO * channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


def build_aggregator(tokens: int, channels: int = 16, depth: int = 3) -> nn.Sequential:
    """``Sequential(MixerBlock x depth, Linear(channels, 1))``: one softmax logit per anchor."""
    return nn.Sequential(*[MixerBlock(channels, tokens) for _ in range(depth)], nn.Linear(channels, 1))
