"""Deployment: ONNX export (``kprpe export``) and the ONNX Runtime engine (``--engine onnx``)."""

from __future__ import annotations

from .engine import ENGINES, OnnxEngine, OnnxInputError, OnnxModelError, load_engine
from .onnx import (
    DEFAULT_OPSET,
    ExportError,
    ExportSpec,
    export_onnx,
    export_spec,
    register_adapter,
    sidecar_path,
)

__all__ = [
    "DEFAULT_OPSET",
    "ENGINES",
    "ExportError",
    "ExportSpec",
    "OnnxEngine",
    "OnnxInputError",
    "OnnxModelError",
    "export_onnx",
    "export_spec",
    "load_engine",
    "register_adapter",
    "sidecar_path",
]
