"""Named model presets: ``create_model("vit_base_kprpe", **overrides)``.

A preset only fixes sizes and the position encoding; any :class:`ViTConfig` field can be overridden.
"""

from __future__ import annotations

from collections.abc import Callable

from .vit import VisionTransformer, ViTConfig

__all__ = ["register_model", "create_model", "list_models", "preset_config"]

_PRESETS: dict[str, Callable[[], dict]] = {}

# Sizes of the official face ViTs (docs/models.md, "Presets") and the tiny size of the reference test vectors.
SIZES = {
    "tiny": dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, output_dim=32),
    "small": dict(embed_dim=512, depth=12, num_heads=8, mlp_ratio=5.0, output_dim=512),
    "base": dict(embed_dim=512, depth=24, num_heads=16, mlp_ratio=3.0, output_dim=512),
}
ENCODINGS = {
    "": dict(rel_pos="none"),
    "_rpe": dict(rel_pos="rpe"),
    "_irpe": dict(rel_pos="irpe"),
    "_kprpe": dict(rel_pos="kprpe"),
}


def register_model(name: str, values: dict) -> None:
    """Register a preset under ``name`` (a dict of :class:`ViTConfig` fields)."""
    if name in _PRESETS:
        raise ValueError(f"model {name!r} is already registered")
    ViTConfig(**values).validate()  # fail at registration, not at first use
    _PRESETS[name] = lambda: dict(values)


for _size, _size_values in SIZES.items():
    for _suffix, _enc_values in ENCODINGS.items():
        register_model(f"vit_{_size}{_suffix}", {**_size_values, **_enc_values})


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_PRESETS)


def preset_config(name: str, **overrides) -> ViTConfig:
    """The :class:`ViTConfig` of preset ``name`` with ``overrides`` applied (validated)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    values = _PRESETS[name]()
    values.update(overrides)
    return ViTConfig.from_dict(values)


def create_model(name: str = "vit_small_kprpe", **overrides) -> VisionTransformer:
    """Build preset ``name`` with fresh weights; keyword ``overrides`` change any config field
    (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``output_dim``,
    ``num_keypoints``, ``attn_impl``, ...)."""
    return VisionTransformer(preset_config(name, **overrides))
