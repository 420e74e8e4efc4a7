"""``kprpe align | embed | verify``: the face pipeline on the command line. Its options and helpers
(``_pipeline``, ``_embedder``, ...) also serve ``kprpe search`` (:mod:`kprpe.cli.search`) and ``kprpe serve``.

Every command prints its result by the one output convention (docs/cli.md): a short summary on a terminal,
one line of compact JSON with ``--json`` or when stdout is piped; progress and per-file problems go to stderr.
Exit status:
0 all inputs processed; 1 finished, but some inputs failed (they are listed in the output); 2 nothing could
be done (bad arguments, missing weights, no face in a verify photo, ...).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CommandError
from ..face.align import ALIGN_MODES, AlignmentError
from ..face.backends import ALIGNER_CHOICES, make_detector
from ..face.detector import NoFaceFound
from ..face.landmark_files import LANDMARK_COLUMNS
from ..files import write_csv, write_png
from ..images import ImageLoadError
from ..landmarks import LandmarkFileError
from ..thresholds import DEFAULT_THRESHOLD
from ..zoo.catalog import DEFAULT_ALIGNER_WEIGHTS
from .options import (
    add_deprecated_alias,
    add_device_option,
    add_json_option,
    add_model_options,
    add_output_option,
    add_overwrite_option,
    add_quiet_option,
    add_workers_option,
    apply_model_defaults,
    emit,
    flip_enabled,
)

if TYPE_CHECKING:  # the model side (torch) is imported by the commands that run it, not by `kprpe --help`
    from ..face.detector import FaceDetector
    from ..face.embedder import FaceEmbedder
    from ..face.pipeline import FacePipeline

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


def add_aligner_options(group, *, device: bool) -> None:
    """``--aligner dlib|dfa``, ``--aligner-weights``, ``--min-score`` (one threshold name for either aligner;
    ``--min-aligner-score`` is its deprecated spelling), and ``--device`` for commands without model options,
    whose aligner defaults to dlib; with model options it is left None, for
    :func:`~kprpe.cli.options.apply_model_defaults` to choose from the weights."""
    group.add_argument(
        "--aligner",
        choices=ALIGNER_CHOICES,
        default="dlib" if device else None,
        help="landmark backend: dlib (offline, no download) or dfa (the official CVLface Differentiable Face "
        "Aligner the published KP-RPE weights were trained with; its own crop is used). Default: "
        + (
            "dlib"
            if device
            else "dfa with the published KP-RPE weights (dlib, with a notice, when it cannot be had "
            "offline), dlib with any other weights"
        ),
    )
    group.add_argument(
        "--aligner-weights",
        metavar="W",
        default=DEFAULT_ALIGNER_WEIGHTS,
        help=f"DFA checkpoint file/folder or Hugging Face repo id (default {DEFAULT_ALIGNER_WEIGHTS})",
    )
    group.add_argument(
        "--min-score",
        type=float,
        default=None,
        metavar="S",
        help="drop faces whose score is below S: dlib's detector score (default 0), or the DFA's face score "
        "in [0, 1] (default: keep all; the DFA always returns its best guess, see docs/face.md)",
    )
    add_deprecated_alias(group, "--min-aligner-score", new="--min-score", dest="min_score", type=float)
    if device:
        add_device_option(group)


def _add_pipeline_options(
    parser: argparse.ArgumentParser, *, all_faces: bool = True, device: bool = False
) -> None:
    group = parser.add_argument_group("faces")
    add_aligner_options(group, device=device)
    group.add_argument(
        "--mode",
        choices=ALIGN_MODES,
        default="aligned",
        help="aligned: similarity transform to the ArcFace template (default); unaligned: detector box "
        "resized to 112, keypoints follow; prealigned: inputs already are 112x112 crops",
    )
    group.add_argument(
        "--detector",
        choices=("hog", "cnn"),
        default="hog",
        help="dlib face detector: hog (fast, default) or cnn (more robust, slow on CPU)",
    )
    group.add_argument(
        "--landmark-model",
        choices=("68", "5"),
        default="68",
        help="dlib shape model: 68 points (default) or 5 points (mouth corners estimated)",
    )
    group.add_argument(
        "--upsample",
        type=_upsample,
        default="auto",
        help="dlib upsampling for small faces: auto (0, then 1, then 2 until a face is found) or 0..4",
    )
    group.add_argument(
        "--min-face-size", type=float, default=0.0, help="ignore faces smaller than this many pixels"
    )
    group.add_argument(
        "--landmarks",
        metavar="FILE",
        help="use keypoints from this file (any external detector) instead of dlib: a CSV with columns "
        "file,x0,y0,..,x4,y4 or JSON {file: face}; other landmark formats are refused by content "
        "(docs/cli.md)",
    )
    group.add_argument(
        "--landmarks-normalized",
        action="store_true",
        help="coordinates in --landmarks are fractions of image width/height, not pixels",
    )
    if all_faces:
        group.add_argument("--all-faces", action="store_true", help="keep every face, not only the largest")
    add_quiet_option(parser)


def _detector(args: argparse.Namespace) -> FaceDetector:
    """The backend the face options name (built by :func:`kprpe.face.backends.make_detector`)."""
    from ..landmarks import require_landmark_format

    if args.landmarks:  # another kind of landmark file is refused by its content, naming both formats
        require_landmark_format(args.landmarks, ("photo-list",))
    dfa = args.aligner == "dfa"
    return make_detector(
        args.aligner,
        landmarks=args.landmarks,
        landmarks_normalized=args.landmarks_normalized,
        detector=args.detector,
        landmark_model=args.landmark_model,
        upsample=args.upsample,
        min_score=0.0 if dfa or args.min_score is None else args.min_score,  # one --min-score, either aligner
        aligner_weights=args.aligner_weights,
        min_aligner_score=args.min_score if dfa else None,
        device=getattr(args, "device", "cpu"),
        batch_size=max(1, min(getattr(args, "batch_size", 16), 64)),
    )


def _pipeline(args: argparse.Namespace) -> FacePipeline:
    from ..face.pipeline import FacePipeline

    return FacePipeline(
        _detector(args),
        mode=args.mode,
        all_faces=getattr(args, "all_faces", False),
        min_face_size=args.min_face_size,
        batch_size=max(1, min(getattr(args, "batch_size", 16), 64)),
    )


def _embedder(args: argparse.Namespace) -> FaceEmbedder:
    from ..face.embedder import FaceEmbedder
    from ..nn import CheckpointError

    if args.batch_size <= 0:
        raise CommandError(f"--batch-size must be positive, got {args.batch_size}")
    apply_model_defaults(args)  # no --weights: the published default; a repo id -> its verified snapshot
    weights = args.weights_path
    if getattr(args, "engine", "torch") == "onnx":
        from ..export import load_engine

        engine = load_engine(weights, device=args.device)  # OnnxModelError: a one-line KprpeError
        return FaceEmbedder(engine, flip=flip_enabled(args), batch_size=args.batch_size, device="cpu")
    try:
        return FaceEmbedder.from_weights(
            weights, flip=flip_enabled(args), batch_size=args.batch_size, device=args.device
        )
    except (CheckpointError, ValueError, OSError) as exc:
        raise CommandError(f"cannot load weights {weights}: {exc}") from None
    except (RuntimeError, AssertionError) as exc:  # torch: unknown device, CUDA not available
        raise CommandError(f"cannot use device {args.device!r} for weights {weights}: {exc}") from None


def _report_failures(command: str, failed: list[tuple[str, str]]) -> list[dict]:
    for path, reason in failed:
        print(f"kprpe {command}: skipped {path}: {reason}", file=sys.stderr)
    return [{"file": path, "reason": reason} for path, reason in failed]


def _require_finite(values, what: str, weights) -> None:
    """NaN or infinite embeddings come from broken weights (e.g. a diverged training run): refuse them."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        bad = int(
            (~np.isfinite(values.reshape(len(values), -1) if values.ndim else values.reshape(1, 1)))
            .any(-1)
            .sum()
        )
        raise CommandError(
            f"the model produced non-finite {what} ({bad} affected) with weights {weights}; "
            "the checkpoint is broken (did its training diverge?) — nothing was written"
        )


def _score(value) -> float | None:
    """A face's detector/aligner score for JSON (None when the backend gives none)."""
    return None if value is None else round(float(value), 6)


def _failed_line(failures: list) -> str:
    """The summary's last line when some inputs failed (each was named on stderr as it failed)."""
    return f"\n{len(failures)} inputs failed (listed above and in --json)" if failures else ""


def _unique_stem(stem: str, used: set[str]) -> str:
    candidate, counter = stem, 2
    while candidate in used:
        candidate = f"{stem}-{counter}"
        counter += 1
    used.add(candidate)
    return candidate


# ----------------------------------------------------------------------------------------------- commands


ALIGN_MARKER = ".kprpe-align"


def _align_inputs(inputs: list[str], out: Path) -> tuple[list[Path], dict[str, str]]:
    """The photos ``align`` reads — folders searched with their sub-folders (``photos/<person>/*.jpg`` in one
    run) — and each photo's crop name: its path under the folder given, without suffix, so the output keeps
    the folder structure (``crops/<person>/<photo>.png``). An output folder inside an input is skipped."""
    from ..images import expand_image_paths

    skip = out.resolve()
    paths: list[Path] = []
    names: dict[str, str] = {}
    for given in inputs:
        root = Path(given)
        for path in expand_image_paths([root], recursive=True):
            relative = path.relative_to(root) if root.is_dir() else Path(path.name)
            if skip == path.resolve() or skip in path.resolve().parents or any(
                part.startswith(".") for part in relative.parts[:-1]
            ):
                continue  # an earlier run's crops, or a hidden folder (a staging folder among them)
            paths.append(path)
            names[str(path)] = relative.with_suffix("").as_posix()
    return paths, names


def _cmd_align(args: argparse.Namespace) -> int:
    from ..face.draw import draw_keypoints
    from ..files import OutputFolderError, check_output_folder, staged_folder

    out = Path(args.output)
    try:  # a folder holding inputs or files align did not write is refused before any work is done
        check_output_folder(out, ALIGN_MARKER, inputs=args.inputs)
    except OutputFolderError as exc:
        raise CommandError(str(exc)) from None
    if args.show:
        _check_show(args, out)
    try:
        paths, crop_names = _align_inputs(args.inputs, out)
    except ImageLoadError as exc:  # a folder with no images, in it or below it
        raise CommandError(str(exc)) from None
    pipeline = _pipeline(args)
    failed: list[tuple[str, str]] = []  # each chunk's crops are written, then dropped (bounded memory)
    sources: set[str] = set()
    # crops, landmarks.csv and failures.csv are committed together: they replace an earlier run's set whole
    with staged_folder(out, ALIGN_MARKER, inputs=args.inputs) as folder:
        used: set[str] = set()
        rows, scores = [], []
        shown = None  # (source, face) of the first face, for --show
        for part in pipeline.iter_batches(paths, progress=not args.quiet):
            failed.extend(part.failures)
            for record in part.records:
                sources.add(record.source)
                if args.show and shown is None:  # kept only when asked: crops are otherwise let go per chunk
                    shown = (record.source, record.face)
                stem = crop_names[record.source] + (f"_{record.face_index}" if pipeline.all_faces else "")
                stem = _unique_stem(stem, used)
                write_png(folder / f"{stem}.png", record.face.image)
                if args.draw:
                    write_png(folder / "draw" / f"{stem}.png", draw_keypoints(record.face))
                rows.append([f"{stem}.png", *(f"{v:.6f}" for v in record.face.keypoints.reshape(-1))])
                scores.append({"file": f"{stem}.png", "score": _score(record.face.score)})
        if args.show and shown is not None:
            _write_show(args, *shown, pipeline.detector.name)
        write_csv(folder / "landmarks.csv", ["file", *LANDMARK_COLUMNS], rows)
        failures = _report_failures("align", failed)
        if failures:
            write_csv(folder / "failures.csv", ["file", "reason"], failed)
    payload = {
        "output": str(out),
        "landmarks": str(out / "landmarks.csv"),
        "faces": len(rows),
        "images": len(sources) + len(failures),
        "aligner": pipeline.detector.name,
        "scores": scores,
        "failures": failures,
        **({"show": args.show} if args.show and shown is not None else {}),
    }
    summary = (
        f"aligned {payload['faces']} faces from {payload['images']} images into {out} "
        f"(aligner {payload['aligner']}); keypoints in {payload['landmarks']}"
        + (f"; picture {args.show}" if "show" in payload else "")
    )
    emit(args, payload, summary + _failed_line(failures))
    return 1 if failures else 0


def _check_show(args: argparse.Namespace, out: Path) -> None:
    """``align --show PNG``: one photo, a new file outside the output folder (which align replaces whole)."""
    from ..files import check_output_path

    if len(args.inputs) != 1 or Path(args.inputs[0]).is_dir():
        raise CommandError("--show draws one photo: give exactly one image file")
    show = Path(args.show).resolve()
    if show == out.resolve() or out.resolve() in show.parents:
        raise CommandError(f"--show {args.show} is inside the output folder {out}; write it elsewhere")
    check_output_path(args.show, inputs=args.inputs)


def _write_show(args: argparse.Namespace, source: str, face, aligner: str) -> None:
    from ..face.draw import alignment_picture
    from ..files import write_png
    from ..images import load_image

    _check_show(args, Path(args.output))  # again: time has passed since the first check
    try:
        photo = load_image(source)
    except ImageLoadError as exc:
        raise CommandError(str(exc)) from None
    score = "" if face.score is None else f", face score {face.score:.3f}"
    caption = f"{Path(source).name}: aligner {aligner}{score}; the 112x112 crop the model reads"
    write_png(args.show, alignment_picture(photo, face, caption))


def _workers(args: argparse.Namespace) -> int | None:
    if args.workers is not None and args.workers < 0:
        raise CommandError(f"--workers must be >= 0, got {args.workers}")
    return args.workers  # None: kprpe.streaming.stream.resolve_workers picks from the number of inputs


def _on_device(factory, args: argparse.Namespace, device: str):
    """``factory(args)`` with ``--device`` replaced (what an actor, or the command beside Ray, builds on)."""
    return factory(argparse.Namespace(**{**vars(args), "device": device}))


def _ray_runner(args: argparse.Namespace):
    """``--ray [ADDRESS]``: the tasks run in Ray actors (kprpe.streaming.ray_data); None without it."""
    if args.ray is None:
        for option, value in (("--ray-workers", args.ray_workers), ("--ray-gpus", args.ray_gpus)):
            if value is not None:
                raise CommandError(f"{option} needs --ray")
        return None
    if args.workers is not None:
        raise CommandError("--workers counts this machine's processes; with --ray, give --ray-workers")
    gpus = 0.0 if args.ray_gpus is None else args.ray_gpus
    # Ray hands each actor its GPUs as "cuda" (CUDA_VISIBLE_DEVICES); actors without them must not touch
    # the node's GPUs behind Ray's back (Ray 2.60 no longer hides them from such actors)
    if gpus > 0 and args.device not in ("cpu", "cuda"):
        raise CommandError(
            f"--device {args.device} with --ray-gpus: each actor uses the GPU Ray gives it (as cuda); "
            "leave --device out"
        )
    if gpus <= 0 and args.device != "cpu":
        raise CommandError(
            f"--device {args.device} with --ray: the actors get no GPU from Ray; give --ray-gpus G (GPUs "
            "per actor, e.g. 1 or 0.5) and they run on cuda"
        )
    from ..streaming.ray_data import RayRunner, import_ray

    import_ray()
    device = "cuda" if gpus > 0 else "cpu"
    return RayRunner(
        # each actor builds its own detector and loads the model once, on its device
        pipeline_factory=functools.partial(_on_device, _pipeline, args, device),
        embedder_factory=functools.partial(_on_device, _embedder, args, device),
        address=args.ray or None,
        workers=args.ray_workers,
        batch_size=args.batch_size,
        fps=args.fps,
        num_gpus=gpus,
    )


def _skipped(command: str):
    from tqdm.auto import tqdm

    return lambda path, reason: tqdm.write(f"kprpe {command}: skipped {path}: {reason}", file=sys.stderr)


def _cmd_embed(args: argparse.Namespace) -> int:
    """Streams (streaming/stream.py) into a resumable output (streaming/shards.py)."""
    from ..files import check_not_input
    from ..streaming.shards import embed_to_output

    apply_model_defaults(args)  # before the pipeline: the weights choose the default aligner
    # an existing output this command wrote is continued or (--overwrite) replaced: embed_to_output's rule
    check_not_input(args.output, [*args.inputs, str(args.weights)], inside=False)
    runner = _ray_runner(args)  # before the model loads: a missing Ray or a bad address is said at once
    # with --ray this process embeds nothing (the model gives the output's settings): its CPU will do
    pipeline = _pipeline(args) if runner is None else _on_device(_pipeline, args, "cpu")
    embedder = _embedder(args) if runner is None else _on_device(_embedder, args, "cpu")
    summary = embed_to_output(
        args.inputs,
        args.output,
        pipeline=pipeline,
        embedder=embedder,
        fps=args.fps,
        workers=_workers(args),
        pipeline_factory=functools.partial(_pipeline, args),  # each worker builds its own detector
        overwrite=args.overwrite,
        shard_rows=args.shard_rows,
        progress=not args.quiet,
        info={"weights": str(args.weights)},
        on_failure=_skipped("embed"),
        runner=runner,
    )
    payload = summary.to_dict()
    text = (
        f"embedded {payload['rows']} faces from {payload['files']} files into {payload['output']} "
        f"({payload['format']}, dim {payload['dim']}, {payload['seconds']:g} s"
        + (", resumed" if payload["resumed"] else "")
        + ")"
    )
    emit(args, payload, text + _failed_line(payload["failures"]))
    return 1 if summary.failures else 0


def _check_output(path, args: argparse.Namespace, inputs: list, *, overwrite: bool | None = None) -> None:
    """The one output rule (kprpe.files.check_output_path) with this command's inputs and --weights."""
    from ..files import check_output_path

    weights = [args.weights] if isinstance(getattr(args, "weights", None), str) else []
    landmarks = [args.landmarks] if isinstance(getattr(args, "landmarks", None), str) else []
    overwrite = args.overwrite if overwrite is None else overwrite
    check_output_path(path, inputs=[*inputs, *weights, *landmarks], overwrite=overwrite)


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..face.draw import side_by_side
    from ..face.pipeline import verify

    if args.visualize:  # before the model is loaded: a refusal should not cost a run
        _check_output(args.visualize, args, [args.a, args.b])
    if args.show:
        _check_output(args.show, args, [args.a, args.b])
        if args.visualize and Path(args.show).resolve() == Path(args.visualize).resolve():
            raise CommandError("--show and --visualize name the same file; give two")
    apply_model_defaults(args)  # before the pipeline: the weights choose the default aligner
    pipeline = _pipeline(args)
    embedder = _embedder(args)
    choice = _threshold(args, embedder)
    try:
        result = verify(args.a, args.b, pipeline=pipeline, embedder=embedder, threshold=choice.threshold)
    except (ImageLoadError, NoFaceFound, AlignmentError, LandmarkFileError) as exc:
        raise CommandError(str(exc)) from None
    _require_finite([result.similarity], "similarity", args.weights)
    payload = {
        "a": args.a,
        "b": args.b,
        **result.to_dict(),
        "threshold_source": choice.source,
        "aligner": pipeline.detector.name,
        "flip": embedder.flip,
    }
    if args.visualize:  # checked again: the photos could have changed while the model ran
        _check_output(args.visualize, args, [args.a, args.b])
        picture = side_by_side(*result.faces, result.similarity, result.same, result.threshold)
        payload["visualization"] = str(write_png(args.visualize, picture))
    if args.show:
        from ..face.draw import verification_picture
        from ..images import load_image

        _check_output(args.show, args, [args.a, args.b])
        try:
            photos = (load_image(args.a), load_image(args.b))
        except ImageLoadError as exc:  # changed or removed while the model ran
            raise CommandError(str(exc)) from None
        picture = verification_picture(
            photos, result.faces, result.similarity, result.same, result.threshold, choice.source
        )
        payload["show"] = str(write_png(args.show, picture))
    decision = "same person" if result.same else "different people"
    text = (
        f"{args.a} vs {args.b}: similarity {result.similarity:.4f} -> {decision} (threshold "
        f"{result.threshold:g}, {choice.source}; aligner {payload['aligner']}, "
        f"flip {'on' if embedder.flip else 'off'})"
    )
    pictures = [payload[k] for k in ("visualization", "show") if k in payload]
    emit(args, payload, text + (f"\nwrote {', '.join(pictures)}" if pictures else ""))
    return 0


def _threshold(args: argparse.Namespace, embedder: FaceEmbedder):
    """--threshold, else the calibration beside --weights (kprpe eval ... --calibrate), else the default."""
    from ..thresholds import resolve_threshold

    return resolve_threshold(
        args.threshold,
        args.weights,
        model_fingerprint=embedder.fingerprint,
        flip=embedder.flip,
        default=DEFAULT_THRESHOLD,
    )


def _add_embed_stream_options(parser: argparse.ArgumentParser) -> None:
    from ..streaming.shards import SHARD_ROWS
    from ..streaming.stream import DEFAULT_FPS

    group = parser.add_argument_group("streaming")
    group.add_argument(
        "--fps",
        type=float,
        default=DEFAULT_FPS,
        help=f"video frames sampled per second (default {DEFAULT_FPS:g})",
    )
    add_workers_option(group)
    add_overwrite_option(group, help="replace OUT (an output of kprpe embed) instead of continuing it")
    group.add_argument(
        "--shard-rows",
        type=int,
        default=SHARD_ROWS,
        metavar="N",
        help=f"rows per committed shard: an interrupted run loses at most this many (default {SHARD_ROWS})",
    )


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ray (kprpe[ray]; docs/face.md)")
    group.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the job on Ray Data: actors each load the model once and embed; the same output as "
        "without. No ADDRESS: a Ray started on this machine for the job; ADDRESS (auto, HOST:PORT, "
        "ray://HOST:PORT): an existing cluster, whose machines see the inputs at the same paths",
    )
    group.add_argument(
        "--ray-workers",
        type=int,
        default=None,
        metavar="N",
        help="with --ray: N actors of one CPU each (default: every CPU of the Ray cluster)",
    )
    group.add_argument(
        "--ray-gpus",
        type=float,
        default=None,
        metavar="G",
        help="with --ray: G GPUs for each actor, whose model (and DFA aligner) then runs on cuda; a fraction "
        "shares a GPU (0.5: two actors on one). Refused when the Ray cluster has no GPU (default 0: CPUs)",
    )


def register(subparsers) -> None:
    """Add ``align``, ``embed`` and ``verify`` to the ``kprpe`` command."""
    p = subparsers.add_parser(
        "align",
        help="detect faces and write 112x112 crops + landmarks.csv",
        description="Detect faces, crop them (aligned, unaligned or prealigned) to 112x112 "
        "PNGs in OUT and write OUT/landmarks.csv (keypoints normalised to the crop). Folders are searched "
        "with their sub-folders and OUT keeps their structure: 'kprpe align photos/ -o crops/' writes "
        "crops/<person>/<photo>.png for photos/<person>/<photo>.jpg.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS")
    add_output_option(p, help="output directory")
    p.add_argument(
        "--draw", action="store_true", help="also write OUT/draw/<stem>.png with the keypoints drawn"
    )
    p.add_argument(
        "--show",
        metavar="PNG",
        help="(one photo) write the photo with its face box and 5 keypoints beside the crop, as kprpe "
        "serve's page shows it",
    )
    _add_pipeline_options(p, device=True)
    add_json_option(p)
    p.set_defaults(func=_cmd_align)

    p = subparsers.add_parser(
        "embed",
        help="embed the faces of photos and videos into Parquet or .npz (resumable)",
        description="Embed faces with a KP-RPE checkpoint, streaming: workers detect and align while the "
        "model embeds in batches. OUT.parquet: a Parquet data set (folder of shards); OUT.npz: one .npz "
        "(allow_pickle=False); other OUT: a folder of shards. Rows: file, name, frame, time, face_index, "
        "box, landmarks, keypoints, score, embedding (unit), norm; failures are listed. Re-running into "
        "the same OUT with the same model and options continues it (inputs already done are skipped).",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGES_VIDEOS_OR_DIRS")
    add_output_option(p, help="output: OUT.parquet, OUT.npz or a folder", metavar="OUT")
    _add_pipeline_options(p)
    add_model_options(p)
    _add_embed_stream_options(p)
    _add_ray_options(p)
    add_json_option(p)
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
        default=None,
        help="cosine similarity at or above which the faces count as the same (default: the calibration "
        f"beside --weights from 'kprpe eval ... --calibrate FAR', else {DEFAULT_THRESHOLD})",
    )
    p.add_argument(
        "--visualize", metavar="PNG", help="write a side-by-side picture of the crops, keypoints and score"
    )
    p.add_argument(
        "--show",
        metavar="PNG",
        help="write what kprpe serve's page shows: each photo with its face box and 5 keypoints, the 112x112 "
        "crops the model saw, the similarity, the decision and the threshold's source",
    )
    add_overwrite_option(p, help="replace an existing --visualize / --show file")
    _add_pipeline_options(p, all_faces=False)
    add_model_options(p)
    add_json_option(p)
    p.set_defaults(func=_cmd_verify)
