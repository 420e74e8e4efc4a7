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
    "apply_model_defaults",
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
            default=None,
            metavar="W",
            help="checkpoint file or directory, or a published repo id (anything kprpe.load_official "
            "accepts); with --engine onnx, a file from 'kprpe export' (default: the published KP-RPE "
            "ViT-Base, minchul/cvlface_adaface_vit_base_kprpe_webface4m, downloaded on first use)",
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


def apply_model_defaults(args: argparse.Namespace) -> None:
    """What a command with model options uses when they are not given, decided in one place (idempotent):
    ``--weights`` -> the published KP-RPE ViT-Base (:data:`kprpe.zoo.DEFAULT_WEIGHTS`), resolved through
    the zoo into ``args.weights_path`` (downloaded on first use, sha256 checked, its training-data terms
    shown once; offline and not cached: the one-line error naming ``kprpe fetch``); an ``--aligner`` left
    unset (None) -> the DFA for the published KP-RPE weights, which were trained on its crops, else dlib (and
    dlib with a one-line notice when the DFA cannot be had offline)."""
    import sys

    from ..errors import CommandError
    from ..zoo import DEFAULT_WEIGHTS, ZooError, default_aligner, resolve

    if getattr(args, "weights", None) is None:
        if getattr(args, "engine", "torch") == "onnx":
            raise CommandError("--engine onnx needs --weights: the .onnx file 'kprpe export' wrote")
        args.weights = DEFAULT_WEIGHTS
    if isinstance(args.weights, str) and getattr(args, "weights_path", None) is None:
        try:  # a path is itself; a repo id -> its verified snapshot (fetched on first use)
            args.weights_path = resolve(args.weights, kind="recognition")
        except ZooError as exc:
            raise CommandError(str(exc)) from None
    if getattr(args, "aligner", "") is None:
        if getattr(args, "landmarks", None) or getattr(args, "mode", "aligned") != "aligned":
            args.aligner = "dlib"  # keypoints from a file, or crops the DFA would not make: as before
        else:
            choice = default_aligner(args.weights, getattr(args, "aligner_weights", None))
            if choice.notice:
                print(choice.notice, file=sys.stderr, flush=True)
            args.aligner = choice.name
