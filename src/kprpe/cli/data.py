"""``kprpe pack``, ``kprpe landmarks`` and ``kprpe make-example-data``. Each prints its result by the one
output convention (docs/cli.md): a short summary on a terminal, compact JSON with ``--json`` or on a pipe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CommandError
from ..files import check_output_path, write_json
from .options import (
    REMOVED_IN,
    add_deprecated_alias,
    add_device_option,
    add_json_option,
    add_output_option,
    add_overwrite_option,
    add_quiet_option,
    emit,
)

__all__ = ["register"]


def _first(failures: list[tuple], label: str, limit: int = 20) -> list[str]:
    """Summary lines for the first ``limit`` (item, reason) failures and how many more there are."""
    lines = [f"  {label.format(item)}: {reason}" for item, reason in failures[:limit]]
    if len(failures) > limit:
        lines.append(f"  ... and {len(failures) - limit} more")
    return lines


def _cmd_pack(args: argparse.Namespace) -> int:
    from ..data.pack import pack_folder

    out = Path(args.output)
    if out.suffix != ".rec":
        raise CommandError(f"--output must end in .rec (the .idx is written beside it), got {out}")
    for path in (out, out.with_suffix(".idx")):
        check_output_path(path, inputs=[args.folder], overwrite=args.overwrite)
    try:
        report = pack_folder(
            args.folder, out, resize=args.resize, quality=args.quality, progress=not args.quiet
        )
    except OSError as exc:  # data, landmark and image errors are KprpeErrors: kprpe.cli prints them
        raise CommandError(str(exc)) from None
    lines = [
        f"wrote {report.num_images} images of {report.num_identities} identities to {out} (+ "
        f"{out.with_suffix('.idx').name})"
    ]
    payload = {
        "output": str(out),
        "index": str(out.with_suffix(".idx")),
        "images": report.num_images,
        "identities": report.num_identities,
        "ignored": list(report.ignored),
        "failures": [{"file": f, "reason": r} for f, r in report.failures],
    }
    if report.ignored:
        first = ", ".join(report.ignored[:5])
        lines.append(f"ignored {len(report.ignored)} non-image files (first: {first})")
    if report.failures:
        lines.append(f"SKIPPED {len(report.failures)} unreadable images:")
        lines += _first(report.failures, "{}")
        failures_path = write_json(out.with_suffix(".failures.json"), payload["failures"])
        lines.append(
            f"full list: {failures_path}; note: sample indices follow the packed order; compute landmarks "
            "on the packed .rec"
        )
    emit(args, payload, "\n".join(lines))
    if report.failures:
        if not args.allow_skipped:
            print(
                f"kprpe pack: {len(report.failures)} images were skipped (exit status 1; pass "
                "--allow-skipped to accept)",
                file=sys.stderr,
            )
            return 1
    else:
        out.with_suffix(".failures.json").unlink(
            missing_ok=True
        )  # a list from an earlier run no longer applies
    return 0


def _cmd_landmarks(args: argparse.Namespace) -> int:
    from ..data.pack import compute_landmarks

    data = Path(args.data)
    for path in (Path(args.output), Path(args.output).with_suffix(".failures.json")):
        check_output_path(path, inputs=[data, data.with_suffix(".idx")], overwrite=args.overwrite)
    try:
        from ..face import backends  # the package itself: it may be left out of an install
    except ImportError as exc:
        raise CommandError(f"the face pipeline (kprpe.face) is not available: {exc}") from None
    if args.aligner == "dfa":
        detect = backends.dfa_keypoint_function(args.aligner_weights, args.device, args.min_score)
    else:
        detect = backends.dlib_keypoint_function(args.mode, args.detector, args.landmark_model)
    try:
        report = compute_landmarks(args.data, args.output, detect, progress=not args.quiet, limit=args.limit)
    except OSError as exc:  # data, landmark and image errors are KprpeErrors: kprpe.cli prints them
        raise CommandError(str(exc)) from None
    lines = [f"landmarks for {report.num_found} of {report.num_samples} samples written to {report.csv_path}"]
    payload = {
        "output": str(report.csv_path),
        "samples": report.num_samples,
        "found": report.num_found,
        "failures": [{"index": i, "reason": r} for i, r in report.failures],
    }
    if report.failures:
        lines.append(f"{len(report.failures)} samples have no landmarks (no row in the file):")
        lines += _first(report.failures, "sample {}")
        failures_path = write_json(Path(args.output).with_suffix(".failures.json"), payload["failures"])
        lines.append(
            f"full list: {failures_path}; train with data.missing_landmarks=template to use the template for "
            "them"
        )
    emit(args, payload, "\n".join(lines))
    return 0


def _cmd_example_data(args: argparse.Namespace) -> int:
    from ..data.pack import pack_folder
    from ..data.synthetic import make_synthetic_faces

    if args.old_output is not None:
        print(
            f"{args.command_prog}: warning: a positional DIR is deprecated, use -o DIR (the old spelling "
            f"goes in kprpe {REMOVED_IN})",
            file=sys.stderr,
        )
        args.output = args.old_output
    out = Path(args.output)
    # the one output rule, before any work: files of an earlier data set are replaced only with --overwrite
    for target in ("train.rec", "train.idx", "landmarks.csv"):
        check_output_path(out / target, overwrite=args.overwrite)
    images = out / "images"
    if images.is_dir() and any(images.iterdir()) and not args.overwrite:
        raise CommandError(f"{images} already holds images; pass --overwrite to replace the example data")
    folder, landmarks = make_synthetic_faces(
        out / "images",
        num_identities=args.identities,
        images_per_identity=args.images_per_identity,
        size=args.size,
        seed=args.seed,
        progress=not args.quiet,
    )
    report = pack_folder(folder, out / "train.rec", progress=not args.quiet)
    (out / "landmarks.csv").write_bytes(landmarks.read_bytes())
    payload = {
        "output": str(out),
        "rec": str(out / "train.rec"),
        "landmarks": str(out / "landmarks.csv"),
        "images": report.num_images,
        "identities": report.num_identities,
    }
    text = (
        f"wrote {report.num_images} synthetic images of {report.num_identities} identities: "
        f"{out / 'train.rec'}, {out / 'landmarks.csv'} (images kept in {folder})"
    )
    emit(args, payload, text)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pack", help="pack an image folder (<identity>/<image>) into insightface RecordIO"
    )
    p.add_argument("folder", help="folder with one sub-folder of images per identity")
    add_output_option(p, help="output .rec path (the .idx is written beside it)", metavar="REC")
    add_overwrite_option(p, help="replace an existing .rec and .idx")
    p.add_argument("--resize", type=int, default=None, help="re-encode every image as a SIZE x SIZE JPEG")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality with --resize (default 95)")
    p.add_argument(
        "--allow-skipped",
        action="store_true",
        help="exit with status 0 even if unreadable images were skipped (default: status 1, list written)",
    )
    p.add_argument("--strict", action="store_true", help=argparse.SUPPRESS)  # the default since 0.2
    add_quiet_option(p)
    add_json_option(p)
    p.set_defaults(func=_cmd_pack)

    p = subparsers.add_parser(
        "landmarks", help="compute a data set's 5-point landmark file (CSV idx,ldmk_0..ldmk_9)"
    )
    p.add_argument("data", help="a .rec file (with .idx) or an image folder")
    add_output_option(p, help="CSV to write", metavar="CSV")
    add_overwrite_option(p)
    p.add_argument(
        "--mode",
        choices=("auto", "detect", "crop"),
        default="auto",
        help="detect faces, treat each image as a face crop, or detect then fall back to crop (default)",
    )
    p.add_argument(
        "--detector", choices=("hog", "cnn"), default="hog", help="dlib face detector (default hog)"
    )
    p.add_argument(
        "--landmark-model", choices=("68", "5"), default="68", help="dlib landmark model (default 68)"
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N samples (for a quick check)")
    g = p.add_argument_group("aligner")
    g.add_argument(
        "--aligner",
        choices=("dlib", "dfa"),
        default="dlib",
        help="dlib (default) or dfa: the official DFA aligner the published KP-RPE weights were trained with "
        "(batched; --mode, --detector, --landmark-model are dlib's)",
    )
    g.add_argument(
        "--aligner-weights",
        metavar="W",
        default="minchul/cvlface_DFA_mobilenet",
        help="DFA checkpoint file/folder or Hugging Face repo id (default minchul/cvlface_DFA_mobilenet)",
    )
    g.add_argument(
        "--min-score",
        type=float,
        default=None,
        metavar="S",
        help="with --aligner dfa: samples whose DFA face score is below S get no row (default: keep all)",
    )
    add_deprecated_alias(g, "--min-aligner-score", new="--min-score", dest="min_score", type=float)
    add_device_option(g)
    add_quiet_option(p)
    add_json_option(p)
    p.set_defaults(func=_cmd_landmarks)

    p = subparsers.add_parser(
        "make-example-data", help="write the small synthetic data set the example config trains on"
    )
    add_output_option(p, help="output folder", required=False, default="example_data", metavar="DIR")
    # the old spelling, a positional DIR: kept for one version, with a warning (docs/cli.md, deprecations)
    old = p.add_argument("old_output", nargs="?", default=None, metavar="DIR", help=argparse.SUPPRESS)
    old.deprecated_values = {"(positional)": "-o DIR"}  # docs/cli.md lists it
    add_overwrite_option(p, help="replace the example data already in the output folder")
    p.add_argument("--identities", type=int, default=20)
    p.add_argument("--images-per-identity", type=int, default=16)
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0)
    add_quiet_option(p)
    add_json_option(p)
    p.set_defaults(func=_cmd_example_data)
