"""Named model presets: ``create_model("vit_base_kprpe", **overrides)``, ``create_model("ir_101")``.

A ViT preset only fixes sizes and the position encoding; any :class:`ViTConfig` field can be overridden.
An IResNet preset (``ir_18`` ... ``ir_200``, ``ir_se_*``) fixes depth and mode; any :class:`IResNetConfig`
field can be overridden.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .iresnet import IRESNET_PRESETS, IResNet, IResNetConfig
from .swin import SWIN_PRESETS, SwinConfig, SwinTransformer
from .swingait import SWINGAIT_PRESETS, SwinGait, SwinGaitConfig
from .vit import VisionTransformer, ViTConfig

__all__ = ["register_model", "create_model", "list_models", "preset_config"]

_PRESETS: dict[str, Callable[[], dict]] = {}
_FAMILY_OF: dict[str, str] = {}  # preset name -> "vit" | "iresnet" | "swin"
# family -> (config class, builder from a config)
FAMILIES = {
    "vit": (ViTConfig, VisionTransformer),
    "iresnet": (IResNetConfig, IResNet.from_config),
    "swin": (SwinConfig, SwinTransformer),
    "swingait": (SwinGaitConfig, SwinGait),
}

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


def register_model(name: str, values: dict, *, family: str = "vit") -> None:
    """Register a preset under ``name``: a dict of :class:`ViTConfig` fields (``family="vit"``) or of
    :class:`IResNetConfig` fields (``family="iresnet"``)."""
    if name in _PRESETS:
        raise ValueError(f"model {name!r} is already registered")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; available: {', '.join(FAMILIES)}")
    FAMILIES[family][0](**values).validate()  # fail at registration, not at first use
    _PRESETS[name] = lambda: dict(values)
    _FAMILY_OF[name] = family


for _size, _size_values in SIZES.items():
    for _suffix, _enc_values in ENCODINGS.items():
        register_model(f"vit_{_size}{_suffix}", {**_size_values, **_enc_values})
for _name, _ir_values in IRESNET_PRESETS.items():
    register_model(_name, _ir_values, family="iresnet")
for _name, _swin_values in SWIN_PRESETS.items():
    register_model(_name, _swin_values, family="swin")
for _name, _gait_values in SWINGAIT_PRESETS.items():
    register_model(_name, _gait_values, family="swingait")


def list_models(family: str | None = None) -> list[str]:
    """Names accepted by :func:`create_model`; ``family`` ("vit" or "iresnet") keeps one family."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; available: {', '.join(FAMILIES)}")
    return sorted(n for n in _PRESETS if family is None or _FAMILY_OF[n] == family)


def preset_config(name: str, **overrides) -> ViTConfig | IResNetConfig:
    """The config (:class:`ViTConfig` or :class:`IResNetConfig`) of preset ``name`` with ``overrides`` applied
    (validated)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    values = _PRESETS[name]()
    values.update(overrides)
    return FAMILIES[_FAMILY_OF[name]][0].from_dict(values)


def create_model(name: str = "vit_small_kprpe", **overrides) -> nn.Module:
    """Build preset ``name`` with fresh weights; keyword ``overrides`` change any config field
    (ViT: ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``,
    ``output_dim``, ``num_keypoints``, ``attn_impl``, ...; IResNet: ``img_size``, ``output_dim``, ``dropout``,
    ``color_space``)."""
    config = preset_config(name, **overrides)
    return FAMILIES[_FAMILY_OF[name]][1](config)
