"""``kprpe export MODEL -o model.onnx``."""

from __future__ import annotations

import argparse
import json

from .options import add_json_option, add_output_option, add_overwrite_option, emit

__all__ = ["register"]


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _cmd_export(args: argparse.Namespace) -> int:
    from ..export.onnx import export_onnx, sidecar_path
    from ..files import check_output_path

    for path in (args.output, sidecar_path(args.output)):  # both, before minutes of export work
        check_output_path(path, inputs=[args.model], overwrite=args.overwrite)
    result = export_onnx(
        args.model,
        args.output,
        opset=args.opset,
        fp16=args.fp16,
        check=not args.no_check,
        overrides=dict(args.set or []),
    )
    summary = {
        "output": str(args.output),
        "sidecar": str(sidecar_path(args.output)),
        "kind": result["kind"],
        "inputs": list(result["inputs"]),
        "precision": result["precision"],
        "opset": result["opset"],
    }
    if "parity" in result:
        summary["parity"] = result["parity"]
    text = f"exported {summary['kind']} ({summary['precision']}, opset {summary['opset']}) to {args.output}"
    if "parity" in summary:
        text += f"; ONNX Runtime vs PyTorch max |diff| {summary['parity']['max_abs_diff']:.2g}"
    emit(args, summary, text)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX (images[, keypoints] -> embedding) for ONNX Runtime",
        description=(
            "Export MODEL (a checkpoint file or directory, a published repo id, or a preset name for fresh "
            "weights) to one ONNX file with a dynamic batch dimension, the bucket index baked in and only "
            "standard operators; the model config and kprpe version go into its metadata and MODEL.onnx.json "
            "describes the inputs. Run it with '--engine onnx' in embed/verify/search/eval. See "
            "docs/deployment.md."
        ),
    )
    p.add_argument(
        "model", metavar="MODEL", help="checkpoint (anything kprpe.load_official accepts) or preset name"
    )
    add_output_option(p, help="file to write (.onnx)", metavar="ONNX")
    add_overwrite_option(p, help="replace an existing ONNX file and its .onnx.json")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17, default 17)")
    p.add_argument(
        "--fp16",
        action="store_true",
        help="float16 weights and activations (inputs/outputs stay float32); for GPU providers",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the ONNX Runtime vs PyTorch check written into the sidecar JSON",
    )
    p.add_argument(
        "--set",
        type=_override,
        action="append",
        metavar="KEY=VALUE",
        help="config field the checkpoint cannot tell, e.g. --set num_heads=8 (repeatable)",
    )
    add_json_option(p)
    p.set_defaults(func=_cmd_export)
