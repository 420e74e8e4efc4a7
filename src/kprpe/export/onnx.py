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

import torch
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


_ADAPTERS: list[tuple[type, Callable[[nn.Module], ExportSpec]]] = []


def register_adapter(module_type: type, adapter: Callable[[nn.Module], ExportSpec]) -> None:
    """Make modules of ``module_type`` exportable: ``adapter(module) -> ExportSpec``."""
    _ADAPTERS.insert(0, (module_type, adapter))


def export_spec(model: nn.Module) -> ExportSpec:
    """The :class:`ExportSpec` of ``model`` from the first registered adapter that accepts its type."""
    for module_type, adapter in _ADAPTERS:
        if isinstance(model, module_type):
            return adapter(model)
    known = ", ".join(t.__name__ for t, _ in _ADAPTERS)
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


def _register_builtin() -> None:
    from ..nn.vit import VisionTransformer

    register_adapter(VisionTransformer, _vit_adapter)
    # IResNet / the DFA aligner join here with one line each once they exist, e.g.
    # register_adapter(IResNet, lambda m: ExportSpec(m.eval(), "iresnet", 112, 3, m.output_dim))


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
    if source is None:
        source = str(model) if not isinstance(model, nn.Module) else type(model).__name__
    module = resolve_model(model, **(overrides or {}))
    spec = export_spec(module)
    names = spec.input_names
    dynamic = {name: {0: "batch"} for name in [*names, "embedding"]}
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
                    output_names=["embedding"],
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
    got = OnnxEngine(path)(*inputs)
    diff = float((got - expected).abs().max())
    scale = float(expected.abs().max())
    return {"batch": batch, "max_abs_diff": diff, "max_abs_output": scale, "provider": "CPUExecutionProvider"}
