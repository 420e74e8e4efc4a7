"""SwinGait-2D, plain or with KP-RPE: a 2-stage conv stem per frame, per-frame shifted-window stages on a
15 x 10 token map (3 x 5 windows, shift (1, 2) on odd blocks, no temporal window), temporal max pooling over
each sequence's own frames, a horizontal pooling pyramid (one part per token row), separate per-part FCs and
BNNecks.

Layout from the public SwinGait description and the KP-RPE paper (docs/gait.md; written clean-room;
SwinGait-2D itself is unreleased, so its sizes are configurable). The blocks are this package's Swin-V2 blocks
(:class:`~kprpe.nn.swin.SwinBlockV2`: post-norm, cosine attention, continuous position bias) and the windows
are :mod:`kprpe.nn.windows`'s. KP-RPE is *added on top of* the blocks' own position bias, with zero tables at
initialisation, so a new ``swingait_2d_kprpe`` computes exactly what ``swingait_2d`` computes.

KP-RPE's bias is formed in the separable form of a linear f (docs/gait.md): ``f(g_i - P) = A . g_i + C(P)``.
Per frame only ``C`` (heads x buckets values) and, when confidences mask joints, ``A`` (x2) are kept; the
naive per-token table (frames x tokens x buckets x heads, ~1.8e9 values per stage at the paper's batch) is
never built.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .keypoint_rpe import KeypointRPE, patch_centres, relative_keypoints
from .registry import config_from_dict
from .swin import SwinBlockV2, SwinConfig
from .windows import window_index

__all__ = [
    "KP_CONFIDENCE_MODES",
    "SWINGAIT_PRESETS",
    "SwinGaitConfig",
    "GaitKeypointRPE",
    "SwinGait",
    "load_swingait",
]

# How a joint's confidence enters f: ignored, as K extra inputs of f, or as a 0/1 mask on its offsets
KP_CONFIDENCE_MODES = ("ignore", "input", "mask")
POSITION_TERMS = ("cpb", "none")


@dataclass
class SwinGaitConfig:
    """Every architecture choice of :class:`SwinGait`. Defaults: a small model for CPUs and tests; the
    ``swingait_2d*`` presets carry the paper-scale sizes (docs/gait.md, with per-frame 2-D blocks)."""

    frame_size: tuple = (64, 44)  # (height, width) of the silhouettes
    stem_channels: tuple = (16, 32)  # conv stage 1 (full resolution), conv stage 2 (stride 2)
    stem_blocks: tuple = (1, 1)  # residual blocks per conv stage
    embed_dim: int = 32  # stage-1 width; stage 2 doubles it (LayerNorm + Linear, no spatial merge)
    depths: tuple = (2, 2)
    num_heads: tuple = (2, 4)
    token_grid: tuple = (15, 10)
    window_size: tuple = (3, 5)
    mlp_ratio: float = 4.0
    position: str = "cpb"  # the blocks' own relative position term (Swin-V2 CPB) or none
    cpb_hidden: int = 64
    kprpe: bool = False
    kp_confidence: str = "input"
    kp_threshold: float = 0.3  # "mask": joints below this confidence are left out of f
    num_keypoints: int = 17
    part_dim: int = 64  # per-part embedding width (SeparateFCs output)
    num_classes: int = 16
    drop_path_rate: float = 0.0
    attn_impl: str = "sdpa"

    arch = "swingait"

    def __post_init__(self) -> None:
        for name in (
            "frame_size",
            "stem_channels",
            "stem_blocks",
            "depths",
            "num_heads",
            "token_grid",
            "window_size",
        ):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))

    def validate(self) -> SwinGaitConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid SwinGait config: {msg}")

        def ints(name: str, length: int | None = None) -> None:
            value = getattr(self, name)
            need(
                isinstance(value, tuple)
                and all(isinstance(v, int) and v > 0 for v in value)
                and (length is None or len(value) == length),
                f"{name} must be {length or 'some'} positive ints, got {value!r}",
            )

        for name in ("frame_size", "stem_channels", "stem_blocks", "token_grid", "window_size"):
            ints(name, 2)
        ints("depths")
        ints("num_heads", len(self.depths))
        for name in ("embed_dim", "num_keypoints", "part_dim", "num_classes"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}")
        for s, heads in enumerate(self.num_heads):
            need(
                self.stage_dim(s) % heads == 0,
                f"stage {s}: width {self.stage_dim(s)} not divisible by {heads}",
            )
        need(self.position in POSITION_TERMS, f"position {self.position!r} not in {POSITION_TERMS}")
        need(
            self.kp_confidence in KP_CONFIDENCE_MODES,
            f"kp_confidence {self.kp_confidence!r} not in {KP_CONFIDENCE_MODES}",
        )
        need(self.mlp_ratio > 0 and 0 <= self.drop_path_rate < 1, "mlp_ratio > 0 and 0 <= drop_path_rate < 1")
        need(self.attn_impl in ("sdpa", "math"), f"attn_impl {self.attn_impl!r} not in ('sdpa', 'math')")
        return self

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2 ** min(stage, 1)  # only the first stage's downsample doubles the width

    @property
    def depth(self) -> int:
        return sum(self.depths)

    @property
    def rel_pos(self) -> str:
        """The position encoding, as ``kprpe models`` lists it (KP-RPE comes on top of the CPB)."""
        return "kprpe" if self.kprpe else self.position

    @property
    def num_parts(self) -> int:
        return self.token_grid[0]  # one horizontal strip per token row

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return {"arch": self.arch, **values}

    @classmethod
    def from_dict(cls, values: Mapping) -> SwinGaitConfig:
        return config_from_dict(cls, values, "SwinGait")


# The paper-scale model ("B1442 C2", 2-D blocks; docs/gait.md): stem 64 / 128 channels with 1 and 4 blocks,
# stages of 256 and 512 channels, depths 4 and 2, 16 and 32 heads, 256-d parts, Gait3D's 3000 training ids.
_PAPER = dict(
    stem_channels=(64, 128),
    stem_blocks=(1, 4),
    embed_dim=256,
    depths=(4, 2),
    num_heads=(16, 32),
    part_dim=256,
    num_classes=3000,
    cpb_hidden=512,
)
SWINGAIT_PRESETS = {"swingait_2d": dict(_PAPER), "swingait_2d_kprpe": dict(_PAPER, kprpe=True)}


# ---------------------------------------------------------------------- stem
class BasicBlock2D(nn.Module):
    """ResNet basic block per frame: conv3x3-BN-ReLU-conv3x3-BN plus the (projected) input, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def conv_stem(cfg: SwinGaitConfig) -> nn.Sequential:
    """layer0 (conv3x3 + BN + ReLU), layer1 (full resolution), layer2 (stride 2): the two conv stages."""
    c0, c1 = cfg.stem_channels
    n0, n1 = cfg.stem_blocks
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(inplace=True)),
        nn.Sequential(*[BasicBlock2D(c0, c0) for _ in range(n0)]),
        nn.Sequential(BasicBlock2D(c0, c1, 2), *[BasicBlock2D(c1, c1) for _ in range(n1 - 1)]),
    )


# ---------------------------------------------------------------------- KP-RPE
class GaitKeypointRPE(nn.Module):
    """One stage's KP-RPE for per-frame windows, from COCO keypoints ``(F, K, 3)`` = (x/W, y/H, confidence).

    The shared :class:`~kprpe.nn.keypoint_rpe.KeypointRPE` (``self.rpe``) holds f's linear layer over the
    offsets (one zero-initialised table per stage, a slice per (block, head)), the window bucket index and the
    window order; ``kp_confidence="input"`` adds K confidence inputs (``self.confidence``, zero too).

    :meth:`window_biases` uses the separable form: ``bias[f, w, h, i, j] = A[f, h, d(i,j)] . g(w, i) + C[f, h,
    d(i,j)]`` with ``A`` the summed offset weights (per frame only under ``mask``) and ``C`` the keypoint and
    confidence term. :meth:`naive_window_biases` builds the per-token table first (the reference; tests)."""

    def __init__(self, cfg: SwinGaitConfig, stage: int) -> None:
        super().__init__()
        self.mode, self.threshold = cfg.kp_confidence, float(cfg.kp_threshold)
        self.num_keypoints = cfg.num_keypoints
        self.rpe = KeypointRPE(
            grid=tuple(cfg.token_grid),
            num_heads=cfg.num_heads[stage],
            depth=cfg.depths[stage],
            num_keypoints=cfg.num_keypoints,
            window=tuple(cfg.window_size),
            bias_impl="gather",
        )
        out = self.rpe.out_features
        self.confidence = nn.Linear(cfg.num_keypoints, out, bias=False) if self.mode == "input" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.rpe.reset_parameters()
        if self.confidence is not None:
            nn.init.zeros_(self.confidence.weight)

    def _slice(self, layer: int) -> slice:
        width = self.rpe.table_width
        return slice(layer * width, (layer + 1) * width)

    def _joint_mask(self, keypoints: torch.Tensor) -> torch.Tensor | None:
        if self.mode != "mask":
            return None
        return (keypoints[..., 2] >= self.threshold).to(torch.float32)  # (F, K)

    def _window_geometry(self, shift: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self.rpe.grid_size
        index = window_index(h, w, self.rpe.window, shift, device=device)  # (nW, ws), -1 = padding
        centres = patch_centres(h, w, device=device)  # (N, 2): the same grid the naive offsets use
        return centres[index.clamp(min=0)], (index >= 0).to(torch.float32)

    def window_biases(self, keypoints: torch.Tensor):
        """For one batch of frames: ``(layer, shift) -> (F * nW, H, ws, ws)`` logit bias (separable form)."""
        kp = keypoints.detach().float()
        points, conf = kp[..., :2], kp[..., 2]
        mask = self._joint_mask(kp)
        ids = self.rpe.bucket_ids  # (ws, ws)
        heads, nb = self.rpe.num_heads, self.rpe.num_buckets
        linear = self.rpe.linear

        def bias_of(layer: int, shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
            sl = self._slice(layer)
            weight = linear.weight[sl].view(-1, self.num_keypoints, 2)  # (O, K, xy): interleaved dx, dy
            if mask is None:
                slope = weight.sum(1)[None]  # (1, O, 2): every joint's offset weighs on the query position
                offset = -torch.einsum("okc,fkc->fo", weight, points)
            else:
                slope = torch.einsum("okc,fk->foc", weight, mask)
                offset = -torch.einsum("okc,fkc,fk->fo", weight, points, mask)
            offset = offset + linear.bias[sl]
            if self.confidence is not None:
                offset = offset + F.linear(conf, self.confidence.weight[sl])
            slope = slope.view(slope.shape[0], heads, nb, 2)[:, :, ids]  # (1|F, H, ws, ws, 2)
            offset = offset.view(-1, heads, nb)[:, :, ids]  # (F, H, ws, ws)
            centres, valid = self._window_geometry(tuple(shift), ids.device)  # (nW, ws, 2), (nW, ws)
            position = torch.einsum("fhijc,wic->fwhij", slope, centres)  # (1|F, nW, H, ws, ws)
            bias = (position + offset[:, None]) * valid[None, :, None, :, None]  # padded queries get none
            return bias.reshape(-1, heads, ids.shape[0], ids.shape[1])

        return bias_of

    def naive_window_biases(self, keypoints: torch.Tensor):
        """The same biases by the per-token table ``(F, H, N, nb)`` (memory ~ frames x tokens x buckets x
        heads): f applied to each token's offsets, then the shared one-gather window path."""
        kp = keypoints.detach().float()
        h, w = self.rpe.grid_size
        features = relative_keypoints(kp[..., :2], h, w)  # (F, N, 2K)
        mask = self._joint_mask(kp)
        if mask is not None:
            features = features * mask.repeat_interleave(2, dim=1)[:, None, :]

        def bias_of(layer: int, shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
            out = self.rpe.layer_output(features, layer)  # (F, N, H * nb): f's output before the head split
            if self.confidence is not None:
                out = out + F.linear(kp[..., 2], self.confidence.weight[self._slice(layer)])[:, None, :]
            return self.rpe.window_bias(out, tuple(shift))

        return bias_of


# ---------------------------------------------------------------------- model
class GaitTransformer(nn.Module):
    """Patch embedding (2x2 on the resized conv map) and the per-frame windowed stages (+ KP-RPE)."""

    def __init__(self, cfg: SwinGaitConfig) -> None:
        super().__init__()
        c1, dim = cfg.stem_channels[1], cfg.embed_dim
        self.patch_embed = nn.Conv2d(c1, dim, 2, stride=2)
        self.patch_norm = nn.LayerNorm(dim)
        block_cfg = SwinConfig(
            rel_pos=cfg.position, cpb_hidden=cfg.cpb_hidden, mlp_ratio=cfg.mlp_ratio, attn_impl=cfg.attn_impl
        )
        window = tuple(cfg.window_size)
        shift = (window[0] // 2, window[1] // 2)
        rates = [
            cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)
        ]  # no tensor: meta-safe
        self.stages = nn.ModuleList()
        done = 0
        for s, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads, strict=True)):
            blocks = [
                SwinBlockV2(
                    cfg.stage_dim(s),
                    heads,
                    window,
                    (0, 0) if j % 2 == 0 else shift,
                    block_cfg,
                    rates[done + j],
                )
                for j in range(depth)
            ]
            done += depth
            self.stages.append(nn.ModuleList(blocks))
        # stage 1 -> 2: LayerNorm + Linear(C -> 2C), no spatial merge (the token map stays 15 x 10)
        self.downsample = (
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim)) if len(cfg.depths) > 1 else None
        )
        self.norm = nn.LayerNorm(cfg.stage_dim(len(cfg.depths) - 1))
        self.kprpe = None
        if cfg.kprpe:  # zero tables; built off the global RNG so a same-seed baseline gets the same weights
            with torch.random.fork_rng(devices=[]):
                self.kprpe = nn.ModuleList(GaitKeypointRPE(cfg, s) for s in range(len(cfg.depths)))

    def forward(self, x: torch.Tensor, keypoints: torch.Tensor | None, naive: bool = False) -> torch.Tensor:
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))  # (F, 15, 10, C)
        for s, blocks in enumerate(self.stages):
            if s == 1 and self.downsample is not None:
                x = self.downsample(x)
            biases = None
            if self.kprpe is not None:
                stage = self.kprpe[s]
                biases = stage.naive_window_biases(keypoints) if naive else stage.window_biases(keypoints)
            for j, block in enumerate(blocks):
                x = block(x, None if biases is None else biases(j, block.shift))
        return self.norm(x)


class SwinGait(nn.Module):
    """``model(sils, keypoints=None, lengths=None)`` -> ``{"embeddings": (n, E, P), "logits": (n, classes,
    P)}``. ``sils (n, T, H, W)`` float in [0, 1]; ``keypoints (n, T, K, 3)`` (x/W, y/H, confidence);
    ``lengths (n,)``: frames ``t >= lengths[i]`` are padding (ignored by every layer and by the max).
    Inference and retrieval use ``embeddings`` (before the BNNeck); the triplet loss too, CE the logits."""

    def __init__(self, config: SwinGaitConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = SwinGaitConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = cfg = config.validate()
        self.stem = conv_stem(cfg)
        self.transformer = GaitTransformer(cfg)
        parts, width = cfg.num_parts, cfg.stage_dim(len(cfg.depths) - 1)
        self.fcs = nn.Parameter(torch.empty(parts, width, cfg.part_dim))  # SeparateFCs
        self.bnneck = nn.BatchNorm1d(cfg.part_dim * parts)  # over the flattened parts (parallel BN)
        self.classifier = nn.Parameter(torch.empty(parts, cfg.part_dim, cfg.num_classes))
        self.init_weights()

    def init_weights(self) -> None:
        tables = set() if self.transformer.kprpe is None else set(self.transformer.kprpe.modules())
        for m in self.modules():
            if m in tables:  # zeroed below, drawing nothing
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.fcs)
        nn.init.xavier_uniform_(self.classifier)
        if self.transformer.kprpe is not None:
            for stage in self.transformer.kprpe:
                stage.reset_parameters()

    @property
    def uses_keypoints(self) -> bool:
        return self.config.kprpe

    def frame_features(self, frames: torch.Tensor, keypoints: torch.Tensor | None, naive: bool = False):
        """``(F, H, W)`` frames -> ``(F, h, w, C)`` token maps."""
        cfg = self.config
        x = self.stem(frames[:, None])
        gh, gw = cfg.token_grid
        x = F.interpolate(x, size=(2 * gh, 2 * gw), mode="bilinear", align_corners=True)
        return self.transformer(x, keypoints, naive)

    def forward(
        self,
        sils: torch.Tensor,
        keypoints: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        *,
        naive_kprpe: bool = False,
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        if sils.ndim != 4 or tuple(sils.shape[2:]) != tuple(cfg.frame_size):
            raise ValueError(
                f"sils must be (n, T, {cfg.frame_size[0]}, {cfg.frame_size[1]}), got {tuple(sils.shape)}"
            )
        n, t = sils.shape[:2]
        if self.uses_keypoints and (
            keypoints is None or tuple(keypoints.shape) != (n, t, cfg.num_keypoints, 3)
        ):
            got = None if keypoints is None else tuple(keypoints.shape)
            raise ValueError(
                f"this SwinGait uses KP-RPE: keypoints must be (n, T, {cfg.num_keypoints}, 3), got {got}"
            )
        if lengths is None:
            valid = torch.ones(n, t, dtype=torch.bool, device=sils.device)
        else:
            lengths = torch.as_tensor(lengths, device=sils.device)
            if lengths.shape != (n,) or bool((lengths < 1).any()) or bool((lengths > t).any()):
                raise ValueError(f"lengths must be ({n},) with values in 1..{t}, got {lengths.tolist()}")
            valid = torch.arange(t, device=sils.device)[None] < lengths[:, None]
        frames = sils[valid].float()
        kp = keypoints[valid] if self.uses_keypoints else None
        tokens = self.frame_features(frames, kp, naive_kprpe)  # (F, h, w, C)
        # temporal max pooling over each sequence's own frames (padding never wins the max)
        full = tokens.new_full((n, t, *tokens.shape[1:]), float("-inf"))
        full[valid] = tokens
        pooled = full.amax(dim=1)  # (n, h, w, C)
        parts = pooled.mean(dim=2) + pooled.amax(dim=2)  # HPP, one bin per token row: (n, P, C)
        embeddings = torch.einsum("npc,pce->npe", parts, self.fcs)  # (n, P, E)
        necked = self.bnneck(embeddings.reshape(n, -1)).view(n, cfg.num_parts, cfg.part_dim)
        weights = F.normalize(self.classifier, dim=1)  # (P, E, classes): cosine logits
        logits = torch.einsum("npe,pec->ncp", F.normalize(necked, dim=-1), weights)
        return {"embeddings": embeddings.transpose(1, 2), "logits": logits}


def load_swingait(path: str | Path) -> SwinGait:
    """A :class:`SwinGait` saved by :func:`kprpe.nn.save_model` (config in its metadata), in eval mode."""
    from safetensors import safe_open

    from .checkpoint import CONFIG_METADATA_KEY, CheckpointError, load_weights

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights not found: {path}")
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{path} is not a readable .safetensors file: {exc}") from None
    if CONFIG_METADATA_KEY not in meta:
        raise CheckpointError(f"{path} has no kprpe config in its metadata: not a file written by kprpe")
    try:
        config = SwinGaitConfig.from_dict(json.loads(meta[CONFIG_METADATA_KEY]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a SwinGait checkpoint ({exc})") from None
    model = SwinGait(config)
    load_weights(model, path)
    return model.eval()


# ---------------------------------------------------------------------- registration
def is_swingait_checkpoint(state: Mapping[str, torch.Tensor]) -> bool:
    """True for bare SwinGait keys: the per-part FCs and the per-frame transformer stages."""
    return (
        "fcs" in state and "classifier" in state and any(k.startswith("transformer.stages.") for k in state)
    )


def _load_swingait_family(
    state, *, saved_config=None, official_config=None, file_config=None, where="checkpoint", **overrides
) -> SwinGait:
    from .checkpoint import CheckpointError, check_fits_before_allocating, load_weights

    if saved_config is None:
        raise CheckpointError(
            f"{where}: a SwinGait checkpoint needs the kprpe config saved with it (its sizes "
            "cannot be read from the weights)"
        )
    try:
        config = SwinGaitConfig.from_dict({**saved_config, **overrides})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: invalid SwinGait config: {exc}") from None
    check_fits_before_allocating(config, state, where)
    model = SwinGait(config)
    load_weights(model, state)
    return model.eval()


def _register() -> None:
    from .registry import register_family, register_model

    register_family(
        SwinGaitConfig.arch,
        SwinGaitConfig,
        SwinGait,
        recognizes=is_swingait_checkpoint,
        load=_load_swingait_family,
        signature="'fcs', 'classifier' and 'transformer.stages.*' keys",
        title="SwinGait",
        describe=lambda cfg: dict(
            rel_pos=cfg.rel_pos, depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads
        ),
        describe_text=lambda row: (
            f"rel_pos={row['rel_pos']:<6} depth={row['depth']:<3} "
            f"dim={row['embed_dim']:<4} heads={row['num_heads']}"
        ),
    )
    for name, values in SWINGAIT_PRESETS.items():
        register_model(name, values, family=SwinGaitConfig.arch)


_register()
