"""``kprpe export``: a model to one self-describing ONNX file that ONNX Runtime runs without PyTorch.

The graph takes ``images`` ``(B, C, S, S)`` float32 in [-1, 1] and, for KP-RPE, ``keypoints`` ``(B, K, 2)``
(x, y) normalised to [0, 1]; it returns the raw embedding ``embedding`` ``(B, D)``. The batch dimension is
dynamic; the bucket index is a constant of the graph; only standard ONNX operators (opset >= 17) are used.

Why the TorchScript exporter (``dynamo=False``): on torch 2.13 the dynamo exporter fails on the fused
attention with a dynamic batch (its decomposition cannot view the strided SDPA output), and with the explicit
softmax it re-derives the bucket index inside the graph instead of baking it in; the TorchScript exporter
traces both attention kernels in seconds, bakes the index in as an initializer and gives ONNX Runtime a graph
it optimises well. The model is exported with ``attn_impl='sdpa'`` (iRPE always uses the explicit softmax)
and the ``gather`` bias path with one shared index: the measured fastest in ONNX Runtime (see
docs/deployment.md).

Other architectures join by registering an adapter that turns the module into an :class:`ExportSpec` (a
module with ``forward(images[, keypoints])`` plus its input conventions): ``register_adapter(IResNet, fn)``.
Registered here: the ViT family, IResNet, and the DFA face aligner (``kind="dfa"``: input the 160x160 image,
outputs the official tuple, with the similarity fit in closed form so it traces; see :class:`DfaGraph`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KprpeError
from ..files import atomic_path, write_json

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "ExportSpec",
    "register_adapter",
    "export_spec",
    "resolve_model",
    "export_onnx",
    "sidecar_path",
]

DEFAULT_OPSET = 17
METADATA_PREFIX = "kprpe_"
EXPORT_BATCH = 2  # traced at this batch size; the tests run the graph at another one


class ExportError(KprpeError):
    """A model that cannot be exported, or an export that went wrong; the message says which and why."""


@dataclass
class ExportSpec:
    """What the exporter needs: a module computing ``forward(images[, keypoints]) -> (B, D)`` and its
    conventions (which become the file's metadata and sidecar JSON)."""

    module: nn.Module
    kind: str  # vit | iresnet | dfa ...: which family made the graph
    img_size: int
    in_chans: int
    output_dim: int
    num_keypoints: int = 0  # 0: the graph has no keypoints input
    config: dict = field(default_factory=dict)
    output_names: tuple[str, ...] = ("embedding",)
    outputs: dict | None = None  # the outputs' conventions, when they are not one embedding

    @property
    def input_names(self) -> list[str]:
        return ["images", "keypoints"] if self.num_keypoints else ["images"]

    def conventions(self) -> dict:
        """The input/output contract, as written into the sidecar JSON and the metadata."""
        inputs = {
            "images": {
                "shape": ["batch", self.in_chans, self.img_size, self.img_size],
                "dtype": "float32",
                "layout": "NCHW, RGB",
                "range": [-1.0, 1.0],
                "from_uint8": "(pixel / 255 - 0.5) / 0.5",
            }
        }
        if self.num_keypoints:
            inputs["keypoints"] = {
                "shape": ["batch", self.num_keypoints, 2],
                "dtype": "float32",
                "meaning": "(x, y) of each keypoint divided by the image width and height (0..1 inside the "
                "image); faces: ArcFace order left eye, right eye, nose, left mouth corner, right mouth "
                "corner",
            }
        if self.outputs is not None:
            return {"inputs": inputs, "outputs": self.outputs}
        outputs = {
            "embedding": {
                "shape": ["batch", self.output_dim],
                "dtype": "float32",
                "meaning": "raw (un-normalised) embedding: L2-normalise it for cosine similarity; its norm "
                "is a "
                "quality signal",
            }
        }
        return {"inputs": inputs, "outputs": outputs}


_ADAPTERS: list[tuple[type | str, Callable[[nn.Module], ExportSpec]]] = []


def register_adapter(module_type: type | str, adapter: Callable[[nn.Module], ExportSpec]) -> None:
    """Make modules of ``module_type`` exportable: ``adapter(module) -> ExportSpec``.

    ``module_type`` is a class, or its dotted name (``"kprpe.face.dfa.aligner.DifferentiableFaceAligner"``)
    for classes of packages that sit above this one (the exporter must not import them: no import loop).
    """
    _ADAPTERS.insert(0, (module_type, adapter))


def _accepts(module_type: type | str, model: nn.Module) -> bool:
    if isinstance(module_type, str):
        return any(f"{k.__module__}.{k.__qualname__}" == module_type for k in type(model).__mro__)
    return isinstance(model, module_type)


def export_spec(model: nn.Module) -> ExportSpec:
    """The :class:`ExportSpec` of ``model`` from the first registered adapter that accepts its type."""
    for module_type, adapter in _ADAPTERS:
        if _accepts(module_type, model):
            return adapter(model)
    known = ", ".join(t if isinstance(t, str) else t.__name__ for t, _ in _ADAPTERS)
    raise ExportError(
        f"cannot export a {type(model).__name__}: no export adapter for it (exportable: {known})"
    )


# ------------------------------------------------------------------------------------------ ViT family
class _ImagesOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


class _ImagesAndKeypoints(_ImagesOnly):
    def forward(self, images: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        return self.model(images, keypoints)


def _vit_adapter(model: nn.Module) -> ExportSpec:
    from ..nn.vit import VisionTransformer

    cfg = model.config
    # same weights, the export-friendly kernels: fused attention (traced to MatMul/Softmax; iRPE keeps its
    # explicit softmax by itself) and the gather bias path (no Python-side caches)
    export_cfg = dataclasses.replace(
        cfg, attn_impl="sdpa", kp_bias_impl="gather", drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0
    )
    clone = VisionTransformer(export_cfg)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    wrapper = _ImagesAndKeypoints(clone) if clone.uses_keypoints else _ImagesOnly(clone)
    config = cfg.to_dict()
    config.pop("extra", None)
    return ExportSpec(
        module=wrapper.eval(),
        kind="vit",
        img_size=cfg.img_size,
        in_chans=cfg.in_chans,
        output_dim=cfg.output_dim,
        num_keypoints=cfg.num_keypoints if clone.uses_keypoints else 0,
        config=config,
    )


def _swin_adapter(model: nn.Module) -> ExportSpec:
    from ..nn.swin import SwinTransformer

    cfg = model.config  # the same weights with the fused attention and no dropout
    clone = SwinTransformer(
        dataclasses.replace(cfg, attn_impl="sdpa", drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)
    )
    clone.load_state_dict(model.state_dict())
    wrapper = _ImagesAndKeypoints(clone) if clone.uses_keypoints else _ImagesOnly(clone)
    config = cfg.to_dict()
    config.pop("extra", None)
    kp = cfg.num_keypoints if clone.uses_keypoints else 0
    return ExportSpec(wrapper.eval(), "swin", cfg.img_size, cfg.in_chans, cfg.output_dim, kp, config=config)


def _iresnet_adapter(model: nn.Module) -> ExportSpec:
    cfg = model.config  # BGR checkpoints reverse the channels inside forward: the graph still takes RGB
    return ExportSpec(
        _ImagesOnly(model).eval(), "iresnet", cfg.img_size, 3, cfg.output_dim, config=cfg.to_dict()
    )


# ------------------------------------------------------------------------------------------ DFA aligner
DFA_OUTPUTS = ("aligned_x", "orig_pred_ldmks", "aligned_ldmks", "score", "thetas", "normalized_bbox")


class DfaGraph(nn.Module):
    """The DFA aligner's forward on a ``(B, 3, 160, 160)`` RGB image in [-1, 1], written to trace to ONNX.

    Same network and the same official quirks (``kprpe.face.dfa``); what differs is the similarity fit: the
    official one is scikit-image's Umeyama in float64 on the CPU (an SVD, which ONNX has no operator for),
    here the closed-form least-squares similarity in float32 — for 2-D points without reflection the two
    solve the same problem, and they agree to float32 rounding (tests/export/test_onnx_dfa.py). The crop is
    ``grid_sample`` on a grid built from theta by one matrix product (ONNX ``GridSample``).
    """

    def __init__(self, aligner: nn.Module) -> None:
        super().__init__()
        from ..keypoints import ARCFACE_TEMPLATE_112

        self.net = aligner.net
        self.padding = float(aligner.input_padding_ratio)
        self.size_in, self.size_out = int(aligner.input_size), int(aligner.output_size)
        # the official template: the 96x112 one stored in float32, shifted by 8 px (kprpe.face.dfa.geometry)
        template = torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float64)
        template[:, 0] -= 8.0
        template = template.float().double()
        template[:, 0] += 8.0
        self.register_buffer("template", template.float(), persistent=False)
        line = torch.linspace(-1.0, 1.0, self.size_out)  # affine_grid's align_corners=True base grid
        ys, xs = torch.meshgrid(line, line, indexing="ij")
        base = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(-1, 3)
        self.register_buffer("base_grid", base, persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images
        if self.padding > 0:
            margin = int(self.size_in * self.padding)
            x = F.pad(x, (margin, margin, margin, margin), value=-1.0)
            x = F.interpolate(x, size=(self.size_in, self.size_in), mode="bilinear", align_corners=True)
        agg = self.net(x.flip(1))
        batch = agg.shape[0]
        landmarks = agg[:, 6:16].reshape(batch, 5, 2)
        score = torch.softmax(agg[:, 4:6], dim=-1)[:, 1:]
        # closed-form least-squares similarity: 160-frame pixels -> 112-crop pixels, [[a, -b, tx], [b, a, ty]]
        source = landmarks * self.size_in
        source_mean = source.mean(dim=1, keepdim=True)
        target_mean = self.template.mean(dim=0, keepdim=True)
        s, t = source - source_mean, self.template - target_mean
        norm = (s * s).sum(dim=(1, 2))
        a = (s[..., 0] * t[..., 0] + s[..., 1] * t[..., 1]).sum(dim=1) / norm
        b = (s[..., 0] * t[..., 1] - s[..., 1] * t[..., 0]).sum(dim=1) / norm
        # inverse map (crop pixel -> frame pixel): rotation [[a, b], [-b, a]] / (a^2 + b^2), then translation
        scale2 = a * a + b * b
        ia, ib = a / scale2, b / scale2
        mx, my = source_mean[:, 0, 0], source_mean[:, 0, 1]
        tx, ty = target_mean[0, 0], target_mean[0, 1]
        # frame = mean_s + R^-1 (crop - mean_t); theta = normalise_in o that o unnormalise_out
        half_out, k_in = self.size_out / 2.0, 2.0 / self.size_in
        r00, r01, r10, r11 = ia, ib, -ib, ia
        c0 = mx - (r00 * tx + r01 * ty)
        c1 = my - (r10 * tx + r11 * ty)
        # crop pixel p = (q + 1) * half_out  ->  frame pixel  ->  q_in = frame * k_in - 1
        theta = torch.stack(
            [
                torch.stack(
                    [
                        r00 * half_out * k_in,
                        r01 * half_out * k_in,
                        ((r00 + r01) * half_out + c0) * k_in - 1.0,
                    ],
                    dim=-1,
                ),
                torch.stack(
                    [
                        r10 * half_out * k_in,
                        r11 * half_out * k_in,
                        ((r10 + r11) * half_out + c1) * k_in - 1.0,
                    ],
                    dim=-1,
                ),
            ],
            dim=1,
        )
        grid = (self.base_grid @ theta.transpose(1, 2)).reshape(batch, self.size_out, self.size_out, 2)
        crop = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=True) - 1
        # aligned_ldmks: landmarks through the closed-form inverse of theta (as the official code)
        det = theta[:, 0, 0] * theta[:, 1, 1] - theta[:, 0, 1] * theta[:, 1, 0]
        i00, i01 = theta[:, 1, 1] / det, -theta[:, 0, 1] / det
        i10, i11 = -theta[:, 1, 0] / det, theta[:, 0, 0] / det
        i02 = -(i00 * theta[:, 0, 2] + i01 * theta[:, 1, 2])
        i12 = -(i10 * theta[:, 0, 2] + i11 * theta[:, 1, 2])
        q = landmarks * 2 - 1
        qx = i00[:, None] * q[..., 0] + i01[:, None] * q[..., 1] + i02[:, None]
        qy = i10[:, None] * q[..., 0] + i11[:, None] * q[..., 1] + i12[:, None]
        aligned_ldmks = torch.stack([qx, qy], dim=-1) / 2 + 0.5
        orig = landmarks
        if self.padding > 0:
            orig = ((landmarks * 2 - 1) * (1 + 2 * self.padding)) / 2 + 0.5
        return crop, orig, aligned_ldmks, score, theta, agg[:, 0:4] / self.size_in


def _dfa_adapter(model: nn.Module) -> ExportSpec:
    graph = DfaGraph(model).eval()
    described = {
        "aligned_x": "(B, 3, 112, 112) RGB crop in [-1, 1], -1 outside the photo",
        "orig_pred_ldmks": "(B, 5, 2) landmarks / 160 in the input frame",
        "aligned_ldmks": "(B, 5, 2) landmarks in the crop / 112 (the KP-RPE keypoints)",
        "score": "(B, 1) face probability (the DFA never finds 'no face': threshold this)",
        "thetas": "(B, 2, 3) affine_grid matrices, crop-normalised -> input-normalised",
        "normalized_bbox": "(B, 4) box divided by 160 twice (official quirk)",
    }
    return ExportSpec(
        graph,
        "dfa",
        img_size=graph.size_in,
        in_chans=3,
        output_dim=0,
        config={
            "arch": "dfa_mobilenet0.25",
            "input_size": graph.size_in,
            "output_size": graph.size_out,
            "input_padding_ratio": graph.padding,
        },
        output_names=DFA_OUTPUTS,
        outputs={name: {"dtype": "float32", "meaning": text} for name, text in described.items()},
    )


def _register_builtin() -> None:
    from ..nn.iresnet import IResNet
    from ..nn.vit import VisionTransformer

    register_adapter(VisionTransformer, _vit_adapter)
    register_adapter(IResNet, _iresnet_adapter)
    register_adapter("kprpe.nn.swin.SwinTransformer", _swin_adapter)
    register_adapter("kprpe.face.dfa.aligner.DifferentiableFaceAligner", _dfa_adapter)


_register_builtin()


# ------------------------------------------------------------------------------------------ export
def resolve_model(source: str | os.PathLike | nn.Module, **overrides) -> nn.Module:
    """A module from a preset name (fresh weights), a checkpoint path/directory, or a module."""
    if isinstance(source, nn.Module):
        return source.eval()
    from ..nn import CheckpointError, create_model, list_models, load_official

    text = str(source)
    try:
        if text in list_models() and not Path(text).exists():
            return create_model(text, **overrides).eval()
        return load_official(source, **overrides).eval()
    except (CheckpointError, ValueError, TypeError) as exc:
        raise ExportError(f"cannot load model {text!r}: {exc}") from None


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def _trace_inputs(spec: ExportSpec, batch: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, spec.in_chans, spec.img_size, spec.img_size, generator=generator) * 2 - 1
    if not spec.num_keypoints:
        return (images,)
    return images, torch.rand(batch, spec.num_keypoints, 2, generator=generator) * 0.6 + 0.2


def export_onnx(
    model: str | os.PathLike | nn.Module,
    output: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    check: bool = True,
    source: str | None = None,
    overrides: dict | None = None,
) -> dict:
    """Export ``model`` (module, preset name or checkpoint) to ``output`` and write the sidecar JSON.

    ``fp16``: weights and activations in float16 (inputs/outputs stay float32; for GPU execution providers;
    ONNX Runtime's CPU provider runs it slower than float32). ``check``: run the file in ONNX Runtime at a
    batch size other than the traced one and record the largest difference to PyTorch. Returns the sidecar
    dict.
    """
    import onnx

    from .. import __version__

    if opset < 17:
        raise ExportError(f"opset must be 17 or newer (LayerNormalization), got {opset}")
    output = Path(output)
    if output.suffix != ".onnx":
        raise ExportError(f"the output file must end in .onnx, got {output}")
    for path in (output, sidecar_path(output)):  # checked before the (slow) export, not at the write
        if path.is_dir():
            raise ExportError(f"{path} is a folder; the ONNX file and its .onnx.json sidecar are files")
    if source is None:
        source = str(model) if not isinstance(model, nn.Module) else type(model).__name__
    module = resolve_model(model, **(overrides or {}))
    spec = export_spec(module)
    names = spec.input_names
    dynamic = {name: {0: "batch"} for name in [*names, *spec.output_names]}
    args = _trace_inputs(spec, EXPORT_BATCH)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as traced:
        try:
            with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")  # tracer warnings about Python shapes: every shape is static
                torch.onnx.export(
                    spec.module,
                    args,
                    str(traced),
                    input_names=names,
                    output_names=list(spec.output_names),
                    dynamic_axes=dynamic,
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
        except Exception as exc:  # the exporter raises many types; name the model and keep the cause
            raise ExportError(f"ONNX export of {source} failed: {type(exc).__name__}: {exc}") from exc
        proto = onnx.load(str(traced))
        custom = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
        if custom:
            raise ExportError(
                f"the exported graph uses custom operator domains {custom}; expected standard ONNX"
            )
        if fp16:
            proto = _to_float16(proto)
        meta = {
            "version": __version__,
            "kind": spec.kind,
            "config": json.dumps(spec.config, sort_keys=True),
            "conventions": json.dumps(spec.conventions(), sort_keys=True),
            "precision": "float16" if fp16 else "float32",
            "source": str(source),
        }
        del proto.metadata_props[:]
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = METADATA_PREFIX + key, value
        proto.producer_name = "kprpe"
        proto.producer_version = __version__
        onnx.checker.check_model(proto)
        onnx.save(proto, str(traced))
    sidecar = {
        "format": "kprpe-onnx",
        "kprpe_version": __version__,
        "file": output.name,
        "source": str(source),
        "kind": spec.kind,
        "opset": opset,
        "precision": "float16" if fp16 else "float32",
        "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
        "torch_version": torch.__version__,
        **spec.conventions(),
        "config": spec.config,
    }
    if check:
        sidecar["parity"] = _parity(spec, output)
    write_json(sidecar_path(output), sidecar)
    return sidecar


def _to_float16(proto):
    """Weights and activations to float16, inputs/outputs left float32 (ONNX Runtime's own converter)."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise ExportError(f"--fp16 needs onnxruntime's float16 converter: {exc}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True)
    _sort_nodes(proto.graph)  # the converter appends its input casts at the end of the node list
    return proto


def _sort_nodes(graph) -> None:
    """Order ``graph.node`` topologically (stable: nodes keep their order where dependencies allow)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        remaining = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            raise ExportError(f"the float16 graph has a cycle or a dangling input at {remaining[0].name!r}")
        pending = remaining
    del graph.node[:]
    graph.node.extend(ordered)


def _parity(spec: ExportSpec, path: Path) -> dict:
    """Largest |ONNX Runtime - PyTorch| on random inputs at a batch size other than the traced one."""
    from .engine import OnnxEngine

    batch = EXPORT_BATCH + 1
    inputs = _trace_inputs(spec, batch)
    with torch.no_grad():
        expected = spec.module(*inputs)
    if len(spec.output_names) > 1:  # not an embedding model: compare every output with ONNX Runtime itself
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {name: tensor.numpy() for name, tensor in zip(spec.input_names, inputs, strict=True)}
        outputs = session.run(list(spec.output_names), feeds)
        per_output = {
            name: float(np.abs(o - e.numpy()).max())
            for name, o, e in zip(spec.output_names, outputs, expected, strict=True)
        }
        diff = max(per_output.values())
        scale = max(float(e.abs().max()) for e in expected)
        return {
            "per_output": per_output,
            "batch": batch,
            "max_abs_diff": diff,
            "max_abs_output": scale,
            "provider": "CPUExecutionProvider",
        }
    got = OnnxEngine(path)(*inputs)
    diff = float((got - expected).abs().max())
    scale = float(expected.abs().max())
    return {"batch": batch, "max_abs_diff": diff, "max_abs_output": scale, "provider": "CPUExecutionProvider"}
