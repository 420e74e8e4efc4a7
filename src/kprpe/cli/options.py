"""Command-line options that several ``kprpe`` commands share, defined once so they are spelled alike.

A leaf module (it imports only the standard library): every command module of :mod:`kprpe.cli` may import
it.
"""

from __future__ import annotations

import argparse

__all__ = [
    "DEFAULT_DEVICE",
    "DEFAULT_BATCH_SIZE",
    "add_output_option",
    "add_overwrite_option",
    "add_quiet_option",
    "add_device_option",
    "add_model_options",
    "add_workers_option",
]

DEFAULT_DEVICE = "cpu"
DEFAULT_BATCH_SIZE = 64


def add_output_option(
    parser, *, help: str, required: bool = True, default=None, type=str, metavar: str = "OUT"
) -> None:
    """``-o/--output``, the one spelling of every command's output."""
    text = help if default is None else f"{help} (default: {default})"
    parser.add_argument(
        "-o",
        "--output",
        dest="output",
        type=type,
        default=default,
        required=required,
        metavar=metavar,
        help=text,
    )


def add_overwrite_option(parser, *, help: str | None = None) -> None:
    """``--overwrite``: replace an existing output file (never an input; kprpe.files.check_output_path)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=help or "replace output files that already exist (inputs are never overwritten)",
    )


def add_quiet_option(parser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_device_option(parser) -> None:
    parser.add_argument(
        "--device",
        default=DEFAULT_DEVICE,
        help=f"torch device, e.g. cpu, cuda, cuda:1 (default {DEFAULT_DEVICE})",
    )


def add_model_options(parser, *, repeatable: bool = False) -> argparse._ArgumentGroup:
    """The checkpoint and how faces are embedded with it (``--weights``, ``--no-flip``, ``--batch-size``,
    ``--device``, ``--engine``); ``repeatable``: ``--weights [NAME=]W`` may be given several times
    (comparisons)."""
    group = parser.add_argument_group("model")
    if repeatable:
        group.add_argument(
            "--weights",
            required=True,
            action="append",
            metavar="[NAME=]W",
            help="checkpoint, optionally named; repeat to compare checkpoints",
        )
    else:
        group.add_argument(
            "--weights",
            required=True,
            metavar="W",
            help="checkpoint file or directory, or a published repo id such as "
            "minchul/cvlface_adaface_vit_base_kprpe_webface4m (anything kprpe.load_official "
            "accepts); with --engine onnx, a file from 'kprpe export'",
        )
    group.add_argument("--no-flip", action="store_true", help="disable flip-sum test-time augmentation")
    group.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"faces per forward pass (default {DEFAULT_BATCH_SIZE})",
    )
    add_device_option(group)
    group.add_argument(
        "--engine",
        choices=("torch", "onnx"),
        default="torch",
        help="torch (default): --weights is a checkpoint run by PyTorch; onnx: a file from "
        "'kprpe export' run by ONNX Runtime (kprpe[onnx])",
    )
    return group


def add_workers_option(parser) -> None:
    """``--workers N``: processes that decode, detect and align while the model embeds (0: in-process)."""
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="worker processes for decoding, face detection and alignment (default: in this process for "
        "fewer than 32 photos, else CPU cores - 1, at most 4; 0 = all in this process)",
    )
