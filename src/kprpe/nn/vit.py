"""The face ViT of the official KP-RPE code, with every position encoding behind one constructor.

Input: RGB ``(B, 3, H, W)`` in [-1, 1]; keypoints ``(B, K, 2)`` as (x, y) normalised to [0, 1] by the input's
width and height (faces: K = 5 in ArcFace order). Output: the raw, *un-normalised* embedding ``(B,
output_dim)`` — its norm carries quality; use :func:`normalize_embedding` for unit vectors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import ATTN_IMPLS, Block
from .buckets import METHODS, bucket_ids, num_buckets
from .keypoint_rpe import (
    KP_BIAS_IMPLS,
    KP_INPUTS,
    KP_MLPS,
    KP_SHARINGS,
    KeypointRPE,
    module_load_state_dict_hook,
    official_state_dict_hook,
)
from .position import ContextualRPE, RelativePositionBias

__all__ = [
    "RELATIVE_ENCODINGS",
    "HEADS",
    "ViTConfig",
    "VisionTransformer",
    "normalize_embedding",
    "num_parameters",
    "match_weight_dtype",
]

RELATIVE_ENCODINGS = ("none", "rpe", "irpe", "kprpe")
HEADS = ("flatten", "mean")


@dataclass
class ViTConfig:
    """Every architecture choice of :class:`VisionTransformer` (defaults: the official ViT-Small)."""

    img_size: int = 112
    patch_size: int = 8
    in_chans: int = 3
    embed_dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 5.0
    output_dim: int = 512
    qkv_bias: bool = False
    # Position encodings: a learned absolute embedding and/or one relative encoding on the logits.
    abs_pos: bool = True
    rel_pos: str = "none"  # none | rpe | irpe | kprpe
    rpe_method: str = "product"  # bucket method (product everywhere in the paper)
    rpe_ratio: float = 1.9
    irpe_on: str = "qkv"  # which iRPE contextual tables: any of q, k, v
    irpe_shared_head: bool = True
    # KP-RPE: f maps keypoint offsets to bias tables.
    num_keypoints: int = 5
    kp_input: str = "relative"  # relative (paper) | absolute | query_position (keypoint-free control)
    kp_sharing: str = "layer_head"  # layer_head (paper's default) | layer | head | shared
    kp_hidden: int = 0  # 0: linear f (paper); > 0: an MLP with this hidden width (non-linear control)
    kp_mlp: str = "gelu"  # the MLP's hidden layer: gelu (kprpe) | relu_layernorm (official "_v2" ctx types)
    head: str = "flatten"  # flatten all tokens (official) | mean-pool tokens
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attn_impl: str = (
        "sdpa"  # sdpa (fused, fastest) | math (explicit softmax: bit-exact with the official code) | flex
    )
    # How KP-RPE forms its bias (same numbers, different speed): auto | naive | gather | index | onehot |
    # decomposed (docs/models.md: cached position term + per-sample bucket shift; linear relative f only)
    kp_bias_impl: str = "auto"
    extra: dict = field(default_factory=dict)  # free-form notes carried with saved checkpoints

    def validate(self) -> ViTConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid model config: {msg}")

        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "output_dim"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}")
        need(
            self.img_size % self.patch_size == 0,
            f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}",
        )
        need(
            self.embed_dim % self.num_heads == 0,
            f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}",
        )
        need(self.mlp_ratio > 0, f"mlp_ratio must be positive, got {self.mlp_ratio}")
        need(self.rel_pos in RELATIVE_ENCODINGS, f"rel_pos {self.rel_pos!r} not in {RELATIVE_ENCODINGS}")
        need(self.rpe_method in METHODS, f"rpe_method {self.rpe_method!r} not in {METHODS}")
        need(self.kp_input in KP_INPUTS, f"kp_input {self.kp_input!r} not in {KP_INPUTS}")
        need(self.kp_sharing in KP_SHARINGS, f"kp_sharing {self.kp_sharing!r} not in {KP_SHARINGS}")
        need(self.head in HEADS, f"head {self.head!r} not in {HEADS}")
        need(self.attn_impl in ATTN_IMPLS, f"attn_impl {self.attn_impl!r} not in {ATTN_IMPLS}")
        need(
            self.attn_impl != "flex" or self.rel_pos in ("none", "kprpe"),
            f"attn_impl 'flex' supports rel_pos none or kprpe, got {self.rel_pos!r}",
        )
        need(self.kp_bias_impl in KP_BIAS_IMPLS, f"kp_bias_impl {self.kp_bias_impl!r} not in {KP_BIAS_IMPLS}")
        need(
            isinstance(self.num_keypoints, int) and self.num_keypoints > 0,
            f"num_keypoints must be a positive int, got {self.num_keypoints!r}",
        )
        need(self.kp_hidden >= 0, f"kp_hidden must be >= 0, got {self.kp_hidden}")
        need(self.kp_mlp in KP_MLPS, f"kp_mlp {self.kp_mlp!r} not in {KP_MLPS}")
        need(
            set(self.irpe_on) <= set("qkv") and (self.rel_pos != "irpe" or self.irpe_on),
            f"irpe_on must be a non-empty combination of q, k, v, got {self.irpe_on!r}",
        )
        return self

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values).validate()


def normalize_embedding(embedding: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a raw embedding ``(B, D)`` into its unit direction ``(B, D)`` and its norm ``(B, 1)``."""
    norm = embedding.norm(p=2, dim=-1, keepdim=True)
    return embedding / norm.clamp_min(eps), norm


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution; tokens row-major (``n = row * grid + col``)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT for face recognition with Abs-PE, RPE, iRPE or KP-RPE (state_dict keys = the official ones).

    ``model(images)`` for models without keypoints, ``model(images, keypoints)`` for KP-RPE models
    (plain models accept and ignore keypoints, so pipelines can treat all models alike).
    """

    def __init__(self, config: ViTConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = ViTConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = cfg = config.validate()
        self.grid = cfg.grid
        self.num_tokens = cfg.grid * cfg.grid
        self.num_buckets = num_buckets(cfg.rpe_method, cfg.rpe_ratio)
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        if cfg.abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, cfg.embed_dim))
        else:
            self.register_parameter("pos_embed", None)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = [
            cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)
        ]  # linear stochastic depth
        self.blocks = nn.ModuleList(
            Block(
                cfg.embed_dim,
                cfg.num_heads,
                cfg.mlp_ratio,
                drop=cfg.drop_rate,
                drop_path=dpr[i],
                qkv_bias=cfg.qkv_bias,
                attn_drop=cfg.attn_drop_rate,
                position=self._position_factory(),
                attn_impl=cfg.attn_impl,
            )
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-5)
        head_in = self.num_tokens * cfg.embed_dim if cfg.head == "flatten" else cfg.embed_dim
        self.feature = nn.Sequential(
            nn.Linear(head_in, cfg.embed_dim, bias=False),
            nn.BatchNorm1d(cfg.embed_dim, eps=2e-5),
            nn.Linear(cfg.embed_dim, cfg.output_dim, bias=False),
            nn.BatchNorm1d(cfg.output_dim, eps=2e-5),
        )

        # RPE / iRPE tables are read at the bucket index; KP-RPE owns its own (and f, and its bias paths)
        ids = None
        if cfg.rel_pos in ("rpe", "irpe"):
            ids = bucket_ids(cfg.grid, method=cfg.rpe_method, ratio=cfg.rpe_ratio).clone()
        self.register_buffer("bucket_ids", ids, persistent=False)
        self.kprpe = None
        if cfg.rel_pos == "kprpe":
            self.kprpe = KeypointRPE(
                grid=cfg.grid,
                num_heads=cfg.num_heads,
                depth=cfg.depth,
                num_keypoints=cfg.num_keypoints,
                kp_input=cfg.kp_input,
                sharing=cfg.kp_sharing,
                hidden=cfg.kp_hidden,
                mlp=cfg.kp_mlp,
                method=cfg.rpe_method,
                ratio=cfg.rpe_ratio,
                bias_impl=cfg.kp_bias_impl,
                bucket_tables=cfg.attn_impl == "flex",
            )
            # checkpoints keep the official names (keypoint_linear.*, keypoint_mlp.*, keypoint_linear.0/2/3)
            self.register_state_dict_post_hook(official_state_dict_hook)
            self.register_load_state_dict_pre_hook(module_load_state_dict_hook)
        self.init_weights()

    # ------------------------------------------------------------------ construction
    def _position_factory(self):
        """What builds one layer's own relative position terms (RPE's table, iRPE's contextual tables), named
        as in the official state dicts; KP-RPE's bias is made once for all layers and passed in instead."""
        cfg, nb = self.config, self.num_buckets
        head_dim = cfg.embed_dim // cfg.num_heads
        if cfg.rel_pos == "rpe":
            return lambda: {"rpe_bias": RelativePositionBias(cfg.num_heads, nb)}
        if cfg.rel_pos == "irpe":
            return lambda: {
                f"rpe_{side}": ContextualRPE(side, head_dim, cfg.num_heads, cfg.irpe_shared_head, nb)
                for side in "qkv"
                if side in cfg.irpe_on
            }
        return None

    def init_weights(self) -> None:
        """Truncated-normal linear/patch weights, zero biases; f(P)'s output layer starts at zero so a new
        KP-RPE model begins as a plain ViT (as in the paper)."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.kprpe is not None:
            self.kprpe.reset_parameters()

    @property
    def uses_keypoints(self) -> bool:
        """True when the forward pass needs keypoints."""
        return self.kprpe is not None and self.kprpe.uses_keypoints

    @property
    def keypoint_linear(self) -> nn.Linear | None:
        """f's output layer under its official name (``keypoint_linear`` in checkpoints); None without
        KP-RPE."""
        return self.kprpe.linear if self.kprpe is not None else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory while training."""
        self.grad_checkpointing = bool(enable)

    # ------------------------------------------------------------------ input checks
    def check_inputs(self, images: torch.Tensor, keypoints: torch.Tensor | None) -> None:
        """Raise a TypeError/ValueError naming what was expected and what was received."""
        if torch.onnx.is_in_onnx_export():
            return  # the exported graph checks nothing; the ONNX engine checks its inputs before every run
        cfg = self.config
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"images must be a torch.Tensor of shape (B, {cfg.in_chans}, {cfg.img_size}, "
                f"{cfg.img_size}), got {type(images).__name__}"
            )
        if not images.is_floating_point():
            raise TypeError(
                f"images must be a floating-point tensor scaled to [-1, 1], got dtype {images.dtype}"
            )
        expected = f"(B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size})"
        if images.ndim != 4:
            raise ValueError(f"images must have shape {expected}, got {tuple(images.shape)}")
        if images.shape[1] != cfg.in_chans:
            raise ValueError(
                f"images must have {cfg.in_chans} channels (shape {expected}), got {images.shape[1]} "
                f"channels in shape {tuple(images.shape)}"
            )
        if images.shape[2] != cfg.img_size or images.shape[3] != cfg.img_size:
            raise ValueError(
                f"images must be {cfg.img_size}x{cfg.img_size} (shape {expected}), got "
                f"{images.shape[2]}x{images.shape[3]}"
            )
        if not self.uses_keypoints:
            return
        if keypoints is None:
            raise ValueError(
                f"this KP-RPE model needs keypoints: call model(images, keypoints) with keypoints of shape "
                f"(B, {cfg.num_keypoints}, 2), (x, y) normalised to [0, 1]"
            )
        if not isinstance(keypoints, torch.Tensor):
            raise TypeError(
                f"keypoints must be a torch.Tensor of shape (B, {cfg.num_keypoints}, 2), got "
                f"{type(keypoints).__name__}"
            )
        if not keypoints.is_floating_point():
            raise TypeError(
                f"keypoints must be floating point, normalised to [0, 1]; got dtype {keypoints.dtype}"
            )
        kexp = f"({images.shape[0]}, {cfg.num_keypoints}, 2)"
        if (
            keypoints.ndim != 3
            or keypoints.shape[1:] != (cfg.num_keypoints, 2)
            or keypoints.shape[0] != images.shape[0]
        ):
            raise ValueError(
                f"keypoints must have shape {kexp} to match the images, got {tuple(keypoints.shape)}"
            )
        if not torch.isfinite(keypoints).all():
            bad = (~torch.isfinite(keypoints)).any(-1).any(-1).nonzero().flatten().tolist()
            raise ValueError(
                f"keypoints contain NaN or inf (samples {bad}); every keypoint must be a finite (x, y)"
            )

    # ------------------------------------------------------------------ forward
    def forward_features(self, images: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N, D)`` token features after the final LayerNorm."""
        self.check_inputs(images, keypoints)
        x = self.patch_embed(images)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        ids = self.bucket_ids
        biases = self.kprpe.layer_biases(keypoints, buckets=True) if self.kprpe is not None else None
        for i, blk in enumerate(self.blocks):
            bias = biases(i) if biases is not None else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, bias, ids, use_reentrant=False)
            else:
                x = blk(x, bias, ids)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` -> raw embedding ``(B, output_dim)``."""
        if self.config.head == "flatten":
            x = features.reshape(features.shape[0], -1)
        else:
            x = features.mean(dim=1)
        return self.feature(x)

    def forward(self, images: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        images = match_weight_dtype(self, images)  # e.g. float64 arrays from NumPy: run in the model's dtype
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[0] == 0:
            self.check_inputs(images, keypoints)  # an empty batch is still checked, then costs nothing
            return images.new_zeros((0, self.config.output_dim))
        return self.forward_head(self.forward_features(images, keypoints))

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"rel_pos={cfg.rel_pos}, abs_pos={cfg.abs_pos}, grid={self.grid}x{self.grid}, "
            f"buckets={self.num_buckets}"
        )


def match_weight_dtype(model: nn.Module, images):
    """``images`` in the dtype of the model's weights when both are floating point and differ (a float64 batch
    from NumPy into a float32 model would otherwise fail deep inside a convolution); under autocast the
    autocast rules apply instead."""
    if (
        isinstance(images, torch.Tensor)
        and images.is_floating_point()
        and not torch.is_autocast_enabled(images.device.type)
        and not torch.onnx.is_in_onnx_export()
    ):
        weight = next(model.parameters(), None)
        if weight is not None and weight.is_floating_point() and images.dtype != weight.dtype:
            return images.to(weight.dtype)
    return images


def num_parameters(model: nn.Module) -> int:
    """Number of learnable parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
