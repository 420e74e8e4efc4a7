"""Swin-V2 face backbone, plain (continuous position bias) or with windowed KP-RPE: the official CVLface
``swin`` / ``swin_kprpe`` models, with their state dict layout.

Conventions (checked against the official vectors, docs/models.md "Swin"): channels-last maps ``(B, H, W,
C)``; patch embedding Conv(p, stride p) -> LayerNorm; post-norm blocks ``x + LN1(attn(x))``, ``x +
LN2(mlp(x))`` with exact GELU; cosine attention ``cos(q, k) * exp(min(logit_scale, ln 100))`` with the key
third of ``qkv.bias`` replaced by 0; windows padded, shifted and cut as in :mod:`kprpe.nn.windows`; padded
tokens are attended to, not masked; PatchMergingV2 (pad odd maps, concatenate ``(0,0), (1,0), (0,1), (1,1)``,
Linear 4C -> 2C, LayerNorm); head LayerNorm -> flatten ``(row, col, channel)`` -> Linear -> BN -> Linear ->
BN, not L2-normalised. The plain model adds Swin-V2's CPB ``16 * sigmoid(cpb_mlp(coords))``; the KP-RPE model
replaces it with one :class:`~kprpe.nn.keypoint_rpe.KeypointRPE` per stage (saved at the top level as
``keypoint_linear.<stage>``, outside the network) whose table is made once per stage and gathered per window.
The CPB buffers stay in the state dict in both (the official layout).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .attention import DropPath
from .buckets import METHODS
from .checkpoint import CheckpointError
from .keypoint_rpe import KP_SHARINGS, WINDOW_BIAS_IMPLS, KeypointRPE, _rename
from .registry import config_from_dict, register_family, register_model
from .windows import merge, partition, shift_mask

__all__ = [
    "SWIN_ENCODINGS",
    "SWIN_PRESETS",
    "SwinConfig",
    "SwinTransformer",
    "is_swin_checkpoint",
    "swin_config_from_state_dict",
    "load_swin",
]

SWIN_ENCODINGS = ("cpb", "kprpe", "none")
SWIN_ATTN_IMPLS = ("sdpa", "math")
# The official face presets (swin/names.py swin_v2_s / swin_v2_b on a 112 x 112 input): they differ only in
# the third stage's depth and the stochastic depth rate.
_OFFICIAL = dict(img_size=112, patch_size=3, embed_dim=128, num_heads=(4, 8, 16, 32), window_size=(5, 5))
SWIN_SIZES = {
    "small": dict(_OFFICIAL, depths=(2, 2, 12, 2), drop_path_rate=0.3),
    "base": dict(_OFFICIAL, depths=(2, 2, 18, 2), drop_path_rate=0.5),
}
SWIN_PRESETS = {
    f"swin_{size}{suffix}": dict(values, rel_pos=rel_pos)
    for size, values in SWIN_SIZES.items()
    for suffix, rel_pos in (("", "cpb"), ("_kprpe", "kprpe"))
}
LOG_100 = math.log(100.0)  # the logit scale's clamp


@dataclass
class SwinConfig:
    """Every architecture choice of :class:`SwinTransformer` (defaults: the official Swin-Small face net)."""

    img_size: int = 112
    patch_size: int = 3
    in_chans: int = 3
    embed_dim: int = 128
    depths: tuple = (2, 2, 12, 2)
    num_heads: tuple = (4, 8, 16, 32)
    window_size: tuple = (5, 5)  # (height, width); an int means a square window
    mlp_ratio: float = 4.0
    output_dim: int = 512
    qkv_bias: bool = True
    rel_pos: str = "cpb"  # cpb (Swin-V2's continuous position bias) | kprpe | none
    num_keypoints: int = 5
    kp_sharing: str = "layer_head"  # official ctx_type rel_keypoint_splithead_unshared
    rpe_method: str = "product"
    rpe_ratio: float = 1.9
    cpb_hidden: int = 512
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attn_impl: str = "sdpa"  # sdpa (fused) | math (explicit softmax: the official arithmetic)
    # KP-RPE's windowed bias: gather (one index for all windows; auto = gather) | loop (the official
    # per-window Python loop, for benchmarks; same numbers)
    kp_bias_impl: str = "auto"
    extra: dict = field(default_factory=dict)

    arch = "swin"  # written with saved configs so the loader knows the family (not a dataclass field)

    def __post_init__(self) -> None:
        window = self.window_size
        self.window_size = (window, window) if isinstance(window, int) else tuple(window)
        self.depths = tuple(self.depths) if isinstance(self.depths, (list, tuple)) else self.depths
        heads = self.num_heads
        if isinstance(heads, int) and isinstance(self.depths, tuple):
            heads = [heads] * len(self.depths)
        self.num_heads = tuple(heads) if isinstance(heads, (list, tuple)) else heads

    def validate(self) -> SwinConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid Swin config: {msg}")

        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "output_dim", "num_keypoints"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}")
        need(
            isinstance(self.depths, tuple)
            and self.depths
            and all(isinstance(d, int) and d > 0 for d in self.depths),
            f"depths must be positive ints, one per stage, got {self.depths!r}",
        )
        need(
            isinstance(self.num_heads, tuple) and len(self.num_heads) == len(self.depths),
            f"num_heads must give one head count per stage ({len(self.depths)}), got {self.num_heads!r}",
        )
        for s, heads in enumerate(self.num_heads):
            dim = self.stage_dim(s)
            need(
                isinstance(heads, int) and heads > 0 and dim % heads == 0,
                f"stage {s}: width {dim} is not divisible by {heads} heads",
            )
        need(
            len(self.window_size) == 2 and all(isinstance(w, int) and w > 0 for w in self.window_size),
            f"window_size must be a positive int or (height, width), got {self.window_size!r}",
        )
        need(self.img_size >= self.patch_size, f"img_size {self.img_size} is smaller than the patch")
        need(self.mlp_ratio > 0, f"mlp_ratio must be positive, got {self.mlp_ratio}")
        need(self.rel_pos in SWIN_ENCODINGS, f"rel_pos {self.rel_pos!r} not in {SWIN_ENCODINGS}")
        need(self.kp_sharing in KP_SHARINGS, f"kp_sharing {self.kp_sharing!r} not in {KP_SHARINGS}")
        need(self.rpe_method in METHODS, f"rpe_method {self.rpe_method!r} not in {METHODS}")
        need(
            self.kp_bias_impl in WINDOW_BIAS_IMPLS,
            f"kp_bias_impl {self.kp_bias_impl!r} not in {WINDOW_BIAS_IMPLS}",
        )
        need(self.attn_impl in SWIN_ATTN_IMPLS, f"attn_impl {self.attn_impl!r} not in {SWIN_ATTN_IMPLS}")
        return self

    @property
    def depth(self) -> int:
        """Blocks in all stages (what ``kprpe models`` lists as depth)."""
        return sum(self.depths)

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    @property
    def map_sizes(self) -> list[int]:
        """Side of each stage's token map: ``img // patch``, then halved (rounded up) by each merge."""
        sizes = [self.img_size // self.patch_size]
        for _ in self.depths[1:]:
            sizes.append(-(-sizes[-1] // 2))
        return sizes

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values.update(
            depths=list(self.depths), num_heads=list(self.num_heads), window_size=list(self.window_size)
        )
        return {"arch": self.arch, **values}

    @classmethod
    def from_dict(cls, values: Mapping) -> SwinConfig:
        return config_from_dict(cls, values, "Swin")


# ---------------------------------------------------------------------- modules
class Permute(nn.Module):
    """Channels-first conv output to the channels-last map (holds no weights; index 1 of the stem)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class ContinuousPositionBias(nn.Sequential):
    """Swin-V2's CPB (``cpb_mlp``): Linear(2, hidden) -> ReLU -> Linear(hidden, H, no bias) on the log-spaced
    relative coordinates; the bias is ``16 * sigmoid`` of its output read at the relative position index."""

    def __init__(self, num_heads: int, hidden: int = 512) -> None:
        super().__init__(
            nn.Linear(2, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_heads, bias=False)
        )

    def bias(self, coords_table: torch.Tensor, index: torch.Tensor, tokens: int) -> torch.Tensor:
        """``(1, H, ws, ws)`` bias of one window."""
        table = self(coords_table).view(-1, self[2].out_features)
        bias = table[index].view(tokens, tokens, -1).permute(2, 0, 1)
        return (16 * torch.sigmoid(bias)).unsqueeze(0)


def relative_coords_table(window: tuple[int, int]) -> torch.Tensor:
    """``(1, 2wh-1, 2ww-1, 2)`` Swin-V2 CPB input: offsets scaled to [-8, 8], then sign * log2(1+|x|) / 3."""
    rows = torch.arange(-(window[0] - 1), window[0], dtype=torch.float32)
    cols = torch.arange(-(window[1] - 1), window[1], dtype=torch.float32)
    table = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    table[:, :, :, 0] /= max(window[0] - 1, 1)
    table[:, :, :, 1] /= max(window[1] - 1, 1)
    table *= 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """``(ws * ws,)`` index of the (query, key) offset into the flattened coords table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window[0] - 1
    rel[:, :, 1] += window[1] - 1
    rel[:, :, 0] *= 2 * window[1] - 1
    return rel.sum(-1).flatten()


class WindowAttentionV2(nn.Module):
    """Cosine multi-head attention inside windows. Its position bias comes from a module (``cpb_mlp``, the
    plain model's) and/or is passed in (KP-RPE's per-window bias); the shift mask is added last."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: tuple[int, int],
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        position: nn.Module | None = None,
        attn_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.attn_impl = attn_impl
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(num_heads, 1, 1)))
        # kept (and saved) even without the CPB: the official state dicts carry them
        self.register_buffer("relative_coords_table", relative_coords_table(window))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.cpb_mlp = position

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, c = x.shape[1:]
        qkv_bias = self.qkv.bias
        if qkv_bias is not None:  # the key third is never used (the official forward replaces it by 0)
            third = qkv_bias.numel() // 3
            qkv_bias = torch.cat([qkv_bias[:third], qkv_bias.new_zeros(third), qkv_bias[2 * third :]])
        qkv = F.linear(x, self.qkv.weight, qkv_bias).reshape(-1, n, 3, self.num_heads, c // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def _full_bias(self, bias: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The passed-in bias plus this layer's own position term, then the shift mask (in that order). With a
        mask the result is ``(B|1, nW, H, ws, ws)``: attention then runs on ``(B, nW, H, ws, d)``, which keeps
        the batch free in traced graphs."""
        if self.cpb_mlp is not None:
            tokens = self.window[0] * self.window[1]
            cpb = self.cpb_mlp.bias(self.relative_coords_table, self.relative_position_index, tokens)
            bias = cpb if bias is None else bias + cpb
        if mask is None:
            return bias
        nw = mask.shape[0]
        if bias is None:
            return mask[None, :, None]
        bias = bias[:, None] if bias.shape[0] == 1 else bias.unflatten(0, (-1, nw))
        return bias + mask[None, :, None]

    def scores(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pre-softmax logits ``(B * nW, H, ws, ws)``: ``cos(q, k) * exp(min(logit_scale, ln 100))`` plus the
        bias and the shift mask (the official order of additions)."""
        q, k, _ = self._windowed(self._qkv(x), mask)
        return self._logits(q, k, self._full_bias(bias, mask)).flatten(0, -4)

    def _windowed(self, qkv, mask: torch.Tensor | None):
        """``(B * nW, H, ws, d)`` -> ``(B, nW, H, ws, d)`` when a shift mask (one per window) applies."""
        return qkv if mask is None else tuple(t.unflatten(0, (-1, mask.shape[0])) for t in qkv)

    def _logits(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self._scale()
        return attn if bias is None else attn + bias

    def _scale(self) -> torch.Tensor:
        return torch.clamp(self.logit_scale, max=LOG_100).exp()

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x (B * nW, ws, C)``; ``bias`` broadcastable to ``(B * nW, H, ws, ws)``; ``mask (nW, ws, ws)``."""
        n, c = x.shape[1:]
        drop = self.attn_drop if self.training else 0.0
        q, k, v = self._windowed(self._qkv(x), mask)
        full = self._full_bias(bias, mask)
        if self.attn_impl == "math":
            attn = F.dropout(self._logits(q, k, full).softmax(dim=-1), p=drop, training=self.training)
            out = attn @ v
        else:
            if full is not None:
                full = full.to(q.dtype)
            q, k = F.normalize(q, dim=-1) * self._scale(), F.normalize(k, dim=-1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=full, dropout_p=drop, scale=1.0)
        out = out.flatten(0, -4).transpose(1, 2).reshape(-1, n, c)
        return self.proj_drop(self.proj(out))


class SwinBlockV2(nn.Module):
    """Post-norm Swin-V2 block on a ``(B, H, W, C)`` map: windowed attention, then the MLP."""

    def __init__(self, dim: int, num_heads: int, window, shift, cfg: SwinConfig, drop_path: float) -> None:
        super().__init__()
        self.window, self.shift = tuple(window), tuple(shift)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        cpb = ContinuousPositionBias(num_heads, cfg.cpb_hidden) if cfg.rel_pos == "cpb" else None
        self.attn = WindowAttentionV2(
            dim,
            num_heads,
            self.window,
            qkv_bias=cfg.qkv_bias,
            attn_drop=cfg.attn_drop_rate,
            proj_drop=cfg.drop_rate,
            position=cpb,
            attn_impl=cfg.attn_impl,
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        hidden = int(dim * cfg.mlp_ratio)
        # torchvision's MLP numbering: fc1 (0), GELU (1), Dropout (2), fc2 (3), Dropout (4)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(cfg.drop_rate),
            nn.Linear(hidden, dim),
            nn.Dropout(cfg.drop_rate),
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        h, w = int(x.shape[1]), int(x.shape[2])  # constants of the model: static pads in traced graphs
        mask = shift_mask(h, w, self.window, self.shift, device=x.device, dtype=x.dtype)
        out = self.attn(partition(x, self.window, self.shift), bias, mask)
        x = x + self.drop_path(self.norm1(merge(out, h, w, self.window, self.shift)))
        return x + self.drop_path(self.norm2(self.mlp(x)))


class PatchMergingV2(nn.Module):
    """Halve the map: zero-pad odd sides, concatenate the 2x2 neighbours, Linear 4C -> 2C, LayerNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[1]), int(x.shape[2])
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.norm(self.reduction(x))


def _state_dict_hook(module, state_dict, prefix, local_metadata) -> None:
    """Save the per-stage tables under their official names, ``keypoint_linear.<stage>``."""
    n = len(module.config.depths)
    _rename(state_dict, {f"{prefix}kprpe.{s}.linear.": f"{prefix}keypoint_linear.{s}." for s in range(n)})


def _load_state_dict_hook(module, state_dict, prefix, *args) -> None:
    n = len(module.config.depths)
    _rename(state_dict, {f"{prefix}keypoint_linear.{s}.": f"{prefix}kprpe.{s}.linear." for s in range(n)})


class SwinTransformer(nn.Module):
    """Swin-V2 face embedder: ``model(images)`` (plain), ``model(images, keypoints)`` (KP-RPE; plain models
    accept and ignore keypoints). Output: the raw embedding ``(B, output_dim)``, not normalised."""

    def __init__(self, config: SwinConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = SwinConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = cfg = config.validate()
        self.grad_checkpointing = False
        sizes = cfg.map_sizes
        total = sum(cfg.depths)
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size),
                Permute(),
                nn.LayerNorm(cfg.embed_dim, eps=1e-5),
            )
        ]
        self.stage_of: list[tuple[int, int] | None] = [None]  # features index -> (stage, block in stage)
        done = 0
        shift = (cfg.window_size[0] // 2, cfg.window_size[1] // 2)
        for s, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads, strict=True)):
            for j in range(depth):
                rate = cfg.drop_path_rate * done / max(total - 1, 1)  # torchvision's linear rule
                block_shift = (0, 0) if j % 2 == 0 else shift
                layers.append(SwinBlockV2(cfg.stage_dim(s), heads, cfg.window_size, block_shift, cfg, rate))
                self.stage_of.append((s, j))
                done += 1
            if s < len(cfg.depths) - 1:
                layers.append(PatchMergingV2(cfg.stage_dim(s)))
                self.stage_of.append(None)
        self.features = nn.ModuleList(layers)
        last = cfg.stage_dim(len(cfg.depths) - 1)
        self.norm = nn.LayerNorm(last, eps=1e-5)
        self.feature = nn.Sequential(
            nn.Linear(sizes[-1] ** 2 * last, last, bias=False),
            nn.BatchNorm1d(last, eps=2e-5),
            nn.Linear(last, cfg.output_dim, bias=False),
            nn.BatchNorm1d(cfg.output_dim, eps=2e-5),
        )
        self.kprpe = None
        if cfg.rel_pos == "kprpe":
            self.kprpe = nn.ModuleList(
                KeypointRPE(
                    grid=(size, size),
                    num_heads=heads,
                    depth=depth,
                    num_keypoints=cfg.num_keypoints,
                    sharing=cfg.kp_sharing,
                    method=cfg.rpe_method,
                    ratio=cfg.rpe_ratio,
                    window=cfg.window_size,
                    bias_impl=cfg.kp_bias_impl,
                )
                for size, depth, heads in zip(sizes, cfg.depths, cfg.num_heads, strict=True)
            )
            self.register_state_dict_post_hook(_state_dict_hook)
            self.register_load_state_dict_pre_hook(_load_state_dict_hook)
        self.init_weights()

    def init_weights(self) -> None:
        """Truncated-normal linear weights and zero biases (torchvision's Swin init); KP-RPE's tables start at
        zero, so a new Swin-KP-RPE begins as a Swin without position bias."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.kprpe is not None:
            for stage in self.kprpe:
                stage.reset_parameters()

    @property
    def uses_keypoints(self) -> bool:
        return self.kprpe is not None

    @property
    def keypoint_linear(self) -> nn.ModuleList | None:
        """The per-stage tables f_s (``keypoint_linear.<s>`` in checkpoints); None without KP-RPE."""
        return None if self.kprpe is None else nn.ModuleList(stage.linear for stage in self.kprpe)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def check_inputs(self, images: torch.Tensor, keypoints: torch.Tensor | None) -> None:
        """Raise a TypeError/ValueError naming what was expected and what was received (the ViT's checks: same
        config fields, same messages)."""
        from .vit import VisionTransformer

        VisionTransformer.check_inputs(self, images, keypoints)

    def forward_features(self, images: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, S, S, C)`` last-stage map after the final LayerNorm."""
        self.check_inputs(images, keypoints)
        x = images
        biases = None
        for layer, where in zip(self.features, self.stage_of, strict=True):
            if where is None:
                x = layer(x)
                continue
            stage, j = where
            if j == 0 and self.kprpe is not None:  # the stage's table input, made once for its blocks
                biases = self.kprpe[stage].window_biases(keypoints)
            bias = biases(j, layer.shift) if self.kprpe is not None else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, bias, use_reentrant=False)
            else:
                x = layer(x, bias)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.feature(features.reshape(features.shape[0], -1))

    def forward(self, images: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        from .vit import match_weight_dtype

        images = match_weight_dtype(self, images)
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[0] == 0:
            self.check_inputs(images, keypoints)
            return images.new_zeros((0, self.config.output_dim))
        return self.forward_head(self.forward_features(images, keypoints))

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"rel_pos={cfg.rel_pos}, depths={list(cfg.depths)}, heads={list(cfg.num_heads)}, "
            f"window={cfg.window_size[0]}x{cfg.window_size[1]}, maps={cfg.map_sizes}"
        )


# ---------------------------------------------------------------------- checkpoints
_BLOCK = re.compile(r"features\.(\d+)\.(norm1|reduction)\.weight$")
# official rpe_config.ctx_type -> kp_sharing (linear relative context types; the official Swin: the first)
_CTX_SHARING = {
    "rel_keypoint_splithead_unshared": "layer_head",
    "rel_keypoint_unshared": "layer",
    "rel_keypoint_splithead": "head",
    "rel_keypoint": "shared",
}
_SWIN_NAMES = {"small": "small", "base": "base", "swin_v2_s": "small", "swin_v2_b": "base"}
OFFICIAL_IMG_SIZE = 112  # the official Swin face code runs only on 112 x 112 (its head hard-codes the map)


def is_swin_checkpoint(state: Mapping[str, torch.Tensor]) -> bool:
    """True for bare Swin keys: the stem ``features.0.0.weight`` and cosine attention's ``logit_scale``."""
    return "features.0.0.weight" in state and any(
        k.startswith("features.") and k.endswith(".attn.logit_scale") for k in state
    )


def _shape(state: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"key {key!r} is missing")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"{key} should be {ndim}-D, got shape {shape}")
    return shape


def swin_config_from_state_dict(state: Mapping[str, torch.Tensor], known: Mapping | None = None) -> dict:
    """SwinConfig fields implied by a bare state dict's tensor shapes: embed, patch, depths, heads per stage
    (``logit_scale``), window (the CPB coordinate table), MLP ratio, output dim, encoding, KP-RPE sharing.
    ``known`` fields (a config, the caller) settle what shapes cannot; when the shapes fit several
    architectures that compute different functions, a ValueError lists the candidates."""
    known = dict(known or {})
    embed, chans, patch, patch_w = _shape(state, "features.0.0.weight", 4)
    if patch != patch_w:
        raise ValueError(f"the patch embedding is {patch}x{patch_w}: only square patches are supported")
    layout = sorted((int(m.group(1)), m.group(2)) for k in state if (m := _BLOCK.match(k)))
    if [i for i, _ in layout] != list(range(1, len(layout) + 1)):
        raise ValueError(f"features are not numbered 1..n (found {[i for i, _ in layout][:12]})")
    depths, heads, dims = [0], [], []
    for i, kind in layout:
        if kind == "reduction":
            depths.append(0)
            continue
        dim = _shape(state, f"features.{i}.norm1.weight", 1)[0]
        h = _shape(state, f"features.{i}.attn.logit_scale", 3)[0]
        if depths[-1] == 0:
            heads.append(h)
            dims.append(dim)
        elif (h, dim) != (heads[-1], dims[-1]):
            raise ValueError(f"block features.{i} has {h} heads / width {dim}, unlike its stage")
        depths[-1] += 1
    if 0 in depths or layout[-1][1] == "reduction":
        raise ValueError(f"stages {depths}: a patch merging must sit between two non-empty stages")
    expected = [embed * 2**s for s in range(len(depths))]
    if dims != expected:
        raise ValueError(f"stage widths {dims} are not the embedding {embed} doubled per stage {expected}")
    first = layout[0][0]
    cfg: dict = dict(embed_dim=embed, in_chans=chans, patch_size=patch, depths=depths, num_heads=heads)
    cfg["mlp_ratio"] = _shape(state, f"features.{first}.mlp.0.weight", 2)[0] / embed
    cfg["qkv_bias"] = f"features.{first}.attn.qkv.bias" in state
    cfg["window_size"] = _window_from(state, first, known)
    last = expected[-1]
    cfg["output_dim"] = _shape(state, "feature.2.weight", 2)[0]
    cells, rem = divmod(_shape(state, "feature.0.weight", 2)[1], last)
    side = math.isqrt(cells)
    if rem or side * side != cells:
        raise ValueError(f"feature.0.weight reads {cells * last + rem} inputs: not {last} x a square map")
    cfg["img_size"] = _img_size_from(side, patch, len(depths), known)
    if f"features.{first}.attn.cpb_mlp.0.weight" in state:
        cfg["rel_pos"] = "cpb"
        cfg["cpb_hidden"] = _shape(state, f"features.{first}.attn.cpb_mlp.0.weight", 2)[0]
    elif "keypoint_linear.0.weight" in state:
        cfg["rel_pos"] = "kprpe"
        cfg.update(_kprpe_from(state, depths, heads, known))
    else:
        cfg["rel_pos"] = "none"
    return cfg


def _window_from(state: Mapping[str, torch.Tensor], first: int, known: Mapping) -> tuple[int, int]:
    table = state.get(f"features.{first}.attn.relative_coords_table")
    if table is not None and table.ndim == 4:
        return ((table.shape[1] + 1) // 2, (table.shape[2] + 1) // 2)
    index = state.get(f"features.{first}.attn.relative_position_index")
    if index is None:
        if "window_size" in known:
            return tuple(known["window_size"])
        raise ValueError("no CPB coordinate table or position index tells the window size: pass window_size")
    tokens = math.isqrt(index.numel())
    candidates = [(h, tokens // h) for h in range(1, tokens + 1) if tokens % h == 0]
    wanted = known.get("window_size")
    if wanted is not None:
        wanted = (wanted, wanted) if isinstance(wanted, int) else tuple(wanted)
        if wanted in candidates:
            return wanted
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(
        f"the windows hold {tokens} tokens, which fits windows {candidates}; pass window_size=(height, width)"
    )


def _img_size_from(side: int, patch: int, stages: int, known: Mapping) -> int:
    def final(img: int) -> int:
        size = img // patch
        for _ in range(stages - 1):
            size = -(-size // 2)
        return size

    if "img_size" in known:
        if final(known["img_size"]) != side:
            raise ValueError(
                f"img_size {known['img_size']} gives a final map of {final(known['img_size'])}, "
                f"but the head reads a {side}x{side} map"
            )
        return int(known["img_size"])
    if final(OFFICIAL_IMG_SIZE) == side:
        return OFFICIAL_IMG_SIZE
    fits = [img for img in range(patch, patch * side * 2**stages + 1) if final(img) == side]
    raise ValueError(f"input sizes {fits[0]}..{fits[-1]} all give the {side}x{side} final map: pass img_size")


def _kprpe_from(state: Mapping[str, torch.Tensor], depths: list, heads: list, known: Mapping) -> dict:
    from .buckets import num_buckets

    nb = num_buckets(known.get("rpe_method", "product"), known.get("rpe_ratio", 1.9))
    inputs = _shape(state, "keypoint_linear.0.weight", 2)[1]
    if inputs % 2:
        raise ValueError(f"keypoint_linear.0 reads {inputs} inputs: not 2 per keypoint")
    widths = {
        "layer_head": lambda d, h: d * h * nb,
        "layer": lambda d, h: d * nb,
        "head": lambda d, h: h * nb,
        "shared": lambda d, h: nb,
    }
    outs = []
    for s in range(len(depths)):
        out, f_in = _shape(state, f"keypoint_linear.{s}.weight", 2)
        if f_in != inputs:
            raise ValueError(f"keypoint_linear.{s} reads {f_in} inputs, keypoint_linear.0 reads {inputs}")
        outs.append(out)
    fits = [
        m
        for m, width in widths.items()
        if all(width(d, h) == o for d, h, o in zip(depths, heads, outs, strict=True))
    ]
    if known.get("kp_sharing") in fits:
        fits = [known["kp_sharing"]]
    if not fits:
        raise ValueError(
            f"keypoint tables of {outs} features fit no sharing of {nb} buckets over stages of "
            f"depths {depths} and heads {heads}"
        )
    # when layer_head fits, every other fit has one head or one block per stage: the same function
    if len(fits) > 1 and "layer_head" not in fits:
        raise ValueError(f"keypoint tables of {outs} features fit kp_sharing {fits}: pass kp_sharing")
    return dict(num_keypoints=inputs // 2, kp_sharing=fits[0] if len(fits) == 1 else "layer_head")


def official_swin_fields(config: Mapping | None) -> dict:
    """SwinConfig fields an official config (model.yaml / config.json) states: ``name`` small | base (the
    sizes), ``rpe_config`` (KP-RPE, its ctx_type and keypoints). The official ``from_config`` ignores
    ``output_dim`` (its presets hard-code 512), so the tensors tell it. Raises ValueError on values kprpe
    cannot reproduce."""
    node, queue = None, [config] if isinstance(config, Mapping) else []
    while queue:
        item = queue.pop(0)
        if str(item.get("name", "")).lower() in _SWIN_NAMES or isinstance(item.get("rpe_config"), Mapping):
            node = item
            break
        queue.extend(v for v in item.values() if isinstance(v, Mapping))
    if node is None:
        return {}
    fields: dict = {}
    name = str(node.get("name", "")).lower()
    if name in _SWIN_NAMES:
        size = SWIN_SIZES[_SWIN_NAMES[name]]
        fields.update(
            {
                k: size[k]
                for k in ("img_size", "patch_size", "embed_dim", "depths", "num_heads", "window_size")
            }
        )
    if str(node.get("color_space", "RGB")).upper() != "RGB":
        raise ValueError(
            f"color_space {node['color_space']!r}: kprpe's Swin takes RGB input; reverse the "
            "channels yourself, or remove the key if the model was trained on RGB"
        )
    rpe = node.get("rpe_config")
    if rpe is None:
        return fields
    if rpe.get("name") != "KPRPE_shared":
        raise ValueError(f"rpe_config.name {rpe.get('name')!r}: the Swin models know only KPRPE_shared")
    ctx = rpe.get("ctx_type", "rel_keypoint_splithead_unshared")
    if ctx not in _CTX_SHARING:
        raise ValueError(
            f"rpe_config.ctx_type {ctx!r} is not supported for Swin (known: {list(_CTX_SHARING)})"
        )
    fields.update(rel_pos="kprpe", kp_sharing=_CTX_SHARING[ctx])
    if "num_keypoints" in rpe:
        fields["num_keypoints"] = int(rpe["num_keypoints"])
    if "ratio" in rpe:
        fields["rpe_ratio"] = float(rpe["ratio"])
    if str(rpe.get("method", "product")).lower() != "product":
        raise ValueError(f"rpe_config.method {rpe['method']!r}: the Swin tables use the product buckets")
    return fields


def _mismatch(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], limit: int = 5) -> str:
    """One line naming the keys a state dict lacks, has in excess, or holds in another shape ('' if none)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and tuple(got[k].shape) != tuple(v.shape)
    ]
    parts = [
        f"{len(items)} {what} ({'; '.join(items[:limit])})"
        for what, items in (
            ("of the wrong shape", misshaped),
            ("missing", missing),
            ("unexpected", unexpected),
        )
        if items
    ]
    return "; ".join(parts)


def load_swin(
    state: Mapping[str, torch.Tensor],
    *,
    saved_config: Mapping | None = None,
    official_config: Mapping | None = None,
    file_config: Mapping | None = None,
    where: str = "checkpoint",
    **overrides,
) -> SwinTransformer:
    """Build the Swin a bare state dict describes and load it strictly (eval mode). ``saved_config`` (kprpe's
    metadata) is the exact config; an official config (model.yaml / config.json) must agree with the shapes;
    keyword ``overrides`` win (runtime choices such as ``attn_impl``, or what the shapes leave open). Raises
    :class:`~kprpe.nn.checkpoint.CheckpointError` naming the problem."""
    try:
        return _load_swin(
            state, saved_config=saved_config, official_config=official_config, where=where, **overrides
        )
    except CheckpointError:
        raise
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def _load_swin(
    state: Mapping[str, torch.Tensor],
    *,
    saved_config: Mapping | None = None,
    official_config: Mapping | None = None,
    where: str = "checkpoint",
    **overrides,
) -> SwinTransformer:
    """load_swin's work; raises ValueError naming the problem."""
    if saved_config is not None:  # the registry has checked that it names this family
        values = {k: v for k, v in saved_config.items() if k != "arch"}
    else:
        try:
            stated = official_swin_fields(official_config)
            values = swin_config_from_state_dict(state, known={**stated, **overrides})
        except ValueError as exc:
            raise ValueError(f"{where}: cannot read the Swin architecture: {exc}") from None
        for key, said in stated.items():
            shape_value = values.get(key)
            if key in ("depths", "num_heads", "window_size"):
                said, shape_value = list(said), list(shape_value or [])
            if key in values and said != shape_value:
                raise ValueError(
                    f"{where}: the config says {key} {said} but the tensor shapes say "
                    f"{shape_value}; the config and the weights do not belong together"
                )
        values.update({k: v for k, v in stated.items() if k not in values})
    values.pop("extra", None)
    values.update(overrides)
    try:
        config = SwinConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: checkpoint implies an invalid Swin config {values}: {exc}") from None
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = SwinTransformer(config)
    mismatch = _mismatch(probe.state_dict(), state)
    if mismatch:  # before anything is allocated: a file cannot make us build a huge model for nothing
        raise ValueError(
            f"{where}: the tensors do not fit the Swin config {config.to_dict()}: {mismatch} — nothing was "
            "allocated"
        )
    model = SwinTransformer(config)
    model.load_state_dict(dict(state))  # same keys and shapes (checked); copy_ casts the dtypes
    return model.eval()


def _describe(config: SwinConfig) -> dict:
    return dict(
        rel_pos=config.rel_pos,
        depth=config.depth,
        embed_dim=config.embed_dim,
        num_heads=list(config.num_heads),
        window=list(config.window_size),
    )


def _describe_text(row: Mapping) -> str:
    return (
        f"rel_pos={row['rel_pos']:<6} depth={row['depth']:<3} dim={row['embed_dim']:<4} "
        f"heads={row['num_heads']} window={row['window'][0]}x{row['window'][1]}"
    )


register_family(
    SwinConfig.arch,
    SwinConfig,
    SwinTransformer,
    recognizes=is_swin_checkpoint,
    load=load_swin,
    signature="'features.0.0.weight' and 'features.<i>.attn.logit_scale' keys",
    title="Swin",
    describe=_describe,
    describe_text=_describe_text,
)
for _name, _values in SWIN_PRESETS.items():
    register_model(_name, _values, family=SwinConfig.arch)
