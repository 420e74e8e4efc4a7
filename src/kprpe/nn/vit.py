"""The face ViT of the official KP-RPE code, with every position encoding behind one constructor.

Input: RGB ``(B, 3, H, W)`` in [-1, 1]; keypoints ``(B, K, 2)`` as (x, y) normalised to [0, 1] by the input's
width and height (faces: K = 5 in ArcFace order). Output: the raw, *un-normalised* embedding ``(B, output_dim)``
— its norm carries quality; use :func:`normalize_embedding` for unit vectors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import ATTN_IMPLS, Block
from .buckets import METHODS, bucket_ids, num_buckets
from .position import (
    BIAS_IMPLS,
    KP_INPUTS,
    KP_SHARINGS,
    BucketBias,
    KeypointBiasFunction,
    form_bias,
    gather_bias,
    keypoint_features,
    patch_centres,
)

__all__ = ["RELATIVE_ENCODINGS", "HEADS", "ViTConfig", "VisionTransformer", "normalize_embedding", "num_parameters"]

RELATIVE_ENCODINGS = ("none", "rpe", "irpe", "kprpe")
KP_BIAS_IMPLS = ("auto", "decomposed", *BIAS_IMPLS)
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
    kp_sharing: str = "layer_head"  # layer_head (paper's default) | head | shared
    kp_hidden: int = 0  # 0: linear f (paper); > 0: an MLP with this hidden width (non-linear control)
    head: str = "flatten"  # flatten all tokens (official) | mean-pool tokens
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attn_impl: str = "sdpa"  # sdpa (fused, fastest) | math (explicit softmax: bit-exact with the official code) | flex
    # How KP-RPE forms its bias (same numbers, different speed): auto | naive | gather | index | onehot |
    # decomposed (SPEC §1 identity: cached position term + per-sample bucket shift; linear relative f only)
    kp_bias_impl: str = "auto"
    extra: dict = field(default_factory=dict)  # free-form notes carried with saved checkpoints

    def validate(self) -> ViTConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid model config: {msg}")

        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "output_dim"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}")
        need(self.img_size % self.patch_size == 0, f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        need(self.embed_dim % self.num_heads == 0, f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        need(self.mlp_ratio > 0, f"mlp_ratio must be positive, got {self.mlp_ratio}")
        need(self.rel_pos in RELATIVE_ENCODINGS, f"rel_pos {self.rel_pos!r} not in {RELATIVE_ENCODINGS}")
        need(self.rpe_method in METHODS, f"rpe_method {self.rpe_method!r} not in {METHODS}")
        need(self.kp_input in KP_INPUTS, f"kp_input {self.kp_input!r} not in {KP_INPUTS}")
        need(self.kp_sharing in KP_SHARINGS, f"kp_sharing {self.kp_sharing!r} not in {KP_SHARINGS}")
        need(self.head in HEADS, f"head {self.head!r} not in {HEADS}")
        need(self.attn_impl in ATTN_IMPLS, f"attn_impl {self.attn_impl!r} not in {ATTN_IMPLS}")
        need(self.attn_impl != "flex" or self.rel_pos in ("none", "kprpe"), f"attn_impl 'flex' supports rel_pos none or kprpe, got {self.rel_pos!r}")
        need(self.kp_bias_impl in KP_BIAS_IMPLS, f"kp_bias_impl {self.kp_bias_impl!r} not in {KP_BIAS_IMPLS}")
        need(isinstance(self.num_keypoints, int) and self.num_keypoints > 0, f"num_keypoints must be a positive int, got {self.num_keypoints!r}")
        need(self.kp_hidden >= 0, f"kp_hidden must be >= 0, got {self.kp_hidden}")
        need(set(self.irpe_on) <= set("qkv") and (self.rel_pos != "irpe" or self.irpe_on), f"irpe_on must be a non-empty combination of q, k, v, got {self.irpe_on!r}")
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
        self._position_bias_cache: dict = {}  # decomposed KP-RPE: per-layer position term at inference

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        if cfg.abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, cfg.embed_dim))
        else:
            self.register_parameter("pos_embed", None)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear stochastic depth
        self.blocks = nn.ModuleList(
            Block(
                cfg.embed_dim,
                cfg.num_heads,
                cfg.mlp_ratio,
                drop=cfg.drop_rate,
                drop_path=dpr[i],
                qkv_bias=cfg.qkv_bias,
                attn_drop=cfg.attn_drop_rate,
                rpe=cfg.rel_pos == "rpe",
                irpe_on=cfg.irpe_on if cfg.rel_pos == "irpe" else "",
                irpe_shared_head=cfg.irpe_shared_head,
                num_buckets=self.num_buckets,
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

        self.kp_bias = None
        if cfg.rel_pos == "kprpe":
            self.kp_bias = KeypointBiasFunction(cfg.kp_sharing, cfg.num_heads, self.num_buckets)
            f_in = 2 if cfg.kp_input == "query_position" else 2 * cfg.num_keypoints
            f_out = self.kp_bias.out_features(cfg.depth)
            if cfg.kp_hidden:
                self.keypoint_mlp = nn.Sequential(nn.Linear(f_in, cfg.kp_hidden), nn.GELU())
                f_in = cfg.kp_hidden
            self.keypoint_linear = nn.Linear(f_in, f_out)
        self.init_weights()

    # ------------------------------------------------------------------ construction
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
        if self.kp_bias is not None:
            nn.init.zeros_(self.keypoint_linear.weight)
            nn.init.zeros_(self.keypoint_linear.bias)

    @property
    def uses_keypoints(self) -> bool:
        """True when the forward pass needs keypoints."""
        return self.kp_bias is not None and self.config.kp_input != "query_position"

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
            raise TypeError(f"images must be a torch.Tensor of shape (B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}), got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor scaled to [-1, 1], got dtype {images.dtype}")
        expected = f"(B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size})"
        if images.ndim != 4:
            raise ValueError(f"images must have shape {expected}, got {tuple(images.shape)}")
        if images.shape[1] != cfg.in_chans:
            raise ValueError(f"images must have {cfg.in_chans} channels (shape {expected}), got {images.shape[1]} channels in shape {tuple(images.shape)}")
        if images.shape[2] != cfg.img_size or images.shape[3] != cfg.img_size:
            raise ValueError(f"images must be {cfg.img_size}x{cfg.img_size} (shape {expected}), got {images.shape[2]}x{images.shape[3]}")
        if not self.uses_keypoints:
            return
        if keypoints is None:
            raise ValueError(
                f"this KP-RPE model needs keypoints: call model(images, keypoints) with keypoints of shape "
                f"(B, {cfg.num_keypoints}, 2), (x, y) normalised to [0, 1]"
            )
        if not isinstance(keypoints, torch.Tensor):
            raise TypeError(f"keypoints must be a torch.Tensor of shape (B, {cfg.num_keypoints}, 2), got {type(keypoints).__name__}")
        if not keypoints.is_floating_point():
            raise TypeError(f"keypoints must be floating point, normalised to [0, 1]; got dtype {keypoints.dtype}")
        kexp = f"({images.shape[0]}, {cfg.num_keypoints}, 2)"
        if keypoints.ndim != 3 or keypoints.shape[1:] != (cfg.num_keypoints, 2) or keypoints.shape[0] != images.shape[0]:
            raise ValueError(f"keypoints must have shape {kexp} to match the images, got {tuple(keypoints.shape)}")
        if not torch.isfinite(keypoints).all():
            bad = (~torch.isfinite(keypoints)).any(-1).any(-1).nonzero().flatten().tolist()
            raise ValueError(f"keypoints contain NaN or inf (samples {bad}); every keypoint must be a finite (x, y)")

    # ------------------------------------------------------------------ forward
    def keypoint_hidden(self, keypoints: torch.Tensor | None) -> torch.Tensor:
        """Input of f's final linear layer for each query token: ``(B|1, N|1, F)``."""
        x = keypoint_features(keypoints, self.grid, self.grid, self.config.kp_input)
        if self.config.kp_hidden:
            x = self.keypoint_mlp(x)
        return x

    def layer_bias(self, hidden: torch.Tensor | None, layer: int, ids: torch.Tensor, impl: str = "gather") -> torch.Tensor | None:
        """KP-RPE's additive logit bias of block ``layer``: ``(B, H, N, N)`` (None for other encodings)."""
        if hidden is None:
            return None
        return form_bias(self.kp_bias.layer_table(hidden, self.keypoint_linear, layer), ids, impl)

    def bias_impl(self) -> str:
        """The bias path the forward pass uses (``kp_bias_impl``, with ``auto`` resolved)."""
        impl = self.config.kp_bias_impl
        if impl == "auto":
            # measured on CPU (docs/performance.md): the one-hot matmul is fastest for inference and training
            # at face-model grids; its (N, N, nb) matrix grows as N^2, so large grids use the gather
            impl = "onehot" if self.num_tokens <= 256 else "gather"
        if impl == "decomposed" and (self.config.kp_input != "relative" or self.config.kp_hidden):
            impl = "gather"  # the identity needs a linear f of relative offsets
        return impl

    def keypoint_bias_layers(self, keypoints: torch.Tensor | None, ids: torch.Tensor):
        """A function ``layer -> (B, H, N, N) bias`` for this batch; each layer's table is made when called."""
        impl = self.bias_impl()
        if self.config.attn_impl == "flex":  # the kernel reads the table: never build the dense bias
            hidden = self.keypoint_hidden(keypoints)
            return lambda layer: BucketBias(self.kp_bias.layer_table(hidden, self.keypoint_linear, layer), ids)
        if impl == "decomposed":
            return self._decomposed_bias_layers(keypoints, ids)
        hidden = self.keypoint_hidden(keypoints)
        if impl == "naive":  # the official code's way: all layers' tables at once, then advanced indexing
            full = self.keypoint_linear(hidden)
            return lambda layer: form_bias(self.kp_bias.split(full, layer), ids, "naive")
        if impl == "gather":  # the index expanded once for every layer (a view here; one Expand in ONNX)
            wide_ids = ids.expand(hidden.shape[0], self.config.num_heads, *ids.shape)
            return lambda layer: gather_bias(self.kp_bias.layer_table(hidden, self.keypoint_linear, layer), wide_ids)
        return lambda layer: form_bias(self.kp_bias.layer_table(hidden, self.keypoint_linear, layer), ids, impl)

    def _decomposed_bias_layers(self, keypoints: torch.Tensor, ids: torch.Tensor):
        # f(c_i - p_b) = (W c_i + w0) - W p_b: a batch-independent (1, H, N, N) position term, cached while
        # weights are frozen (inference), plus a per-sample shift of each bucket's value.
        k = self.config.num_keypoints
        centres = patch_centres(self.grid, self.grid, device=ids.device).repeat(1, k)[None]  # (1, N, 2K)
        points = keypoints.detach().float().flatten(1)[:, None, :]  # (B, 1, 2K)
        linear = self.keypoint_linear
        frozen = not (torch.is_grad_enabled() and linear.weight.requires_grad)

        def position_term(layer: int) -> torch.Tensor:
            key = (layer, ids.device, linear.weight._version, linear.bias._version, linear.weight.data_ptr())
            if frozen and key in self._position_bias_cache:
                return self._position_bias_cache[key]
            term = form_bias(self.kp_bias.layer_table(centres, linear, layer), ids, "index")
            if frozen:
                self._position_bias_cache = {kk: v for kk, v in self._position_bias_cache.items() if kk[1:] == key[1:]}
                self._position_bias_cache[key] = term
            return term

        flat_ids = ids.flatten()

        def layer_bias(layer: int) -> torch.Tensor:
            shift = self.kp_bias.layer_table(points, linear, layer, with_bias=False)  # (B, H, 1, nb)
            if not frozen:
                return position_term(layer) - form_bias(shift, ids, "gather")
            # inference: look each sample's 49 values up from a tiny table, then add the cached term in place
            b, h, _, nb = shift.shape
            per_sample = shift.reshape(b * h, nb).neg_().index_select(1, flat_ids).view(b, h, *ids.shape)
            return per_sample.add_(position_term(layer))

        return layer_bias

    def forward_features(self, images: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N, D)`` token features after the final LayerNorm."""
        self.check_inputs(images, keypoints)
        x = self.patch_embed(images)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        ids = None
        if self.config.rel_pos != "none":
            ids = bucket_ids(self.grid, method=self.config.rpe_method, ratio=self.config.rpe_ratio, device=x.device)
        biases = self.keypoint_bias_layers(keypoints, ids) if self.kp_bias is not None else None
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
        return self.forward_head(self.forward_features(images, keypoints))

    def extra_repr(self) -> str:
        cfg = self.config
        return f"rel_pos={cfg.rel_pos}, abs_pos={cfg.abs_pos}, grid={self.grid}x{self.grid}, buckets={self.num_buckets}"


def num_parameters(model: nn.Module) -> int:
    """Number of learnable parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
