"""``kprpe gait pack`` and ``kprpe gait make-synthetic``: thin wrappers over :mod:`kprpe.gait`. Each prints
its result by the one output convention (docs/cli.md): a short summary on a terminal, compact JSON with
``--json`` or on a pipe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CommandError
from .options import add_json_option, add_output_option, add_quiet_option, emit, json_safe

__all__ = ["register"]


def _progress(quiet: bool, what: str):
    if quiet:
        return None

    def report(done: int, total: int) -> None:
        if done % 50 == 0 or done == total - 1:
            print(f"\r{what} {done + 1}/{total}", end="\n" if done == total - 1 else "", file=sys.stderr)

    return report


def _int_pair(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH integers, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}")
    return parts[0], parts[1]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _cmd_pack(args: argparse.Namespace) -> int:
    from ..gait.pack import pack_sequences

    report = pack_sequences(
        args.silhouettes,
        args.output,
        args.poses,
        width=args.width,
        partition=args.partition,
        allow_missing_ids=args.allow_missing_ids,
        test_fraction=args.test_fraction,
        seed=args.seed,
        progress=_progress(args.quiet, "sequence"),
    )
    partition = _partition_counts(report.partition)
    lines = [
        f"packed {report.packed} sequences ({report.frames} frames) to {args.output}"
        + (f"; kept {report.resumed} from an earlier run" if report.resumed else ""),
        f"dropped {report.dropped_frames} near-empty frames; {report.frames_without_pose} frames without "
        f"a pose file; {report.invalid_joints} invalid joints zeroed (NaN, negative confidence, outside "
        "the image)",
    ]
    if report.links_left:
        lines.append(f"ignored {report.links_left} frame files that are links leaving their root")
    lines.append(
        f"partition.json: {partition['train_ids']} train ids, {partition['test_ids']} test ids, "
        f"{partition['probes']} probes"
    )
    if report.skipped:
        lines.append(f"SKIPPED {len(report.skipped)} sequences:")
        lines += [f"  {path}: {reason}" for path, reason in report.skipped[:20]]
        if len(report.skipped) > 20:
            lines.append(f"  ... and {len(report.skipped) - 20} more")
    payload = {
        "output": str(args.output),
        "sequences": report.packed,
        "resumed": report.resumed,
        "frames": report.frames,
        "dropped_frames": report.dropped_frames,
        "frames_without_pose": report.frames_without_pose,
        "invalid_joints": report.invalid_joints,
        "links_left": report.links_left,
        "partition": partition,
        "skipped": [{"sequence": path, "reason": reason} for path, reason in report.skipped],
        "files": [str(Path(args.output) / "partition.json")],
    }
    emit(args, json_safe(payload), "\n".join(lines))
    if report.skipped and not args.allow_skipped:
        print(
            f"kprpe gait pack: {len(report.skipped)} sequences were skipped (exit status 1; pass "
            "--allow-skipped to accept; re-running resumes)",
            file=sys.stderr,
        )
        return 1
    return 0


def _partition_counts(partition) -> dict:
    """partition.json in numbers (the summary's and the JSON's)."""
    return {
        "train_ids": len(partition.train_ids),
        "test_ids": len(partition.test_ids),
        "probes": len(partition.probe_set),
    }


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    from ..gait.synthetic import SyntheticConfig, make_synthetic

    try:
        config = SyntheticConfig(
            ids=args.ids,
            sequences_per_id=args.sequences,
            frames=args.frames,
            views=args.views,
            width=args.width,
            seed=args.seed,
            misalign=args.misalign,
            occluder_probability=args.occluders,
            keypoint_noise=args.keypoint_noise,
            dropout=args.dropout,
            test_fraction=args.test_fraction,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if args.workers < 1:
        raise CommandError(f"--workers must be at least 1, got {args.workers}")
    report = make_synthetic(
        args.output, config, progress=_progress(args.quiet, "walker"), workers=args.workers
    )
    partition = _partition_counts(report.partition)
    summary = (
        f"wrote {report.sequences} sequences ({report.frames} frames) of {config.ids} walkers to "
        f"{args.output}; partition.json: {partition['train_ids']} train / {partition['test_ids']} test ids, "
        f"{partition['probes']} probes"
    )
    payload = {
        "output": str(args.output),
        "walkers": config.ids,
        "sequences": report.sequences,
        "frames": report.frames,
        "partition": partition,
        # every sequence's nuisances (view, phase, speed, ...) are in synthetic.json, not on stdout
        "files": [str(Path(args.output) / name) for name in ("partition.json", "synthetic.json")],
    }
    emit(args, json_safe(payload), summary)
    return 0


def register(subparsers) -> None:
    """Add ``kprpe gait pack`` and ``kprpe gait make-synthetic``."""
    p = subparsers.add_parser("gait", help="gait data: pack silhouettes + poses, make synthetic walkers")
    sub = p.add_subparsers(dest="gait_command", metavar="GAIT_COMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    pack = sub.add_parser(
        "pack",
        help="pretreat per-frame silhouette PNGs (and pose files) into the OpenGait layout",
        description="Per frame: drop near-empty silhouettes, crop rows, resize to height 64, centre on the "
        "mass column, cut to 44 (or 64) columns; keypoints move with the same transform (joined by frame "
        "number). "
        "Writes OUT/<id>/<type>/<view>/{pose,sils}.pkl and OUT/partition.json. Interrupted runs leave only "
        "whole sequences and resume when re-run. See docs/gait.md.",
    )
    pack.add_argument("silhouettes", help="folder of <id>/<type>/<view>/*.png (Gait3D: 2D_Silhouettes)")
    pack.add_argument("--poses", help="folder of <id>/<type>/<view>/*.txt|json|csv (Gait3D: 2D_Poses)")
    add_output_option(pack, help="output folder (new, empty, or an earlier pack)")
    pack.add_argument(
        "--width", type=int, choices=(44, 64), default=44, help="output frame width (default 44)"
    )
    pack.add_argument(
        "--partition", help="a partition JSON (e.g. Gait3D's) to check and copy; default: make one"
    )
    pack.add_argument(
        "--allow-missing-ids", action="store_true", help="accept a partition naming ids that have no sequence"
    )
    pack.add_argument(
        "--allow-skipped", action="store_true", help="exit 0 even if some sequences were skipped (listed)"
    )
    pack.add_argument("--test-fraction", type=float, default=0.5, help="made partition: share of test ids")
    pack.add_argument("--seed", type=int, default=0, help="made partition: seed for test ids and probes")
    add_quiet_option(pack, help="no progress")
    add_json_option(pack)
    pack.set_defaults(func=_cmd_pack)

    syn = sub.add_parser(
        "make-synthetic",
        help="write synthetic walkers (silhouettes + COCO-17 poses) in the OpenGait layout",
        description="Deterministic per seed. Identity lives in the gait (period, amplitudes, timing); one "
        "frame's static shape says little. For tests and sanity checks only, never accuracy claims. "
        "See docs/gait.md.",
    )
    add_output_option(syn, help="output folder (new, empty, or an earlier output)")
    syn.add_argument("--ids", type=int, default=20, help="number of walkers (default 20)")
    syn.add_argument("--sequences", type=int, default=6, help="sequences per walker (default 6)")
    syn.add_argument(
        "--frames", type=_int_pair, default=(30, 60), help="LOW,HIGH frames per sequence (30,60)"
    )
    syn.add_argument(
        "--views",
        type=_int_list,
        default=(30, 60, 90, 120, 150),
        help="camera yaws in degrees, 90 = side view",
    )
    syn.add_argument("--width", type=int, choices=(44, 64), default=44, help="frame width (default 44)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument(
        "--misalign",
        action="store_true",
        help="scale and translate each sequence at random, keypoints following",
    )
    syn.add_argument("--occluders", type=float, default=0.25, help="share of sequences with an occluding bar")
    syn.add_argument("--keypoint-noise", type=float, default=0.4, help="keypoint noise, render pixels (0.4)")
    syn.add_argument(
        "--dropout", type=float, default=0.05, help="share of joints that are wild guesses (0.05)"
    )
    syn.add_argument("--test-fraction", type=float, default=0.5, help="share of test ids in partition.json")
    syn.add_argument("--workers", type=int, default=1, help="processes rendering walkers (same output)")
    add_quiet_option(syn, help="no progress")
    add_json_option(syn)
    syn.set_defaults(func=_cmd_make_synthetic)
