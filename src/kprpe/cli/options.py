"""Command-line options that several ``kprpe`` commands share, defined once so they are spelled alike.

A leaf module (it imports only the standard library and :mod:`kprpe.errors`): every command module of
:mod:`kprpe.cli` may import it. docs/cli.md writes the vocabulary down.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import CommandError

__all__ = [
    "DEFAULT_DEVICE",
    "DEFAULT_BATCH_SIZE",
    "REMOVED_IN",
    "DeprecatedAlias",
    "Parser",
    "add_deprecated_alias",
    "add_json_option",
    "emit",
    "json_safe",
    "wants_json",
    "stdout_is_terminal",
    "add_flip_options",
    "flip_enabled",
    "add_gallery_option",
    "require_gallery",
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
# a deprecated spelling keeps working, with a warning, until this version (docs/cli.md, deprecation policy)
REMOVED_IN = "0.5"


# ------------------------------------------------------------------------------------- deprecated spellings


class Parser(argparse.ArgumentParser):
    """Every ``kprpe`` parser: options match only when spelled out. argparse's default prefix matching took
    ``--lr 3`` for ``--lr-drops 3`` without a word; sub-command parsers inherit this class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the new option's ``dest`` (``const`` for flags) and warns
    ``kprpe <command>: warning: OLD is deprecated, use NEW``. Hidden from ``--help``; docs/cli.md lists it."""

    def __init__(self, option_strings, dest, *, new: str, nargs=None, const=None, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, nargs=0 if const is not None else nargs, const=const, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        # the new spelling came first (a value other than the option's default)
        if getattr(namespace, self.dest, None) not in (None, self.default, parser.get_default(self.dest)):
            parser.error(f"{option_string} is an old spelling of {self.new}: give it once")
        print(
            f"{parser.prog}: warning: {option_string} is deprecated, use {self.new} "
            f"(the old spelling goes in kprpe {REMOVED_IN})",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, self.const if self.const is not None else values)


class _StoreOnce(argparse.Action):
    """A value that an old spelling may also have given (``--index`` then ``--gallery``): refused twice."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) not in (None, self.default):
            parser.error(f"{option_string} and an old spelling of it were both given: give it once")
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser, old: str, *, new: str, dest: str, const=None, **kwargs) -> None:
    """``old`` (e.g. ``--index``) as a hidden, warning spelling of ``new`` (``--gallery``, stored in
    ``dest``); ``const``: the value a flag stores (e.g. ``--no-norm`` -> ``norm_pooling=False``)."""
    parser.add_argument(
        old, dest=dest, action=DeprecatedAlias, new=new, const=const, help=argparse.SUPPRESS, **kwargs
    )


# ------------------------------------------------------------------------------------------------- output


def add_json_option(parser) -> None:
    """``--json``: the result as one line of compact JSON (the default when stdout is not a terminal)."""
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the result as one line of compact JSON (the default when stdout is not a terminal)",
    )


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def wants_json(args: argparse.Namespace) -> bool:
    """The output convention: JSON with ``--json`` or when stdout is piped or redirected, else a summary."""
    return bool(getattr(args, "json", False)) or not stdout_is_terminal()


def emit(args: argparse.Namespace, payload: dict, summary: str) -> None:
    """Print a command's result by the one output convention (docs/cli.md): a short human ``summary`` on a
    terminal, ``payload`` as one line of compact JSON with ``--json`` or on a pipe. Strict JSON: a NaN or
    infinity is a bug upstream and must not reach a consumer as invalid JSON."""
    if wants_json(args):
        print(json.dumps(payload, separators=(",", ":"), allow_nan=False))
    else:
        print(summary)


def json_safe(value):
    """A result made fit for :func:`emit`'s strict JSON: paths as text, numpy values as Python ones, NaN and
    infinity (a metric with no data, a skipped non-finite step's loss) as null."""
    import math

    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return json_safe(value.tolist())
    return str(value)


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


def add_quiet_option(parser, *, help: str = "no progress bars") -> None:
    """``-q/--quiet``: less on stderr (the result on stdout is unchanged)."""
    parser.add_argument("-q", "--quiet", action="store_true", help=help)


def add_device_option(parser) -> None:
    parser.add_argument(
        "--device",
        default=DEFAULT_DEVICE,
        help=f"torch device, e.g. cpu, cuda, cuda:1 (default {DEFAULT_DEVICE})",
    )


def add_model_options(parser, *, repeatable: bool = False) -> argparse._ArgumentGroup:
    """The checkpoint and how faces are embedded with it (``--weights``, ``--flip/--no-flip``,
    ``--batch-size``, ``--device``, ``--engine``); ``repeatable``: ``--weights [NAME=]W`` may be given
    several times (comparisons)."""
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
    add_flip_options(group)
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


def add_flip_options(parser) -> None:
    """``--flip`` / ``--no-flip``: flip-sum test-time augmentation, one pair everywhere. Neither given: on,
    except where the DFA makes the crop (:func:`flip_enabled`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--flip",
        dest="flip",
        action="store_const",
        const=True,
        default=None,
        help="flip-sum test-time augmentation (default: on; off where the DFA makes the crop, i.e. face "
        "commands and serve with --aligner dfa, as in its official pipeline)",
    )
    group.add_argument(
        "--no-flip", dest="flip", action="store_const", const=False, help="no flip test-time augmentation"
    )


def flip_enabled(args: argparse.Namespace) -> bool:
    """The one flip rule for commands whose aligner makes the crop (face commands, serve): ``--flip`` /
    ``--no-flip`` when given; otherwise on, unless ``--aligner dfa`` crops the faces (the official DFA
    pipeline has no flip). ``eval`` never crops with its aligner: there the default is always on."""
    if getattr(args, "flip", None) is not None:
        return bool(args.flip)
    return getattr(args, "aligner", "dlib") != "dfa"


def add_gallery_option(parser, *, help: str, old: tuple[str, ...] = ("--index",)) -> None:
    """``--gallery GALLERY``: the gallery index every command reads or writes (``old``: deprecated spellings).
    Not argparse-required, so that an old spelling can satisfy it: check with :func:`require_gallery`."""
    parser.add_argument(
        "--gallery", dest="gallery", action=_StoreOnce, metavar="GALLERY", default=None, help=help
    )
    for spelling in old:
        add_deprecated_alias(parser, spelling, new="--gallery", dest="gallery", metavar="GALLERY")


def require_gallery(args: argparse.Namespace) -> str:
    """``--gallery`` of a command that cannot run without one (a usage error, exit 2, like argparse's)."""
    if not args.gallery:
        raise CommandError(
            "--gallery GALLERY is required: a gallery file of 'kprpe search enrol' or a database URI"
        )
    return args.gallery


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
