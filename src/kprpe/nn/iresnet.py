"""IResNet (IR-18 ... IR-200, ``ir`` and ``ir_se``): the CNN of the model zoo's AdaFace/ArcFace IR models.

The network is the "improved residual" ResNet of ArcFace/AdaFace as defined by the official CVLface code, with
the official ``state_dict`` keys and order so published checkpoints load strictly:

- ``input_layer``: 3x3 conv (3 -> 64, stride 1) -> BatchNorm2d -> PReLU;
- ``output_layer``: BatchNorm2d -> Dropout -> Flatten -> Linear -> BatchNorm1d(affine=False) (raw embedding);
- ``body``: four stages of residual units; each stage's first unit halves the resolution (112 -> 7).
  A unit is ``res_layer(x) + shortcut_layer(x)``; the shortcut is a strided 1x1 max-pool (a subsample) when
  the width is unchanged, else a strided 1x1 conv + BatchNorm2d. IR-18 ... IR-100 use the two-conv unit
  (BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN), IR-152/200 the bottleneck unit at 4x the width
  (BN -> conv1x1 -> BN -> PReLU -> conv3x3 -> BN -> PReLU -> conv1x1(stride) -> BN). ``ir_se`` appends a
  squeeze-and-excitation gate (``res_layer.se_block``) to every unit.

The official ``IR_101`` is the 100-layer table (3, 13, 30, 3); ``ir_101`` and ``ir_100`` are the same network.
``color_space="BGR"`` reverses the input channels before the network, as the official wrapper does when a
checkpoint's config says ``color_space: BGR``: callers always pass RGB in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .checkpoint import CheckpointError, check_fits_before_allocating, load_weights
from .registry import config_from_dict, register_family, register_model

__all__ = [
    "COLOR_SPACES",
    "IRESNET_PRESETS",
    "LAYER_TABLES",
    "MODES",
    "IResNet",
    "IResNetConfig",
    "checkpoint_filter_fn",
    "config_from_state_dict",
    "is_iresnet_checkpoint",
    "load_iresnet",
    "official_fields",
]

# Units per stage for each depth (the official get_blocks tables); 101 is the official name of the 100 table.
LAYER_TABLES: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    101: (3, 13, 30, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
BOTTLENECK_DEPTHS = frozenset({152, 200})
BASIC_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_WIDTHS = (256, 512, 1024, 2048)
STEM_WIDTH = 64
TOTAL_STRIDE = 16  # four stride-2 stages
SE_REDUCTION = 16
MODES = ("ir", "ir_se")
COLOR_SPACES = ("RGB", "BGR")


# ---------------------------------------------------------------------- blocks
class SqueezeExcite(nn.Module):
    """Channel gate: global mean -> 1x1 conv (C -> C/16) -> ReLU -> 1x1 conv -> sigmoid, times the input."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(gate))))
        return x * gate


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity path: a strided subsample when the width is kept, else a projection (1x1 conv + BN)."""
    if in_channels == out_channels:
        return nn.MaxPool2d(kernel_size=1, stride=stride)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicUnitIR(nn.Module):
    """Two 3x3 convs, pre-activation style (BN first, PReLU between); the second conv carries the stride."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, se: bool = False) -> None:
        super().__init__()
        self.shortcut_layer = _shortcut(in_channels, out_channels, stride)
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if se:
            self.res_layer.add_module("se_block", SqueezeExcite(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class BottleneckUnitIR(nn.Module):
    """1x1 reduce to a quarter of the width -> 3x3 -> 1x1 expand (carrying the stride), BN/PReLU between."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, se: bool = False) -> None:
        super().__init__()
        mid = out_channels // 4
        self.shortcut_layer = _shortcut(in_channels, out_channels, stride)
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, mid, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(mid),
            nn.PReLU(mid),
            nn.Conv2d(mid, mid, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.PReLU(mid),
            nn.Conv2d(mid, out_channels, kernel_size=1, stride=stride, padding=0, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if se:
            self.res_layer.add_module("se_block", SqueezeExcite(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


# ---------------------------------------------------------------------- config
@dataclass
class IResNetConfig:
    """Every architecture choice of :class:`IResNet` (defaults: the official IR-50)."""

    num_layers: int = 50  # 18 | 34 | 50 | 100 | 101 (= 100) | 152 | 200
    mode: str = "ir"  # ir | ir_se (squeeze-and-excitation in every unit)
    img_size: int = 112  # square input side; the official models use 112 (224 also exists); a multiple of 16
    output_dim: int = 512
    dropout: float = 0.4  # before the final linear layer; inactive in eval()
    color_space: str = "RGB"  # BGR: reverse the (RGB) input channels first, as the official wrapper does
    extra: dict = field(default_factory=dict)  # free-form notes carried with saved checkpoints

    arch = "iresnet"  # written with saved configs so the loader knows the family (not a dataclass field)

    def validate(self) -> IResNetConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid IResNet config: {msg}")

        need(
            self.num_layers in LAYER_TABLES,
            f"num_layers must be one of {sorted(LAYER_TABLES)}, got {self.num_layers!r}",
        )
        need(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        need(
            isinstance(self.img_size, int)
            and self.img_size >= TOTAL_STRIDE
            and self.img_size % TOTAL_STRIDE == 0,
            f"img_size must be a positive multiple of {TOTAL_STRIDE} (official: 112), got {self.img_size!r}",
        )
        need(
            isinstance(self.output_dim, int) and self.output_dim > 0,
            f"output_dim must be a positive int, got {self.output_dim!r}",
        )
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        need(
            self.color_space in COLOR_SPACES,
            f"color_space must be one of {COLOR_SPACES}, got {self.color_space!r}",
        )
        return self

    @property
    def name(self) -> str:
        """Preset-style name, e.g. ``ir_se_101``."""
        return f"{self.mode}_{self.num_layers}"

    @property
    def bottleneck(self) -> bool:
        return self.num_layers in BOTTLENECK_DEPTHS

    @property
    def widths(self) -> tuple[int, int, int, int]:
        return BOTTLENECK_WIDTHS if self.bottleneck else BASIC_WIDTHS

    def to_dict(self) -> dict:
        return {"arch": self.arch, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: Mapping) -> IResNetConfig:
        return config_from_dict(cls, values, "IResNet")


# ---------------------------------------------------------------------- model
class IResNet(nn.Module):
    """IResNet face embedder; ``model(images)`` or ``model(images, keypoints)`` (keypoints are ignored, so
    one pipeline drives IResNets and KP-RPE ViTs alike). Output: the raw embedding ``(B, output_dim)``."""

    def __init__(
        self,
        *,
        num_layers: int = 50,
        mode: str = "ir",
        img_size: int = 112,
        output_dim: int = 512,
        dropout: float = 0.4,
        color_space: str = "RGB",
        extra: dict | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg = IResNetConfig(
            num_layers=num_layers,
            mode=mode,
            img_size=img_size,
            output_dim=output_dim,
            dropout=dropout,
            color_space=color_space,
            extra=dict(extra or {}),
        ).validate()
        widths = cfg.widths
        side = cfg.img_size // TOTAL_STRIDE
        unit = BottleneckUnitIR if cfg.bottleneck else BasicUnitIR

        # Registration order = the official state_dict order: input_layer, output_layer, body.
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, STEM_WIDTH, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(STEM_WIDTH),
            nn.PReLU(STEM_WIDTH),
        )
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(widths[-1]),
            nn.Dropout(cfg.dropout),
            nn.Flatten(),
            nn.Linear(widths[-1] * side * side, cfg.output_dim),
            nn.BatchNorm1d(cfg.output_dim, affine=False),
        )
        units = []
        in_channels = STEM_WIDTH
        for width, count in zip(widths, LAYER_TABLES[cfg.num_layers], strict=True):
            for i in range(count):
                units.append(unit(in_channels, width, stride=2 if i == 0 else 1, se=cfg.mode == "ir_se"))
                in_channels = width
        self.body = nn.Sequential(*units)
        self.init_weights()

    @classmethod
    def from_config(cls, config: IResNetConfig) -> IResNet:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

    def init_weights(self) -> None:
        """He-normal (fan-out) convs and linears, zero biases; BatchNorm at identity (the official init)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def uses_keypoints(self) -> bool:
        """Always False: an IResNet sees only pixels."""
        return False

    def check_inputs(self, images: torch.Tensor) -> None:
        """Raise a TypeError/ValueError naming the expected and the received input."""
        side = self.config.img_size
        expected = f"(B, 3, {side}, {side})"
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape {expected}, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(
                f"images must be a floating-point tensor scaled to [-1, 1], got dtype {images.dtype}"
            )
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != side or images.shape[3] != side:
            raise ValueError(f"images must have shape {expected} (RGB), got {tuple(images.shape)}")

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images ``(B, 3, S, S)`` in [-1, 1] -> last-stage feature map ``(B, C, S/16, S/16)``."""
        self.check_inputs(images)
        if self.config.color_space == "BGR":
            images = images.flip(1)
        return self.body(self.input_layer(images))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.output_layer(features)

    def forward(self, images: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        from .vit import match_weight_dtype

        images = match_weight_dtype(self, images)
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[0] == 0:
            return images.new_zeros((0, self.config.output_dim))
        return self.forward_head(self.forward_features(images))

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"{cfg.name}, img_size={cfg.img_size}, output_dim={cfg.output_dim}, color_space={cfg.color_space}"
        )


# ---------------------------------------------------------------------- checkpoints
OFFICIAL_PREFIXES = ("module.", "model.", "net.")
_IR_NAME = re.compile(r"^(?:iresnet|ir)(_se)?_?(\d+)$")
OTHER_ARCH_NAME = re.compile(r"^(vit|swin|small|base|tiny|large)")  # official names of non-IResNet models


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare network keys from an official checkpoint: drops the ``model.net.`` (Hugging Face wrapper) and
    ``net.`` (research ``model.pt``) prefixes, and a DataParallel ``module.``."""
    out = {}
    for key, value in state_dict.items():
        bare = key
        for prefix in OFFICIAL_PREFIXES:
            bare = bare.removeprefix(prefix)
        if bare in out:
            raise ValueError(f"two checkpoint keys map to {bare!r} after removing prefixes (one is {key!r})")
        out[bare] = value
    return out


def _parse_name(name) -> tuple[int, str] | None:
    """``ir101`` / ``ir_se_50`` / ``iresnet100`` -> (num_layers, mode); None for other names."""
    if not isinstance(name, str):
        return None
    match = _IR_NAME.match(name.strip().lower())
    if not match or int(match.group(2)) not in LAYER_TABLES:
        return None
    return int(match.group(2)), "ir_se" if match.group(1) else "ir"


def official_fields(config: Mapping | None) -> dict:
    """IResNet fields of an official config (``model.yaml`` / ``config.json``), searched at any depth:
    ``name`` (``ir18``, ``ir50``, ``ir101``, ``ir_se50``, ...), ``color_space``, ``output_dim``, ``dropout``,
    ``input_size``. Keeps the raw ``name`` under ``"name"`` so a non-IResNet name can be reported."""
    from .config_file import config_int, config_number

    found: dict = {}
    seen: set[int] = set()
    # depth first in key order (a nested mapping is searched before the keys after it), each mapping once:
    # YAML aliases share mappings, and a tree walk of nested aliases is exponential
    stack = [iter(config.items())] if isinstance(config, Mapping) else []
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        key, value = entry
        if isinstance(value, Mapping):
            if id(value) not in seen:
                seen.add(id(value))
                stack.append(iter(value.items()))
        elif key == "name" and isinstance(value, str) and "name" not in found:
            found["name"] = value
            parsed = _parse_name(value)
            if parsed:
                found["num_layers"], found["mode"] = parsed
        elif key == "color_space" and isinstance(value, str):
            found.setdefault("color_space", value.upper())
        elif key == "output_dim" and "output_dim" not in found and value is not None:
            found["output_dim"] = config_int(value, "output_dim", 1, 1 << 16)
        elif key == "dropout" and "dropout" not in found and value is not None:
            found["dropout"] = config_number(value, "dropout", 0.0, 1.0)
        elif key == "input_size" and isinstance(value, (list, tuple)) and len(value) == 2:
            found.setdefault("img_size", [config_int(v, "input_size", 1, 4096) for v in value])
    return found


def _checked_official_fields(config: Mapping | None, where: str) -> dict:
    """:func:`official_fields`, a value of the wrong kind reported as a CheckpointError naming the key."""
    try:
        return official_fields(config)
    except ValueError as exc:
        raise CheckpointError(f"{where}: its official config (model.yaml / config.json): {exc}") from None


def is_iresnet_checkpoint(state: Mapping[str, torch.Tensor]) -> bool:
    """True when bare keys have the IResNet stem and body (``input_layer.0.weight``, ``body.0.res_layer``)."""
    return "input_layer.0.weight" in state and any(k.startswith("body.0.res_layer.") for k in state)


def config_from_state_dict(state: Mapping[str, torch.Tensor]) -> dict:
    """IResNetConfig fields implied by a bare state dict's keys and shapes (depth from the units per stage).

    Raises ValueError naming what does not fit a known IResNet."""
    units = sorted({int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.res_layer\.", k))})
    if not units or units != list(range(len(units))):
        raise ValueError(f"body units are not numbered 0..n-1 (found {units[:5]}...{units[-3:]})")
    bottleneck = "body.0.res_layer.8.weight" in state
    last_bn = 8 if bottleneck else 5
    widths = []
    for i in units:
        key = f"body.{i}.res_layer.{last_bn}.weight"
        if key not in state:
            raise ValueError(
                f"key {key!r} is missing: body unit {i} is not a"
                f"{' bottleneck' if bottleneck else 'n IR'} unit"
            )
        widths.append(int(state[key].shape[0]))
    stages: list[list[int]] = []  # consecutive units of one width form a stage
    for w in widths:
        if stages and stages[-1][0] == w:
            stages[-1][1] += 1
        else:
            stages.append([w, 1])
    table = tuple(n for _, n in stages)
    expected_widths = BOTTLENECK_WIDTHS if bottleneck else BASIC_WIDTHS
    candidates = [
        d
        for d, t in LAYER_TABLES.items()
        if t == table and d != 101 and (d in BOTTLENECK_DEPTHS) == bottleneck
    ]
    if tuple(w for w, _ in stages) != expected_widths or not candidates:
        known = ", ".join(f"IR-{d}: {t}" for d, t in LAYER_TABLES.items() if d != 101)
        raise ValueError(
            f"{len(units)} {'bottleneck' if bottleneck else 'basic'} units in stages of widths "
            f"{[w for w, _ in stages]} with {list(table)} units do not form a known IResNet ({known})"
        )
    linear = state.get("output_layer.3.weight")
    if linear is None or linear.ndim != 2:
        raise ValueError("key 'output_layer.3.weight' (the embedding layer) is missing or not 2-D")
    cells, rem = divmod(int(linear.shape[1]), expected_widths[-1])
    side = int(round(cells**0.5))
    if rem or side * side != cells:
        raise ValueError(
            f"output_layer.3.weight has {linear.shape[1]} inputs: "
            f"not {expected_widths[-1]} x a square feature map"
        )
    return dict(
        num_layers=candidates[0],
        mode="ir_se" if "body.0.res_layer.se_block.fc1.weight" in state else "ir",
        img_size=side * TOTAL_STRIDE,
        output_dim=int(linear.shape[0]),
    )


def load_iresnet(
    state: Mapping[str, torch.Tensor],
    *,
    saved_config: Mapping | None = None,
    official_config: Mapping | None = None,
    file_config: Mapping | None = None,
    where: str = "checkpoint",
    **overrides,
) -> IResNet:
    """Build the IResNet a checkpoint describes and load it strictly (eval mode).

    Shapes are ground truth; ``saved_config`` (kprpe's own metadata) gives the exact config; an official
    config (model.yaml / config.json) adds ``color_space`` and ``dropout`` and must agree with the shapes;
    keyword ``overrides`` win. Without any config the colour order cannot be known: RGB is assumed, with a
    warning. ``file_config`` (config.json) is already part of ``official_config``.
    """
    bare = checkpoint_filter_fn(state)
    try:
        values = config_from_state_dict(bare)
    except ValueError as exc:
        raise CheckpointError(f"{where}: not a loadable IResNet: {exc}") from exc
    official = _checked_official_fields(official_config, where)
    if saved_config is not None:  # the registry checked that it names this family
        values = {k: v for k, v in saved_config.items() if k != "arch"}
    elif official:
        other = official.get("name", "")
        if "num_layers" not in official and OTHER_ARCH_NAME.match(other.strip().lower()):
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
    check_fits_before_allocating(config, bare, where)  # a config claiming a huge input allocates nothing
    model = IResNet.from_config(config)
    load_weights(model, bare)
    return model.eval()


def ir_18(**kwargs) -> IResNet:
    return IResNet(num_layers=18, mode="ir", **kwargs)


def ir_34(**kwargs) -> IResNet:
    return IResNet(num_layers=34, mode="ir", **kwargs)


def ir_50(**kwargs) -> IResNet:
    return IResNet(num_layers=50, mode="ir", **kwargs)


def ir_100(**kwargs) -> IResNet:
    return IResNet(num_layers=100, mode="ir", **kwargs)


def ir_101(**kwargs) -> IResNet:
    """The official IR_101 (the 100-layer table; the zoo's AdaFace/ArcFace IR-101 checkpoints)."""
    return IResNet(num_layers=101, mode="ir", **kwargs)


def ir_152(**kwargs) -> IResNet:
    return IResNet(num_layers=152, mode="ir", **kwargs)


def ir_200(**kwargs) -> IResNet:
    return IResNet(num_layers=200, mode="ir", **kwargs)


def ir_se_18(**kwargs) -> IResNet:
    return IResNet(num_layers=18, mode="ir_se", **kwargs)


def ir_se_34(**kwargs) -> IResNet:
    return IResNet(num_layers=34, mode="ir_se", **kwargs)


def ir_se_50(**kwargs) -> IResNet:
    return IResNet(num_layers=50, mode="ir_se", **kwargs)


def ir_se_100(**kwargs) -> IResNet:
    return IResNet(num_layers=100, mode="ir_se", **kwargs)


def ir_se_101(**kwargs) -> IResNet:
    return IResNet(num_layers=101, mode="ir_se", **kwargs)


def ir_se_152(**kwargs) -> IResNet:
    return IResNet(num_layers=152, mode="ir_se", **kwargs)


def ir_se_200(**kwargs) -> IResNet:
    return IResNet(num_layers=200, mode="ir_se", **kwargs)


# Preset name -> IResNetConfig fields (the registry's create_model / list_models read this).
IRESNET_PRESETS: dict[str, dict] = {
    f"{mode}_{depth}": dict(num_layers=depth, mode=mode) for mode in MODES for depth in LAYER_TABLES
}


# ---------------------------------------------------------------------- registration
def _named_iresnet(official_config: Mapping | None) -> str | None:
    """The IResNet an official config names (``ir101``, ``ir_se50``, ...), else None."""
    found = _checked_official_fields(official_config, "checkpoint")
    return found["name"] if "num_layers" in found else None


register_family(
    IResNetConfig.arch,
    IResNetConfig,
    IResNet.from_config,
    recognizes=is_iresnet_checkpoint,
    load=load_iresnet,
    signature="'input_layer.0.weight' and 'body.0.res_layer.*' keys",
    title="IResNet",
    describe=lambda cfg: dict(arch=IResNetConfig.arch, num_layers=cfg.num_layers, mode=cfg.mode),
    describe_text=lambda row: f"IResNet-{row['num_layers']} mode={row['mode']}",
    names_model=_named_iresnet,
)
for _name, _values in IRESNET_PRESETS.items():
    register_model(_name, _values, family=IResNetConfig.arch)
