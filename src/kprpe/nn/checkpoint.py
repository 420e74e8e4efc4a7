"""Reading and writing weights: official CVLface checkpoints in, safetensors out.

Official checkpoints come as ``model.safetensors`` (Hugging Face repos, keys prefixed ``model.net.``),
research
``model.pt`` files (keys prefixed ``net.``), or bare state dicts. :func:`load_official` strips the prefixes,
infers the architecture from tensor shapes (or reads ``config.json`` / our own metadata), and loads strictly.
Pickled files are only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import KprpeError
from ..files import atomic_path
from ..zoo import ZooError, resolve
from . import iresnet
from .buckets import num_buckets
from .iresnet import (
    LAYER_TABLES,
    IResNet,
    IResNetConfig,
    checkpoint_filter_fn,
    config_from_state_dict,
    is_iresnet_checkpoint,
    official_fields,
)
from .official_config import ctx_type_of, official_vit_fields
from .registry import SIZES
from .swin import is_swin_checkpoint, load_swin
from .vit import VisionTransformer, ViTConfig

__all__ = [
    "CheckpointError",
    "read_state_dict",
    "strip_prefixes",
    "infer_config",
    "load_official",
    "load_weights",
    "save_model",
]

CONFIG_METADATA_KEY = "kprpe_config"
_PREFIXES = ("module.", "model.", "net.")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(KprpeError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says exactly why."""


# ---------------------------------------------------------------------- reading
def _find_weights_file(directory: Path) -> Path:
    candidates = [
        directory / "model.safetensors",
        directory / "pretrained_model" / "model.safetensors",
        directory / "pretrained_model" / "model.pt",
        directory / "model.pt",
        directory / "model.pth",
    ]
    for c in candidates:
        if c.is_file():
            return c
    listed = ", ".join(sorted(p.name for p in directory.iterdir())[:20]) or "(empty)"
    raise CheckpointError(
        f"no weights found in directory {directory}: expected one of "
        f"{', '.join(str(c.relative_to(directory)) for c in candidates)}; it contains: {listed}"
    )


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """State dict and the config stored beside or inside it (None when there is none)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    config = None
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
        if CONFIG_METADATA_KEY in metadata:
            try:
                saved = json.loads(metadata[CONFIG_METADATA_KEY])
            except json.JSONDecodeError as exc:
                raise CheckpointError(
                    f"{path}: the embedded {CONFIG_METADATA_KEY} is not JSON ({exc})"
                ) from None
            if not isinstance(saved, dict):
                raise CheckpointError(
                    f"{path}: the embedded {CONFIG_METADATA_KEY} is a JSON {type(saved).__name__}, "
                    "expected an object of model config fields"
                )
            config = {CONFIG_METADATA_KEY: saved}
    elif path.suffix in _PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses arbitrary objects: report, never fall back
            raise CheckpointError(
                f"could not read {path} with torch.load(weights_only=True) (only tensors and plain "
                "containers are "
                f"accepted; arbitrary pickled objects are refused for safety): {exc}"
            ) from exc
        state = _unwrap(obj, str(path))
    else:
        raise CheckpointError(
            f"unsupported checkpoint format {path.suffix!r} for {path}; expected .safetensors, .pt, .pth, "
            ".bin or .ckpt"
        )
    if config is None:
        # only the config that belongs to these weights: beside them, or the repo's when they sit in the
        # published layout's pretrained_model/ folder — never one found further up the tree
        owners = [path.parent / "config.json"]
        if path.parent.name == "pretrained_model":
            owners.append(path.parent.parent / "config.json")
        for cfg_path in owners:
            if cfg_path.is_file():
                try:
                    config = json.loads(cfg_path.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
                    raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from None
                if not isinstance(config, dict):
                    raise CheckpointError(
                        f"{cfg_path} holds a JSON {type(config).__name__}, expected an object"
                    )
                break
    return state, config


def _unwrap(obj, where: str) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one nested under 'state_dict' / 'model' (training checkpoints)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping) and not isinstance(obj[key], torch.Tensor):
                return _unwrap(obj[key], where)
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(
                f"{where}: expected a state dict of tensors, but keys {bad[:10]} are not tensors"
            )
        return dict(obj)
    raise CheckpointError(
        f"{where}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
    )


def read_state_dict(source) -> tuple[dict[str, torch.Tensor], dict | None]:
    """``(state_dict, config_or_None)`` from a file, a checkpoint directory, or an in-memory state dict."""
    if isinstance(source, Mapping):
        return _unwrap(source, "state dict"), None
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(
            f"checkpoint source must be a path or a state dict, got {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        path = _find_weights_file(path)
    return _read_file(path)


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare network keys: removes ``module.``, ``model.`` and ``net.`` prefixes (in that order)."""
    out = {}
    for key, value in state.items():
        bare = key
        for prefix in _PREFIXES:
            bare = bare.removeprefix(prefix)
        if bare in out:
            raise CheckpointError(
                f"two checkpoint keys map to {bare!r} after removing prefixes (one is {key!r})"
            )
        out[bare] = value
    return out


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
            if node.get("name") in SIZES and "num_heads" not in found:
                found["num_heads"] = SIZES[node["name"]]["num_heads"]
            for key, value in node.items():
                if key in fields and not isinstance(value, (Mapping, list)):
                    found.setdefault(key, value)
                else:
                    walk(value)

    walk(config)
    return found


def _describe(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "state dict"


def _official_model_config(source, file_config: Mapping | None) -> dict | None:
    """The official ``model.yaml`` near a checkpoint (``pretrained_model/model.yaml`` of the published repos,
    or beside the weights) merged over its ``config.json``; None when neither exists."""
    import yaml

    merged = dict(file_config or {})
    if not isinstance(source, (str, os.PathLike)):
        return merged or None
    path = Path(source).expanduser()
    base = path if path.is_dir() else path.parent
    for candidate in (base / "model.yaml", base / "pretrained_model" / "model.yaml"):
        if candidate.is_file():
            try:
                loaded = yaml.safe_load(candidate.read_text())
            except yaml.YAMLError as exc:
                raise CheckpointError(f"{candidate} is not valid YAML: {exc}") from exc
            if not isinstance(loaded, Mapping):
                raise CheckpointError(f"{candidate} should hold a mapping, got {type(loaded).__name__}")
            # model.yaml first: its values win, and are found first when searching at any depth
            merged = {**loaded, **{k: v for k, v in merged.items() if k not in loaded}}
            break
    return merged or None


def load_iresnet(
    state: Mapping[str, torch.Tensor],
    *,
    saved_config: Mapping | None = None,
    official_config: Mapping | None = None,
    where: str = "checkpoint",
    **overrides,
) -> IResNet:
    """Build the IResNet a checkpoint describes and load it strictly (eval mode).

    Shapes are ground truth; ``saved_config`` (kprpe's own metadata) gives the exact config; an official
    config (model.yaml / config.json) adds ``color_space`` and ``dropout`` and must agree with the shapes;
    keyword ``overrides`` win. Without any config the colour order cannot be known: RGB is assumed, with a
    warning.
    """
    bare = checkpoint_filter_fn(state)
    try:
        values = config_from_state_dict(bare)
    except ValueError as exc:
        raise CheckpointError(f"{where}: not a loadable IResNet: {exc}") from exc
    official = official_fields(official_config)
    if saved_config is not None:
        if saved_config.get("arch") != IResNetConfig.arch:
            raise CheckpointError(
                f"{where}: the weights are an IResNet but the stored kprpe config is for "
                f"{saved_config.get('arch', 'a ViT')!r}: the file is inconsistent"
            )
        values = {k: v for k, v in saved_config.items() if k != "arch"}
    elif official:
        other = official.get("name", "")
        if "num_layers" not in official and iresnet.OTHER_ARCH_NAME.match(other.strip().lower()):
            raise CheckpointError(
                f"{where}: the config names model {official['name']!r}, but the weights are an IResNet "
                f"({values['mode']}_{values['num_layers']}); "
                "the config and the weights do not belong together"
            )
        shape_table = LAYER_TABLES[values["num_layers"]]
        named = (official["mode"], LAYER_TABLES[official["num_layers"]]) if "num_layers" in official else None
        said = {  # what the config says vs what the tensor shapes say
            "architecture": (named, (values["mode"], shape_table)),
            "output_dim": (official.get("output_dim"), values["output_dim"]),
            "input_size": (list(official.get("img_size") or []) or None, [values["img_size"]] * 2),
        }
        for what, (config_value, shape_value) in said.items():
            if config_value is not None and config_value != shape_value:
                raise CheckpointError(
                    f"{where}: the config says {what} {config_value} (name {official.get('name')!r}) but the "
                    f"tensor shapes say {shape_value}; the config and the weights do not belong together"
                )
        if "num_layers" in official:
            values["num_layers"] = official["num_layers"]  # keeps the official name (101 rather than 100)
        for key in ("color_space", "dropout"):
            if key in official:
                values[key] = official[key]
    values.update(overrides)
    if saved_config is None and "color_space" not in values:
        warnings.warn(
            f"{where}: no config tells this IResNet's colour order; assuming RGB input. The official "
            "wrapper reverses the channels when the repo's pretrained_model/model.yaml says "
            "'color_space: BGR': keep that file beside the weights, or pass color_space='BGR' (or 'RGB') "
            "to load_official",
            stacklevel=3,
        )
    try:
        config = IResNetConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{where}: checkpoint implies an invalid IResNet config {values}: {exc}"
        ) from exc
    model = IResNet.from_config(config)
    load_weights(model, bare)
    return model.eval()


# ---------------------------------------------------------------------- factories


def load_official(source, **overrides) -> nn.Module:
    """Build a model from an official (or kprpe-saved) checkpoint and load it strictly, in eval mode.

    Face ViTs (KP-RPE, iRPE, RPE, plain) and IResNets (recognised by their ``input_layer`` / ``body`` keys,
    depth from the body units, colour order from the official ``model.yaml``) are both understood.

    ``source``: a ``.safetensors`` / ``.pt`` / ``.pth`` file; a directory laid out like the published repos
    (``config.json`` + ``model.safetensors``, or ``pretrained_model/model.pt``); a Hugging Face repo id
    (``minchul/cvlface_adaface_vit_base_kprpe_webface4m``, see :func:`kprpe.zoo.resolve`); or a state dict.
    ``overrides`` set config fields the checkpoint cannot tell (e.g. ``num_heads`` of a non-standard plain
    ViT) or runtime choices (``attn_impl``). Raises :class:`CheckpointError` on any mismatch.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            source = resolve(source, kind="recognition")  # a repo id -> its verified local snapshot
        except ZooError as exc:
            raise CheckpointError(str(exc)) from exc
    raw, file_config = read_state_dict(source)
    state = strip_prefixes(raw)
    saved = file_config.get(CONFIG_METADATA_KEY) if file_config else None
    official = None if saved else _official_model_config(source, file_config)
    if any(k.startswith("aggregator.") for k in state) and any(k.startswith("body.stage1.") for k in state):
        raise CheckpointError(
            f"{_describe(source)} holds the DFA face aligner (RetinaFace + aggregator keys), not a "
            "recognition model; give it as the aligner (--aligner dfa --aligner-weights, "
            "kprpe.load_aligner) and give a face-recognition checkpoint here"
        )
    if is_swin_checkpoint(state):  # Swin family: its own architecture inference (nn/swin.py)
        where = _describe(source)
        return load_swin(state, saved_config=saved, official_config=official, where=where, **overrides)
    if is_iresnet_checkpoint(state):  # IResNet family: its own architecture inference (nn/iresnet.py)
        where = _describe(source)
        return load_iresnet(state, saved_config=saved, official_config=official, where=where, **overrides)
    if "num_layers" in official_fields(official):
        raise CheckpointError(
            f"{_describe(source)}: the config names IResNet {official_fields(official)['name']!r}, but the "
            "weights have no IResNet keys ('input_layer.0.weight', 'body.0.res_layer.*'); "
            f"first keys: {list(state)[:5]}"
        )
    where = _describe(source)
    stated: dict = {}
    if saved:
        values = dict(saved)  # saved by kprpe: the exact config
    else:
        # the official config (model.yaml / config.json's conf) builds the architecture; shapes must agree
        try:
            stated = official_vit_fields(official)
        except ValueError as exc:
            raise CheckpointError(f"{where}: its official config (model.yaml / config.json): {exc}") from None
        # other config.json keys named like ViTConfig fields only fill what neither tells
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
    _check_fits_before_allocating(config, state, where)
    model = VisionTransformer(config)
    load_weights(model, state)
    if stated.get("kp_input") == "absolute" and any(p.any() for p in model.kprpe.linear.parameters()):
        warnings.warn(
            f"{where}: official ctx_type 'keypoint' reads only the centre bucket of f's table, a per-sample "
            "constant that softmax cancels, so the official model ignores keypoint_linear; kprpe's absolute "
            "variant reads the whole table (the paper's absolute f(P)) and so differs from the official "
            "output here. To reproduce the official numbers, zero model.kprpe.linear's weight and bias",
            stacklevel=2,
        )
    return model.eval()


@dataclass
class ShapeMismatch:
    """How a state dict differs from what a model expects: keys it lacks, keys it has in excess, and
    ``"key: checkpoint (..) vs model (..)"`` lines for tensors of another shape."""

    missing: list[str]
    unexpected: list[str]
    misshaped: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def summary(self, limit: int = 5) -> str:
        """One line: counts and the first ``limit`` of each kind."""
        parts = []
        if self.misshaped:
            shown = "; ".join(self.misshaped[:limit])
            parts.append(f"{len(self.misshaped)} tensors of the wrong shape ({shown})")
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({', '.join(self.missing[:limit])})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({', '.join(self.unexpected[:limit])})")
        return "; ".join(parts)


def compare_shapes(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> ShapeMismatch:
    """Compare a model's state dict (``expected``; meta tensors are fine) with a checkpoint's (``got``)."""
    return ShapeMismatch(
        missing=[k for k in expected if k not in got],
        unexpected=[k for k in got if k not in expected],
        misshaped=[
            f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in got and tuple(got[k].shape) != tuple(v.shape)
        ],
    )


def _check_fits_before_allocating(config: ViTConfig, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Build the model on the meta device (no memory) and compare every tensor's shape with the checkpoint's,
    so a file whose config or a zero-element tensor claims a huge model is refused before anything is
    allocated."""
    with torch.device("meta"):
        probe = VisionTransformer(config)
    mismatch = compare_shapes(probe.state_dict(), state)
    if mismatch:
        raise CheckpointError(
            f"{where}: the tensors do not fit the model config {config.to_dict()}: {mismatch.summary()} — "
            "nothing was allocated"
        )


def load_weights(model: nn.Module, source, *, strict: bool = True) -> nn.Module:
    """Load a checkpoint (path, directory or state dict; prefixes stripped, floats cast to the model's dtype)
    into an existing model. Mismatches raise a :class:`CheckpointError` listing every missing, unexpected and
    mis-shaped key."""
    raw = source if isinstance(source, Mapping) else read_state_dict(source)[0]
    state = strip_prefixes(_unwrap(raw, "state dict"))
    own = model.state_dict()
    m = compare_shapes(own, state)
    if m.misshaped or (strict and (m.missing or m.unexpected)):
        raise CheckpointError(_mismatch_message(model, m.missing, m.unexpected, m.misshaped))
    cast = {}
    for k, v in state.items():
        if k in own:
            cast[k] = v.to(own[k].dtype) if v.is_floating_point() else v
    model.load_state_dict(cast, strict=strict)
    return model


def _mismatch_message(model: nn.Module, missing: list, unexpected: list, misshaped: list) -> str:
    def block(title: str, items: list) -> str:
        if not items:
            return ""
        shown = "\n    ".join(items[:25])
        more = f"\n    ... and {len(items) - 25} more" if len(items) > 25 else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}"

    hint = ""
    if any(k.startswith("keypoint_linear") for k in unexpected):
        hint = (
            "\n  hint: this is a KP-RPE checkpoint; build a *_kprpe model or use kprpe.load_official(path)."
        )
    elif any(k.startswith("keypoint_linear") for k in missing):
        hint = (
            "\n  hint: the model is KP-RPE but the checkpoint has no keypoint table; use a plain preset or "
            "load_official."
        )
    elif any(".rpe_" in k for k in unexpected + missing):
        hint = (
            "\n  hint: the checkpoint and the model use different relative position encodings; try "
            "kprpe.load_official(path)."
        )
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    if isinstance(cfg, ViTConfig):
        desc = f"{name}(rel_pos={cfg.rel_pos}, depth={cfg.depth}, embed_dim={cfg.embed_dim})"
    else:
        desc = f"{name}({model.extra_repr()})"
    return (
        f"checkpoint does not match {desc}:"
        + block("missing from checkpoint", missing)
        + block("unexpected in checkpoint", unexpected)
        + block("shape mismatch", misshaped)
        + hint
    )


# ---------------------------------------------------------------------- writing
def save_model(model: VisionTransformer, path, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write the model's weights and config to ``path`` (.safetensors) atomically; :func:`load_official`
    reads it back without any other argument."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_model writes .safetensors files, got {path}")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
    meta.update(metadata or {})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path
