"""Reading and writing weights: official CVLface checkpoints in, safetensors out — what every model family
shares.

Official checkpoints come as ``model.safetensors`` (Hugging Face repos, keys prefixed ``model.net.``),
research ``model.pt`` files (keys prefixed ``net.``), or bare state dicts. :func:`load_official` reads the
file and the config beside it, strips the prefixes, and hands the state dict to the registered family that
recognises it (nn/registry.py), which infers its architecture and loads strictly. Pickled files are only
ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import KprpeError
from ..files import atomic_path
from ..zoo import ZooError, resolve
from .config_file import check_config_tree, read_config_yaml
from .registry import DEFAULT_ARCH, family_of, family_of_model, get_family, list_families, recognize

__all__ = [
    "CheckpointError",
    "read_state_dict",
    "strip_prefixes",
    "compare_shapes",
    "check_fits_before_allocating",
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


MAX_CONFIG_BYTES = 1 << 20


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
                size = cfg_path.stat().st_size
                if size > MAX_CONFIG_BYTES:  # a model config is a few KB: refuse before reading it
                    raise CheckpointError(
                        f"{cfg_path} is {size:,} bytes, more than any model config "
                        f"(limit {MAX_CONFIG_BYTES:,}): not a config.json"
                    )
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


def _describe(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "state dict"


def _official_model_config(source, file_config: Mapping | None) -> dict | None:
    """The official ``model.yaml`` near a checkpoint (``pretrained_model/model.yaml`` of the published repos,
    or beside the weights) merged over its ``config.json``; None when neither exists."""
    merged = dict(file_config or {})
    if not isinstance(source, (str, os.PathLike)):
        return merged or None
    path = Path(source).expanduser()
    base = path if path.is_dir() else path.parent
    for candidate in (base / "model.yaml", base / "pretrained_model" / "model.yaml"):
        if candidate.is_file():
            try:  # bounded: size, depth, alias expansion (nn/config_file.py)
                loaded = read_config_yaml(candidate)
            except (OSError, ValueError) as exc:
                raise CheckpointError(str(exc)) from None
            if not isinstance(loaded, Mapping):
                raise CheckpointError(f"{candidate} should hold a mapping, got {type(loaded).__name__}")
            # model.yaml first: its values win, and are found first when searching at any depth
            merged = {**loaded, **{k: v for k, v in merged.items() if k not in loaded}}
            break
    try:  # bounded before any family walks it; each family type-checks the values it reads
        check_config_tree(merged, f"{_describe(source)}: its config")
    except ValueError as exc:
        raise CheckpointError(
            f"{_describe(source)}: its official config (model.yaml / config.json): {exc}"
        ) from None
    return merged or None


# ---------------------------------------------------------------------- loading: dispatch to a family
def _family_for(
    state: Mapping[str, torch.Tensor], saved: Mapping | None, official: Mapping | None, where: str
):
    """The registered family that loads ``state``: the one whose keys it holds (shapes are ground truth),
    which must agree with the family a kprpe-saved config names; else the family the saved or official
    config names, so that family says what its weights lack."""
    try:
        found = recognize(state)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if saved is not None:
        arch = saved.get("arch", DEFAULT_ARCH)
        try:
            named = get_family(arch)
        except ValueError as exc:
            raise CheckpointError(f"{where}: the stored {CONFIG_METADATA_KEY} names {exc}") from None
        if found is not None and found is not named:
            raise CheckpointError(
                f"{where}: the weights are of model family {found.name!r} but the stored kprpe config is "
                f"for {arch!r}: the file is inconsistent"
            )
        return named
    for family in (get_family(name) for name in list_families()):
        said = family.names_model(official) if family.names_model and official else None
        if said and family is not found:
            raise CheckpointError(
                f"{where}: the config names {family.label} {said!r}, but the weights have no {family.label} "
                f"keys ({family.signature}); first keys: {list(state)[:5]}"
            )
    if found is None:
        expected = "; ".join(f"{get_family(n).label}: {get_family(n).signature}" for n in list_families())
        raise CheckpointError(
            f"{where}: cannot infer the architecture: no registered model family recognises the keys "
            f"({expected}); first keys: {list(state)[:8]}"
        )
    return found


def load_official(source=None, **overrides) -> nn.Module:
    """Build a model from an official (or kprpe-saved) checkpoint and load it strictly, in eval mode.

    The registered family that recognises the state dict builds it (nn/registry.py): face ViTs (KP-RPE,
    iRPE, RPE, plain; nn/vit_family.py) and IResNets (nn/iresnet.py) today. A file saved by
    :func:`save_model` names its family; an official config (``model.yaml`` / ``config.json``) that names a
    model of another family than the weights is refused.

    ``source``: a ``.safetensors`` / ``.pt`` / ``.pth`` file; a directory laid out like the published repos
    (``config.json`` + ``model.safetensors``, or ``pretrained_model/model.pt``); a Hugging Face repo id
    (``minchul/cvlface_adaface_vit_base_kprpe_webface4m``, see :func:`kprpe.zoo.resolve`); or a state dict.
    None (the default): the published KP-RPE ViT-Base, :data:`kprpe.zoo.DEFAULT_WEIGHTS`, downloaded on first
    use (its training-data terms are printed once).
    ``overrides`` set config fields the checkpoint cannot tell (e.g. ``num_heads`` of a non-standard plain
    ViT) or runtime choices (``attn_impl``). Raises :class:`CheckpointError` on any mismatch.
    """
    if source is None:
        from ..zoo import DEFAULT_WEIGHTS

        source = DEFAULT_WEIGHTS
    if isinstance(source, (str, os.PathLike)):
        try:
            source = resolve(source, kind="recognition")  # a repo id -> its verified local snapshot
        except ZooError as exc:
            raise CheckpointError(str(exc)) from exc
    raw, file_config = read_state_dict(source)
    state = strip_prefixes(raw)
    saved = file_config.get(CONFIG_METADATA_KEY) if file_config else None
    official = None if saved else _official_model_config(source, file_config)
    where = _describe(source)
    if any(k.startswith("aggregator.") for k in state) and any(k.startswith("body.stage1.") for k in state):
        raise CheckpointError(
            f"{where} holds the DFA face aligner (RetinaFace + aggregator keys), not a "
            "recognition model; give it as the aligner (--aligner dfa --aligner-weights, "
            "kprpe.load_aligner) and give a face-recognition checkpoint here"
        )
    family = _family_for(state, saved, official, where)
    saved_values = {k: v for k, v in saved.items() if k != "arch"} if saved is not None else None
    return family.load(
        state,
        saved_config=saved_values,
        official_config=official,
        file_config=None if saved else file_config,
        where=where,
        **overrides,
    )


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


def check_fits_before_allocating(config, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Build the model of ``config`` (any registered family's) on the meta device (no memory) and compare
    every tensor's shape with the checkpoint's, so a file whose config or a zero-element tensor claims a huge
    model is refused before anything is allocated."""
    build = family_of(config).build
    with torch.device("meta"):
        probe = build(config)
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
    desc = f"{type(model).__name__}({model.extra_repr()})"
    return (
        f"checkpoint does not match {desc}:"
        + block("missing from checkpoint", missing)
        + block("unexpected in checkpoint", unexpected)
        + block("shape mismatch", misshaped)
        + hint
    )


# ---------------------------------------------------------------------- writing
def save_model(model: nn.Module, path, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a registered family's model (weights, and its config with ``"arch": <family>``) to ``path``
    (.safetensors) atomically; :func:`load_official` reads it back without any other argument."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_model writes .safetensors files, got {path}")
    try:
        arch = family_of_model(model).name
    except ValueError as exc:
        raise CheckpointError(f"save_model: {exc}") from None
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {CONFIG_METADATA_KEY: json.dumps({**model.config.to_dict(), "arch": arch})}
    meta.update(metadata or {})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path
