"""``kprpe align | embed | verify | search``: the face pipeline on the command line.

Every command prints one JSON object on stdout (progress and per-file problems go to stderr). Exit status:
0 all inputs processed; 1 finished, but some inputs failed (they are listed in the output); 2 nothing could
be done (bad arguments, missing weights, no face in a verify photo, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..cli_options import add_model_options, add_output_option, add_quiet_option
from ..errors import CommandError
from ..files import write_csv, write_npz, write_png
from ..images import ImageLoadError
from ..landmarks import LandmarkFileError
from .align import ALIGN_MODES, AlignmentError
from .detector import FaceDetector, MissingDependencyError, NoFaceFound
from .embedder import FaceEmbedder
from .landmark_files import LANDMARK_COLUMNS, SuppliedLandmarks
from .pipeline import DEFAULT_THRESHOLD, BatchResult, FacePipeline, verify
from .search import FaceIndex, FaceIndexError

__all__ = ["register"]


# ------------------------------------------------------------------------------------------- shared options


def _upsample(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or 0..4, got {text!r}") from None
    if not 0 <= value <= 4:
        raise argparse.ArgumentTypeError(f"expected 'auto' or 0..4, got {value}")
    return value


def _add_pipeline_options(parser: argparse.ArgumentParser, *, all_faces: bool = True) -> None:
    group = parser.add_argument_group("faces")
    group.add_argument(
        "--mode",
        choices=ALIGN_MODES,
        default="aligned",
        help="aligned: similarity transform to the ArcFace template (default); unaligned: detector box "
        "resized to 112, keypoints follow; prealigned: inputs already are 112x112 crops",
    )
    group.add_argument("--detector", choices=("hog", "cnn"), default="hog",
                       help="dlib face detector: hog (fast, default) or cnn (more robust, slow on CPU)")
    group.add_argument("--landmark-model", choices=("68", "5"), default="68",
                       help="dlib shape model: 68 points (default) or 5 points (mouth corners estimated)")
    group.add_argument(
        "--upsample",
        type=_upsample,
        default="auto",
        help="dlib upsampling for small faces: auto (0, then 1, then 2 until a face is found) or 0..4",
    )
    group.add_argument("--min-score", type=float, default=0.0, help="detector score threshold (default 0)")
    group.add_argument(
        "--min-face-size", type=float, default=0.0, help="ignore faces smaller than this many pixels"
    )
    group.add_argument("--landmarks", metavar="FILE",
                       help="use keypoints from this CSV/JSON file (any external detector) instead of dlib")
    group.add_argument("--landmarks-normalized", action="store_true",
                       help="coordinates in --landmarks are fractions of image width/height, not pixels")
    if all_faces:
        group.add_argument("--all-faces", action="store_true", help="keep every face, not only the largest")
    add_quiet_option(parser)


def _detector(args: argparse.Namespace) -> FaceDetector:
    try:
        if args.landmarks:
            return SuppliedLandmarks.from_file(args.landmarks, normalized=args.landmarks_normalized)
        from .dlib_backend import DlibDetector

        return DlibDetector(
            args.detector, args.landmark_model, upsample=args.upsample, min_score=args.min_score
        )
    except (MissingDependencyError, LandmarkFileError) as exc:
        raise CommandError(str(exc)) from None


def _pipeline(args: argparse.Namespace) -> FacePipeline:
    return FacePipeline(
        _detector(args),
        mode=args.mode,
        all_faces=getattr(args, "all_faces", False),
        min_face_size=args.min_face_size,
    )


def _embedder(args: argparse.Namespace) -> FaceEmbedder:
    from ..nn import CheckpointError

    if args.batch_size <= 0:
        raise CommandError(f"--batch-size must be positive, got {args.batch_size}")
    weights = Path(args.weights)
    if not weights.exists():
        raise CommandError(f"weights {weights} do not exist")
    try:
        return FaceEmbedder.from_weights(
            weights, flip=not args.no_flip, batch_size=args.batch_size, device=args.device
        )
    except (CheckpointError, ValueError, OSError) as exc:
        raise CommandError(f"cannot load weights {weights}: {exc}") from None
    except (RuntimeError, AssertionError) as exc:  # torch: unknown device, CUDA not available
        raise CommandError(f"cannot use device {args.device!r} for weights {weights}: {exc}") from None


def _report_failures(command: str, batch: BatchResult) -> list[dict]:
    for path, reason in batch.failures:
        print(f"kprpe {command}: skipped {path}: {reason}", file=sys.stderr)
    return [{"file": path, "reason": reason} for path, reason in batch.failures]


def _print_json(payload: dict) -> None:
    print(json.dumps(payload, indent=2))


def _status(batch: BatchResult) -> int:
    return 1 if batch.failures else 0


def _unique_stem(stem: str, used: set[str]) -> str:
    candidate, counter = stem, 2
    while candidate in used:
        candidate = f"{stem}-{counter}"
        counter += 1
    used.add(candidate)
    return candidate


# ----------------------------------------------------------------------------------------------- commands


def _cmd_align(args: argparse.Namespace) -> int:
    from .draw import draw_keypoints

    pipeline = _pipeline(args)
    batch = pipeline.process(args.inputs, progress=not args.quiet)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    rows = []
    for record in batch.records:
        stem = Path(record.source).stem + (f"_{record.face_index}" if pipeline.all_faces else "")
        stem = _unique_stem(stem, used)
        write_png(out / f"{stem}.png", record.face.image)
        if args.draw:
            write_png(out / "draw" / f"{stem}.png", draw_keypoints(record.face))
        rows.append([f"{stem}.png", *(f"{v:.6f}" for v in record.face.keypoints.reshape(-1))])
    write_csv(out / "landmarks.csv", ["file", *LANDMARK_COLUMNS], rows)
    failures = _report_failures("align", batch)
    if failures:
        write_csv(out / "failures.csv", ["file", "reason"], batch.failures)
    _print_json({"output": str(out), "landmarks": str(out / "landmarks.csv"), "faces": len(rows),
                 "images": len({r.source for r in batch.records}) + len(failures), "failures": failures})
    return _status(batch)


def _cmd_embed(args: argparse.Namespace) -> int:
    pipeline = _pipeline(args)
    embedder = _embedder(args)
    batch = pipeline.process(args.inputs, progress=not args.quiet)
    unit, norms = embedder.embed_faces([record.face for record in batch.records])
    failures = _report_failures("embed", batch)
    metadata = {
        "weights": str(args.weights),
        "model_fingerprint": embedder.fingerprint,
        "flip": embedder.flip,
        "pipeline": pipeline.describe(),
    }
    output = write_npz(
        args.output,
        names=np.asarray([r.name for r in batch.records], dtype=str).reshape(-1),
        sources=np.asarray([r.source for r in batch.records], dtype=str).reshape(-1),
        face_index=np.asarray([r.face_index for r in batch.records], dtype=np.int64),
        embeddings=unit,
        norms=norms,
        keypoints=np.asarray([r.face.keypoints for r in batch.records], dtype=np.float32).reshape(
            -1, embedder.num_keypoints, 2),
        failures=np.asarray(batch.failures, dtype=str).reshape(-1, 2),
        metadata=np.asarray(json.dumps(metadata)),
    )
    _print_json(
        {
            "output": str(output),
            "embedded": len(batch.records),
            "dim": int(unit.shape[1]),
            "failures": failures,
        }
    )
    return _status(batch)


def _cmd_verify(args: argparse.Namespace) -> int:
    from .draw import side_by_side

    pipeline = _pipeline(args)
    embedder = _embedder(args)
    try:
        result = verify(args.a, args.b, pipeline=pipeline, embedder=embedder, threshold=args.threshold)
    except (ImageLoadError, NoFaceFound, AlignmentError, LandmarkFileError) as exc:
        raise CommandError(str(exc)) from None
    payload = {"a": args.a, "b": args.b, **result.to_dict()}
    if args.visualize:
        picture = side_by_side(*result.faces, result.similarity, result.same, result.threshold)
        payload["visualization"] = str(write_png(args.visualize, picture))
    _print_json(payload)
    return 0


def _cmd_search_enrol(args: argparse.Namespace) -> int:
    pipeline = _pipeline(args)
    embedder = _embedder(args)
    try:
        index, failures = FaceIndex.enrol(
            args.gallery, pipeline=pipeline, embedder=embedder, progress=not args.quiet
        )
    except FaceIndexError as exc:
        raise CommandError(str(exc)) from None
    for path, reason in failures:
        print(f"kprpe search enrol: skipped {path}: {reason}", file=sys.stderr)
    if len(index) == 0:
        raise CommandError(f"no identity in {args.gallery} had a usable face; nothing enrolled")
    index.metadata["weights"] = str(args.weights)
    output = index.save(args.output)
    _print_json({"output": str(output), "identities": len(index), "images": int(index.counts.sum()),
                 "failures": [{"file": p, "reason": r} for p, r in failures]})
    return 1 if failures else 0


def _cmd_search_query(args: argparse.Namespace) -> int:
    if args.top_k <= 0:
        raise CommandError(f"-k must be positive, got {args.top_k}")
    try:
        index = FaceIndex.load(args.index)
    except FaceIndexError as exc:
        raise CommandError(str(exc)) from None
    pipeline = _pipeline(args)
    embedder = _embedder(args)
    try:
        index.check_compatible(embedder)
    except FaceIndexError as exc:
        raise CommandError(str(exc)) from None
    batch = pipeline.process(args.inputs, progress=not args.quiet)
    hits = index.search_faces([r.face for r in batch.records], embedder, k=args.top_k)
    failures = _report_failures("search", batch)
    results = [
        {"name": record.name, "file": record.source, "face_index": record.face_index,
         "matches": [{"identity": h.identity, "score": h.score} for h in row]}
        for record, row in zip(batch.records, hits, strict=True)
    ]
    _print_json({"index": str(args.index), "results": results, "failures": failures})
    return _status(batch)


def register(subparsers) -> None:
    """Add ``align``, ``embed``, ``verify`` and ``search`` to the ``kprpe`` command."""
    p = subparsers.add_parser(
        "align",
        help="detect faces and write 112x112 crops + landmarks.csv",
        description="Detect faces, crop them (aligned, unaligned or prealigned) to 112x112 "
        "PNGs in OUT and write OUT/landmarks.csv (keypoints normalised to the crop).",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS")
    add_output_option(p, help="output directory")
    p.add_argument(
        "--draw", action="store_true", help="also write OUT/draw/<stem>.png with the keypoints drawn"
    )
    _add_pipeline_options(p)
    p.set_defaults(func=_cmd_align)

    p = subparsers.add_parser(
        "embed",
        help="embed the faces of photos into an .npz",
        description="Embed faces with a KP-RPE checkpoint. Writes an .npz (allow_pickle=False) "
        "with names, sources, face_index, embeddings (unit), norms, keypoints, "
        "failures (file, reason) and metadata (JSON).",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS")
    add_output_option(p, help="embeddings file to write (.npz)", metavar="NPZ")
    _add_pipeline_options(p)
    add_model_options(p)
    p.set_defaults(func=_cmd_embed)

    p = subparsers.add_parser(
        "verify",
        help="compare the largest faces of two photos",
        description="Prints one JSON object: similarity (cosine), same, threshold, norms, "
        "keypoints. The threshold depends on the checkpoint: calibrate it.",
    )
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"cosine similarity at or above which the faces count as the same (default {DEFAULT_THRESHOLD})",
    )
    p.add_argument(
        "--visualize", metavar="PNG", help="write a side-by-side picture of the crops, keypoints and score"
    )
    _add_pipeline_options(p, all_faces=False)
    add_model_options(p)
    p.set_defaults(func=_cmd_verify)

    p = subparsers.add_parser("search", help="enrol a gallery of identities, then identify query faces",
                              description="'kprpe search enrol GALLERY -o index.npz' then "
                                          "'kprpe search query IMAGES --index index.npz'.")
    search_sub = p.add_subparsers(dest="search_command", metavar="ACTION", required=True)
    e = search_sub.add_parser(
        "enrol",
        aliases=["enroll"],
        help="build an index from GALLERY/<identity>/<images>",
        description="One template per identity: the normalised mean of its images' embeddings. "
        "The index is an .npz that loads with allow_pickle=False.",
    )
    e.add_argument("gallery", metavar="GALLERY")
    add_output_option(e, help="index file to write (.npz)", metavar="INDEX")
    _add_pipeline_options(e, all_faces=False)
    add_model_options(e)
    e.set_defaults(func=_cmd_search_enrol)
    q = search_sub.add_parser("query", help="top-k identities for the faces of query photos")
    q.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS")
    q.add_argument("--index", required=True, metavar="INDEX")
    q.add_argument("-k", "--top-k", type=int, default=5, help="identities to return per face (default 5)")
    _add_pipeline_options(q)
    add_model_options(q)
    q.set_defaults(func=_cmd_search_query)
