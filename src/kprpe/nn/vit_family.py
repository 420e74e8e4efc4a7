"""The ViT family: its presets, its checkpoint adaptation (architecture from tensor shapes, the official
config), and its registration with :mod:`kprpe.nn.registry`.

The model and its config are in :mod:`kprpe.nn.vit`; the official config's terms in
:mod:`kprpe.nn.official_config`. Common checkpoint I/O (reading files, prefixes, shape checks, saving) is in
:mod:`kprpe.nn.checkpoint`, which hands a ViT state dict to :func:`load_vit`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from .buckets import num_buckets
from .checkpoint import CheckpointError, check_fits_before_allocating, load_weights
from .config_file import check_field_types
from .official_config import SIZES, ctx_type_of, official_vit_fields
from .registry import register_family, register_model
from .vit import VisionTransformer, ViTConfig

__all__ = ["SIZES", "ENCODINGS", "infer_config", "is_vit_checkpoint", "load_vit"]

# Preset names: vit_<size><encoding>, e.g. vit_base_kprpe (sizes in official_config.SIZES).
ENCODINGS = {
    "": dict(rel_pos="none"),
    "_rpe": dict(rel_pos="rpe"),
    "_irpe": dict(rel_pos="irpe"),
    "_kprpe": dict(rel_pos="kprpe"),
}


# ---------------------------------------------------------------------- architecture inference
def _need(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(
            f"cannot infer the architecture: key {key!r} is missing (is this a KP-RPE/ViT face model "
            "checkpoint?); "
            f"first keys: {list(state)[:8]}"
        )
    return state[key]


def infer_config(
    state: Mapping[str, torch.Tensor], *, known: Mapping | None = None, where: str = "checkpoint"
) -> dict:
    """ViTConfig fields implied by a bare state dict's tensor shapes.

    ``num_heads`` is read from the KP-RPE / iRPE / RPE tables when present; for a plain ViT it is only known
    for the official sizes, otherwise it is left out and must come from a config or an override.
    ``known`` holds fields already settled by a config or the caller (``kp_sharing``, ``num_heads``, ...):
    they decide between KP-RPE variants whose tensors have the same shapes. When the shapes still fit more
    than one variant, a :class:`CheckpointError` lists them and says how to choose — nothing is guessed.
    """
    known = dict(known or {})
    pw = _need(state, "patch_embed.proj.weight")
    if pw.ndim != 4:
        raise CheckpointError(
            f"patch_embed.proj.weight should be 4-D (D, C, p, p), got shape {tuple(pw.shape)}"
        )
    dim, chans, patch = pw.shape[0], pw.shape[1], pw.shape[2]
    cfg: dict = dict(embed_dim=dim, in_chans=chans, patch_size=patch)
    f0 = _need(state, "feature.0.weight")
    if "pos_embed" in state:
        tokens = state["pos_embed"].shape[1]
    elif f0.shape[1] % dim == 0 and f0.shape[1] != dim:
        tokens = f0.shape[1] // dim
    else:
        tokens = None
    cfg["abs_pos"] = "pos_embed" in state
    if tokens is not None:
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise CheckpointError(f"{tokens} tokens do not form a square patch grid")
        cfg["img_size"] = grid * patch
    cfg["head"] = "mean" if f0.shape[1] == dim else "flatten"
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError("cannot infer the architecture: the checkpoint has no 'blocks.<i>.' keys")
    depth = max(blocks) + 1
    if len(blocks) != depth:  # one stray 'blocks.3000.*' key must not build 3001 blocks
        gaps = sorted(set(range(depth)) - blocks)
        raise CheckpointError(
            f"block indices are not contiguous: {len(blocks)} blocks numbered up to {depth - 1} "
            f"(missing {gaps[:10]}{' ...' if len(gaps) > 10 else ''}); the checkpoint is damaged"
        )
    cfg["depth"] = depth
    cfg["mlp_ratio"] = _need(state, "blocks.0.mlp.fc1.weight").shape[0] / dim
    cfg["output_dim"] = _need(state, "feature.2.weight").shape[0]
    cfg["qkv_bias"] = "blocks.0.attn.qkv.bias" in state

    heads = None
    size_heads = next(
        (
            size["num_heads"]
            for size in SIZES.values()
            if (size["embed_dim"], size["depth"], size["mlp_ratio"]) == (dim, depth, cfg["mlp_ratio"])
        ),
        None,
    )
    if "keypoint_linear.weight" in state or "keypoint_linear.0.weight" in state:
        kp = _kprpe_from_shapes(state, dim, depth, size_heads, known, where)
        heads = kp.pop("num_heads", None)
        cfg.update(kp)
    elif any(k.startswith("blocks.0.attn.rpe_") and k.endswith("lookup_table_weight") for k in state):
        cfg["rel_pos"] = "irpe"
        cfg["irpe_on"] = "".join(s for s in "qkv" if f"blocks.0.attn.rpe_{s}.lookup_table_weight" in state)
        name = f"blocks.0.attn.rpe_{cfg['irpe_on'][0]}.lookup_table_weight"
        table = state[name]
        head_dim = table.shape[1] if cfg["irpe_on"][0] in "qk" else table.shape[2]
        heads = dim // head_dim
        cfg["irpe_shared_head"] = table.shape[0] == 1
    elif "blocks.0.attn.rpe_bias.table" in state:
        cfg["rel_pos"] = "rpe"
        heads = state["blocks.0.attn.rpe_bias.table"].shape[0]
    else:
        cfg["rel_pos"] = "none"
    if heads is None and cfg["rel_pos"] != "kprpe":  # KP-RPE: settled by _kprpe_from_shapes
        heads = size_heads
    if heads is not None:
        cfg["num_heads"] = heads
    return cfg


def _matrix(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    tensor = _need(state, key)
    if tensor.ndim != 2:
        raise CheckpointError(f"{key} should be a 2-D (out, in) matrix, got shape {tuple(tensor.shape)}")
    return tensor


def _kprpe_from_shapes(
    state: Mapping[str, torch.Tensor],
    dim: int,
    depth: int,
    size_heads: int | None,
    known: Mapping,
    where: str,
) -> dict:
    """KP-RPE fields from f's tensors: what f is (linear, kprpe's GELU MLP, the official MLP) is in the key
    names; its input and sharing come from f's in/out features, which several variants can share.

    The candidates are the official context types (docs/models.md, "KP-RPE variants") plus the keypoint-free
    control (2 inputs). ``known`` fields filter them; an official size's head count is assumed next.
    """
    cfg: dict = {"rel_pos": "kprpe"}
    if "keypoint_linear.0.weight" in state:  # the official MLP: Linear, ReLU, LayerNorm, Linear
        first, last = _matrix(state, "keypoint_linear.0.weight"), _matrix(state, "keypoint_linear.3.weight")
        cfg.update(kp_hidden=first.shape[0], kp_mlp="relu_layernorm")
    elif "keypoint_mlp.0.weight" in state:  # kprpe's control: Linear, GELU, then keypoint_linear
        first, last = _matrix(state, "keypoint_mlp.0.weight"), _matrix(state, "keypoint_linear.weight")
        cfg.update(kp_hidden=first.shape[0], kp_mlp="gelu")
    else:
        first = last = _matrix(state, "keypoint_linear.weight")
    in_f, out_f = first.shape[1], last.shape[0]
    nb = num_buckets(known.get("rpe_method", "product"), known.get("rpe_ratio", 1.9))

    inputs = []
    if in_f == 2:
        inputs.append(dict(kp_input="query_position"))
    if in_f % 2 == 0:
        inputs.append(dict(kp_input="relative", num_keypoints=in_f // 2))
    tables = []  # (kp_sharing, num_heads or None when the weights do not store it)
    if out_f % (depth * nb) == 0 and dim % (out_f // (depth * nb)) == 0:
        tables.append(("layer_head", out_f // (depth * nb)))
    if out_f == depth * nb:
        tables.append(("layer", None))
    if out_f % nb == 0 and dim % (out_f // nb) == 0:
        tables.append(("head", out_f // nb))
    if out_f == nb:
        tables.append(("shared", None))
    candidates = [dict(**i, kp_sharing=s, num_heads=h) for i in inputs for s, h in tables]
    if out_f == nb and in_f % 2 == 0 and "kp_hidden" not in cfg:  # the official "keypoint" context type
        candidates.append(
            dict(kp_input="absolute", num_keypoints=in_f // 2, kp_sharing="shared", num_heads=None)
        )

    def fits(c: dict) -> bool:
        if c["num_heads"] is not None and known.get("num_heads", c["num_heads"]) != c["num_heads"]:
            return False
        return all(known[k] == v for k, v in c.items() if k in known and k != "num_heads")

    candidates = [c for c in candidates if fits(c)]
    for c in candidates:
        if c["num_heads"] is None:
            c["num_heads"] = known.get("num_heads")
    if "num_heads" not in known and size_heads is not None:
        # an official size: its head count (a table-per-head variant with another count is not official)
        assumed = [dict(c, num_heads=size_heads) for c in candidates if c["num_heads"] in (None, size_heads)]
        candidates = assumed or candidates
    if len(candidates) == 1:
        cfg.update({k: v for k, v in candidates[0].items() if v is not None})
    elif len(candidates) > 1:
        raise CheckpointError(_ambiguity_message(where, last.shape, in_f, candidates))
    # no candidate: the config/overrides contradict the shapes; the shape check names what differs
    return cfg


def _ambiguity_message(where: str, out_shape, in_f: int, candidates: list[dict]) -> str:
    def describe(c: dict) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in c.items() if k != "num_heads" and v is not None)
        heads = "num_heads=? (not in the weights)"
        if c["num_heads"] is not None:
            heads = f"num_heads={c['num_heads']}"
        ctx = ctx_type_of(c)
        return f"({fields}, {heads}{f'; official ctx_type {ctx!r}' if ctx else ''})"

    example = next((c for c in candidates if c["kp_sharing"] != "layer_head"), candidates[0])
    hint = ", ".join(f"{k}={v!r}" for k, v in example.items() if k in ("kp_input", "kp_sharing"))
    return (
        f"{where}: the KP-RPE table f ({in_f} inputs -> {out_shape[0]} outputs) fits {len(candidates)} "
        f"variants with identical tensor shapes, and no config says which: "
        f"{'; '.join(map(describe, candidates))}. "
        f"Choose one: pass its fields to load_official (e.g. load_official(path, {hint}, num_heads=...)), "
        "or keep the official config beside the weights (config.json or pretrained_model/model.yaml with "
        "rpe_config.ctx_type)"
    )


def _config_from_file(config: Mapping) -> dict:
    """ViTConfig fields found in a config.json: our own saved config, or official-style keys at any depth
    (``name: small|base``, ``output_dim``, ``num_heads``, ...)."""
    fields = set(ViTConfig.__dataclass_fields__) - {"extra"}
    found: dict = {}

    def walk(node) -> None:
        if isinstance(node, Mapping):
            name = node.get("name")
            if isinstance(name, str) and name in SIZES and "num_heads" not in found:
                found["num_heads"] = SIZES[name]["num_heads"]
            for key, value in node.items():
                if key in fields and not isinstance(value, (Mapping, list)):
                    found.setdefault(key, value)
                else:
                    walk(value)

    walk(config)  # a JSON tree, bounded by check_config_tree when load_official read it
    try:
        check_field_types(found, ViTConfig)
    except ValueError as exc:
        raise CheckpointError(f"config.json: {exc}") from None
    return found


# ---------------------------------------------------------------------- loading
def is_vit_checkpoint(state: Mapping[str, torch.Tensor]) -> bool:
    """True when bare keys have the ViT's patch embedding (``patch_embed.proj.weight``)."""
    return "patch_embed.proj.weight" in state


def load_vit(
    state: Mapping[str, torch.Tensor],
    *,
    saved_config: Mapping | None = None,
    official_config: Mapping | None = None,
    file_config: Mapping | None = None,
    where: str = "checkpoint",
    **overrides,
) -> VisionTransformer:
    """Build the ViT a bare state dict describes and load it strictly (eval mode).

    ``saved_config`` (kprpe's own) is the exact config; otherwise the official config (model.yaml /
    config.json's conf) builds the architecture and the shapes fill the rest and must agree; other
    ``file_config`` (config.json) keys named like ViTConfig fields only fill what neither tells; keyword
    ``overrides`` win.
    """
    stated: dict = {}
    if saved_config is not None:
        values = dict(saved_config)  # saved by kprpe: the exact config
    else:
        try:
            stated = official_vit_fields(official_config)
        except ValueError as exc:
            raise CheckpointError(f"{where}: its official config (model.yaml / config.json): {exc}") from None
        loose = _config_from_file(file_config) if file_config else {}
        values = infer_config(state, known={**loose, **stated, **overrides}, where=where)
        values.update(stated)
        for key, value in loose.items():
            values.setdefault(key, value)
    values.update(overrides)
    if "num_heads" not in values:
        why = "a plain ViT of a non-standard size"
        if values.get("rel_pos") == "kprpe":
            why = f"KP-RPE with kp_sharing={values.get('kp_sharing')!r} shares its tables across heads"
        raise CheckpointError(
            f"{where}: cannot infer num_heads ({why}, and no config states it): "
            "pass it, e.g. load_official(path, num_heads=8)"
        )
    values.pop("extra", None)
    try:
        config = ViTConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint implies an invalid model config {values}: {exc}") from exc
    check_fits_before_allocating(config, state, where)
    model = VisionTransformer(config)
    load_weights(model, state)
    if stated.get("kp_input") == "absolute" and any(p.any() for p in model.kprpe.linear.parameters()):
        warnings.warn(
            f"{where}: official ctx_type 'keypoint' reads only the centre bucket of f's table, a per-sample "
            "constant that softmax cancels, so the official model ignores keypoint_linear; kprpe's absolute "
            "variant reads the whole table (the paper's absolute f(P)) and so differs from the official "
            "output here. To reproduce the official numbers, zero model.kprpe.linear's weight and bias",
            stacklevel=3,
        )
    return model.eval()


# ---------------------------------------------------------------------- registration
def _describe(config: ViTConfig) -> dict:
    return dict(
        rel_pos=config.rel_pos, depth=config.depth, embed_dim=config.embed_dim, num_heads=config.num_heads
    )


def _describe_text(row: Mapping) -> str:
    return (
        f"rel_pos={row['rel_pos']:<6} depth={row['depth']:<3} dim={row['embed_dim']:<4} "
        f"heads={row['num_heads']}"
    )


def _build(config: ViTConfig) -> nn.Module:
    return VisionTransformer(config)


register_family(
    "vit",
    ViTConfig,
    _build,
    recognizes=is_vit_checkpoint,
    load=load_vit,
    signature="'patch_embed.proj.weight' and 'blocks.<i>.*' keys",
    title="ViT",
    describe=_describe,
    describe_text=_describe_text,
)
for _size, _size_values in SIZES.items():
    for _suffix, _enc_values in ENCODINGS.items():
        register_model(f"vit_{_size}{_suffix}", {**_size_values, **_enc_values}, family="vit")
