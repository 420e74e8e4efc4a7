"""Training configuration: plain YAML, validated on load into dataclasses; errors name the offending key.

``load_config("configs/x.yaml", ["optim.lr=3e-4", "train.max_steps=100"])`` merges ``key=value`` overrides
(values parsed as YAML) over the file, then checks every key and value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..data.transforms import AugmentConfig
from ..errors import KprpeError
from .heads import MARGIN_GRADIENTS

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "HeadConfig",
    "OptimConfig",
    "ScheduleConfig",
    "RunConfig",
    "ValidationConfig",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "HEAD_TYPES",
    "MARGIN_GRADIENTS",
]

HEAD_TYPES = ("adaface", "arcface", "cosface", "combined", "softmax")


class ConfigError(KprpeError, ValueError):
    """An invalid training config; the message starts with the dotted key at fault."""


def need(cond: bool, key: str, msg: str) -> None:
    """One config check: ``key: msg`` as a :class:`ConfigError` when ``cond`` is false."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class ModelConfig:
    name: str = "vit_small_kprpe"  # preset for kprpe.create_model
    overrides: dict = field(default_factory=dict)  # ViTConfig fields, e.g. {img_size: 32, patch_size: 4}
    pretrained: str | None = None  # fine-tune from an official / kprpe checkpoint (load_official)
    grad_checkpointing: bool = False


@dataclass
class DataConfig:
    train: str = ""  # .rec file (with .idx) or folder of <identity>/<image>
    landmarks: str | None = None  # CSV idx,ldmk_0..ldmk_9; None: ArcFace template (aligned data)
    num_classes: int | None = None  # None: read from the data set
    batch_size: int = 128  # per process and per micro-batch
    num_workers: int = 4
    missing_landmarks: str = "error"  # error | template
    on_bad_sample: str = "raise"  # raise | replace (excluded from the loss, counted and logged)
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class HeadConfig:
    type: str = "adaface"  # adaface | arcface | cosface | combined | softmax
    scale: float = 64.0
    margin: float | None = None  # adaface 0.4, arcface 0.5, cosface 0.4
    m1: float = 1.0  # combined: cos(m1 * theta + m2) - m3
    m2: float = 0.0
    m3: float = 0.0
    h: float = 0.333  # adaface
    t_alpha: float = 0.01  # adaface EMA rate of the feature-norm statistics
    sample_rate: float = 1.0  # partial FC: fraction of class centres used per step (0.1 - 1.0)
    # straight_through: the margin is a constant for the backward, as in the official heads (the cosine gets
    # the plain softmax gradient x s); exact: the textbook derivative, unbounded on easy targets
    margin_gradient: str = "straight_through"


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-4
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 5.0  # max global grad norm; 0 disables
    accumulation_steps: int = 1


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    min_lr: float = 0.0
    milestones: list = field(default_factory=list)  # step schedule: epochs where lr *= gamma
    gamma: float = 0.1


@dataclass
class RunConfig:
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    seed: int = 0
    amp: str = "none"  # none | bf16
    device: str = "auto"  # auto | cpu | cuda
    output_dir: str = "runs/kprpe"
    log_every: int = 10
    checkpoint_every: int = 1000  # optimiser steps; 0: only at the end
    keep_checkpoints: int = 2
    # consecutive steps with a NaN/inf loss or gradient that are skipped (no update) before training stops
    nonfinite_patience: int = 3
    tensorboard: bool = True
    progress: bool = True
    sync_batchnorm: bool = False  # batch statistics over all processes (exact multi-process equivalence)
    cpu_threads: int = 0  # torch CPU threads per process; 0: torch's default


@dataclass
class ValidationConfig:
    pairs: list = field(default_factory=list)  # verification .bin files (lfw.bin, cfp_fp.bin, ...)
    every: int = 1000  # optimiser steps
    batch_size: int = 128
    flip: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: RunConfig = field(default_factory=RunConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        d, h, o, s, t, v = self.data, self.head, self.optim, self.schedule, self.train, self.validation
        need(
            bool(d.train),
            "data.train",
            "is required: a .rec file (with its .idx) or a folder of <identity>/<image>",
        )
        need(
            d.num_classes is None or d.num_classes > 0,
            "data.num_classes",
            f"must be positive, got {d.num_classes}",
        )
        need(d.batch_size > 0, "data.batch_size", f"must be positive, got {d.batch_size}")
        need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
        need(
            d.missing_landmarks in ("error", "template"),
            "data.missing_landmarks",
            f"must be error or template, got {d.missing_landmarks!r}",
        )
        need(
            d.on_bad_sample in ("raise", "replace"),
            "data.on_bad_sample",
            f"must be raise or replace, got {d.on_bad_sample!r}",
        )
        try:
            d.augmentation.validate("data.augmentation")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        need(h.type in HEAD_TYPES, "head.type", f"must be one of {', '.join(HEAD_TYPES)}, got {h.type!r}")
        need(h.scale > 0, "head.scale", f"must be positive, got {h.scale}")
        need(0.0 < h.sample_rate <= 1.0, "head.sample_rate", f"must be in (0, 1], got {h.sample_rate}")
        need(0.0 < h.t_alpha <= 1.0, "head.t_alpha", f"must be in (0, 1], got {h.t_alpha}")
        need(h.margin is None or h.margin >= 0, "head.margin", f"must be >= 0, got {h.margin}")
        need(h.margin_gradient in MARGIN_GRADIENTS, "head.margin_gradient",
             f"must be {' or '.join(MARGIN_GRADIENTS)}, got {h.margin_gradient!r}")
        need(o.name in ("adamw", "sgd"), "optim.name", f"must be adamw or sgd, got {o.name!r}")
        need(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
        need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
        need(
            len(o.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas),
            "optim.betas",
            f"must be two numbers in [0, 1), got {o.betas}",
        )
        need(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")
        need(
            o.accumulation_steps >= 1, "optim.accumulation_steps", f"must be >= 1, got {o.accumulation_steps}"
        )
        need(
            s.name in ("cosine", "step", "constant"),
            "schedule.name",
            f"must be cosine, step or constant, got {s.name!r}",
        )
        need(s.warmup_epochs >= 0, "schedule.warmup_epochs", f"must be >= 0, got {s.warmup_epochs}")
        need(
            s.warmup_steps is None or s.warmup_steps >= 0,
            "schedule.warmup_steps",
            f"must be >= 0, got {s.warmup_steps}",
        )
        need(0 <= s.min_lr <= o.lr, "schedule.min_lr", f"must be in [0, optim.lr], got {s.min_lr}")
        need(
            all(isinstance(m, (int, float)) and m > 0 for m in s.milestones),
            "schedule.milestones",
            f"must be positive epochs, got {s.milestones}",
        )
        need(0 < s.gamma <= 1, "schedule.gamma", f"must be in (0, 1], got {s.gamma}")
        need(t.epochs > 0, "train.epochs", f"must be positive, got {t.epochs}")
        need(
            t.max_steps is None or t.max_steps > 0, "train.max_steps", f"must be positive, got {t.max_steps}"
        )
        need(t.amp in ("none", "bf16"), "train.amp", f"must be none or bf16, got {t.amp!r}")
        need(
            t.device in ("auto", "cpu", "cuda"),
            "train.device",
            f"must be auto, cpu or cuda, got {t.device!r}",
        )
        need(bool(t.output_dir), "train.output_dir", "must be a directory path")
        need(t.log_every > 0, "train.log_every", f"must be positive, got {t.log_every}")
        need(t.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0, got {t.checkpoint_every}")
        need(t.cpu_threads >= 0, "train.cpu_threads", f"must be >= 0 (0: torch default), got {t.cpu_threads}")
        need(t.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
        need(isinstance(t.nonfinite_patience, int) and t.nonfinite_patience >= 0, "train.nonfinite_patience",
             f"must be an int >= 0, got {t.nonfinite_patience!r}")
        need(
            all(isinstance(p, str) for p in v.pairs),
            "validation.pairs",
            f"must be a list of file paths, got {v.pairs}",
        )
        need(v.every > 0, "validation.every", f"must be positive, got {v.every}")
        need(v.batch_size > 0, "validation.batch_size", f"must be positive, got {v.batch_size}")
        return self


def _check_value(value, hint, key: str):
    """Coerce/check ``value`` against the type hint ``hint``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping of settings, got {value!r}")
        return _build(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
                try:
                    value = float(value)
                except ValueError:
                    raise ConfigError(f"{key}: must be a number, got {value!r}") from None
            else:
                raise ConfigError(f"{key}: must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    if hint is list or origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        return [float(v) if isinstance(v, str) and _is_float(v) else v for v in value]
    if hint is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {value!r}")
        return dict(value)
    return value


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key; {prefix or 'the top level'} accepts: {', '.join(known)}"
        )
    kwargs = {}
    for name in known:
        if name in values:
            key = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _check_value(values[name], hints[name], key)
    return cls(**kwargs)


def config_from_dict(values: dict) -> TrainConfig:
    if not isinstance(values, dict):
        raise ConfigError(
            f"the config must be a mapping of sections (model, data, head, ...), got {type(values).__name__}"
        )
    return _build(TrainConfig, values, "").validate()


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """``["optim.lr=3e-4", "data.augmentation.flip_p=0"]`` -> nested dict updated in place (values as
    YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key part in {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: override value {raw!r} is not valid YAML: {exc}") from exc
        node = values
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section; cannot set {key}")
            node = child
        node[parts[-1]] = value
    return values


def read_config_values(path: Path, overrides: list[str] | None = None) -> dict:
    """A YAML training config as a dict of sections, with ``section.key=value`` overrides applied (shared by
    the face and the gait trainer); a missing file, bad YAML or a non-mapping is a :class:`ConfigError`."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (model, data, head, ...)")
    apply_overrides(values, list(overrides or []))
    return values


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply overrides, validate. Relative data paths are resolved against the config
    file's directory when they exist there (so shipped configs work from any working directory)."""
    path = Path(path)
    values = read_config_values(path, overrides)
    cfg = config_from_dict(values)
    base = path.parent
    for section, name in (("data", "train"), ("data", "landmarks"), ("model", "pretrained")):
        obj = getattr(cfg, section)
        value = getattr(obj, name)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (base / value).exists():
            setattr(obj, name, str(base / value))
    cfg.validation.pairs = [
        str(base / p) if not Path(p).is_absolute() and not Path(p).exists() and (base / p).exists() else p
        for p in cfg.validation.pairs
    ]
    return cfg
