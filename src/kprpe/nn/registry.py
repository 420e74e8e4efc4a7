"""Model families and their named presets (``create_model("vit_base_kprpe", **overrides)``,
``create_model("ir_101")``).

Models register themselves (as in timm): each family module calls :func:`register_family` once and
:func:`register_model` for each preset when it is imported, and ``kprpe/nn/__init__.py`` imports the families.
This module imports no family. A family is what the rest of kprpe asks instead of testing for a class:

- ``config_class``: a dataclass with ``from_dict(values)`` (validates, names a bad key) and ``to_dict()``;
- ``build(config)``: a fresh model whose ``.config`` is that config;
- ``recognizes(state)``: does a bare state dict (prefixes stripped) hold this family's keys;
- ``load(state, *, saved_config, official_config, file_config, where, **overrides)``: build the model a
  checkpoint describes and load it strictly, in eval mode (``saved_config``: kprpe's own, ``arch`` removed,
  else None; ``official_config``: the official ``model.yaml`` merged over ``config.json``; ``file_config``:
  ``config.json`` alone; keyword ``overrides`` win; raise ``CheckpointError`` naming ``where``). Common
  helpers are in nn/checkpoint.py (``load_weights``, ``check_fits_before_allocating``);
- ``signature``: its characteristic keys, in words, for "no family recognises this checkpoint" messages;
- optional ``describe(config) -> dict`` (the row ``kprpe models`` prints) with ``describe_text(row) -> str``
  (its table line), and ``names_model(official_config) -> str | None`` (the model name when an official
  config names one of this family, so weights of another family beside it are refused).

A saved kprpe config carries ``"arch": <family name>``; configs saved before families existed have none and
are ViTs (:data:`DEFAULT_ARCH`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "config_from_dict",
    "DEFAULT_ARCH",
    "ModelFamily",
    "register_family",
    "register_model",
    "create_model",
    "list_models",
    "list_families",
    "get_family",
    "family_of",
    "family_of_model",
    "recognize",
    "preset_config",
    "preset_family",
]

DEFAULT_ARCH = "vit"  # the family of a saved config without "arch" (written before there were families)


def _generic_text(row: Mapping) -> str:
    return " ".join(f"{k}={v}" for k, v in row.items() if k != "name")


@dataclass(frozen=True)
class ModelFamily:
    """One backbone family (see the module docstring for each callable's contract)."""

    name: str
    config_class: type
    build: Callable[[Any], nn.Module]
    recognizes: Callable[[Mapping], bool]
    load: Callable[..., nn.Module]
    signature: str
    title: str = ""  # how messages name it ("IResNet"); defaults to the name
    describe: Callable[[Any], dict] | None = None
    describe_text: Callable[[Mapping], str] = _generic_text
    names_model: Callable[[Mapping | None], str | None] | None = None

    @property
    def label(self) -> str:
        return self.title or self.name

    def row(self, config) -> dict:
        """Fields ``kprpe models`` shows for a preset's config."""
        return self.describe(config) if self.describe is not None else {}


_FAMILIES: dict[str, ModelFamily] = {}
_PRESETS: dict[str, dict] = {}
_FAMILY_OF: dict[str, str] = {}  # preset name -> family name



def config_from_dict(cls, values: Mapping, title: str):
    """The ``from_dict`` every family's config dataclass shares: drop a matching ``"arch"`` (refuse another),
    refuse unknown keys naming the known ones, build and validate. ``title`` names the family in errors."""
    values = dict(values)
    arch = values.pop("arch", cls.arch)
    if arch != cls.arch:
        raise ValueError(f"config is for architecture {arch!r}, not {cls.arch!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {title} config keys {unknown}; known keys: {sorted(known)}")
    return cls(**values).validate()


def register_family(
    name: str,
    config_class: type,
    build: Callable[[Any], nn.Module],
    *,
    recognizes: Callable[[Mapping], bool],
    load: Callable[..., nn.Module],
    signature: str,
    title: str = "",
    describe: Callable[[Any], dict] | None = None,
    describe_text: Callable[[Mapping], str] | None = None,
    names_model: Callable[[Mapping | None], str | None] | None = None,
) -> ModelFamily:
    """Register a model family under ``name`` (the ``arch`` its saved configs carry)."""
    if name in _FAMILIES:
        raise ValueError(f"model family {name!r} is already registered")
    family = ModelFamily(
        name=name,
        config_class=config_class,
        build=build,
        recognizes=recognizes,
        load=load,
        signature=signature,
        title=title,
        describe=describe,
        describe_text=describe_text or _generic_text,
        names_model=names_model,
    )
    _FAMILIES[name] = family
    return family


def get_family(name: str) -> ModelFamily:
    """The family registered as ``name``; ValueError listing the registered ones otherwise."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; available: {', '.join(_FAMILIES) or '(none)'}")
    return _FAMILIES[name]


def list_families() -> list[str]:
    """Registered family names, in registration order."""
    return list(_FAMILIES)


def family_of(config) -> ModelFamily:
    """The family whose config class ``config`` is an instance of."""
    for family in _FAMILIES.values():
        if isinstance(config, family.config_class):
            return family
    raise ValueError(
        f"{type(config).__name__} is the config of no registered model family "
        f"(registered: {', '.join(_FAMILIES) or '(none)'})"
    )


def family_of_model(model: nn.Module) -> ModelFamily:
    """The family of a built model, from its ``.config``."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config: it was not built by a registered family")
    return family_of(config)


def recognize(state: Mapping) -> ModelFamily | None:
    """The one family whose keys a bare state dict holds; None when none does. ValueError when several
    do (two families must not claim the same keys)."""
    found = [f for f in _FAMILIES.values() if f.recognizes(state)]
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise ValueError(f"the checkpoint's keys fit several model families: {names}")
    return found[0] if found else None


def register_model(name: str, values: dict, *, family: str = DEFAULT_ARCH) -> None:
    """Register a preset under ``name``: a dict of config fields of ``family`` (validated now, so a bad
    preset fails at import rather than at first use)."""
    if name in _PRESETS:
        raise ValueError(f"model {name!r} is already registered")
    get_family(family).config_class.from_dict(dict(values))
    _PRESETS[name] = dict(values)
    _FAMILY_OF[name] = family


def list_models(family: str | None = None) -> list[str]:
    """Names accepted by :func:`create_model`; ``family`` (e.g. "vit" or "iresnet") keeps one family."""
    if family is not None:
        get_family(family)
    return sorted(n for n in _PRESETS if family is None or _FAMILY_OF[n] == family)


def preset_family(name: str) -> ModelFamily:
    """The family of preset ``name``."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _FAMILIES[_FAMILY_OF[name]]


def preset_config(name: str, **overrides):
    """The config of preset ``name`` (its family's config class) with ``overrides`` applied (validated)."""
    family = preset_family(name)
    return family.config_class.from_dict({**_PRESETS[name], **overrides})


def create_model(name: str = "vit_small_kprpe", **overrides) -> nn.Module:
    """Build preset ``name`` with fresh weights; keyword ``overrides`` change any config field
    (ViT: ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``,
    ``output_dim``, ``num_keypoints``, ``attn_impl``, ...; IResNet: ``img_size``, ``output_dim``, ``dropout``,
    ``color_space``)."""
    config = preset_config(name, **overrides)
    return preset_family(name).build(config)
