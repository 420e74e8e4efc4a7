"""``kprpe align | embed | verify | search``: the face pipeline on the command line.

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
from ..gallery.search import GalleryIndexError
from ..images import ImageLoadError
from ..landmarks import LandmarkFileError
from ..thresholds import DEFAULT_THRESHOLD
from ..zoo.catalog import DEFAULT_ALIGNER_WEIGHTS
from .options import (
    add_deprecated_alias,
    add_device_option,
    add_gallery_option,
    add_json_option,
    add_model_options,
    add_output_option,
    add_overwrite_option,
    add_quiet_option,
    add_workers_option,
    apply_model_defaults,
    emit,
    flip_enabled,
    require_gallery,
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


def _gallery_location(args: argparse.Namespace) -> str:
    """The gallery a search command works on: ``--gallery``, a file path or a database URI (the old
    ``-o``/``--index`` spellings store into it, with a warning)."""
    return require_gallery(args)


def _gallery_metadata(args: argparse.Namespace, pipeline, embedder) -> dict:
    return {
        "model_fingerprint": embedder.fingerprint,
        "output_dim": embedder.output_dim,
        "flip": embedder.flip,
        "pipeline": pipeline.describe(),
        "weights": str(args.weights),
    }


def _cmd_search_enrol(args: argparse.Namespace) -> int:
    from ..gallery.database import DatabaseGallery, is_database_uri
    from ..gallery.index import DEFAULT_NPROBE, GalleryIndex, enrol_gallery_report

    location = _gallery_location(args)
    database = is_database_uri(location)
    if database and args.thumbnails:
        raise CommandError(
            "--thumbnails live beside a gallery file (INDEX.thumbnails); a database gallery keeps none"
        )
    appending = args.append and not database and Path(location).exists()
    apply_model_defaults(args)  # before the pipeline: the weights choose the default aligner
    pipeline = _pipeline(args)
    if not database:  # --append updates the index named by --gallery; anything else there needs --overwrite
        _check_output(location, args, [args.folder], overwrite=args.overwrite or args.append)
    embedder = _embedder(args)
    if database:  # opened before the photos are embedded: a wrong model or URI costs nothing
        target = DatabaseGallery.open(
            location, dim=embedder.output_dim, metadata=_gallery_metadata(args, pipeline, embedder)
        )
        if args.overwrite:
            target.clear()
            target.close()  # an embedded engine allows one open handle per gallery, even in one process
            target = DatabaseGallery.open(
                location, dim=embedder.output_dim, metadata=_gallery_metadata(args, pipeline, embedder)
            )
        # staged in memory, then written identity by identity (see DatabaseGallery.write)
        index = GalleryIndex(embedder.output_dim, backend="numpy", approximate_above=0)
    elif appending:
        index = GalleryIndex.load(location, backend=args.backend)
        index.check_compatible(embedder.fingerprint, embedder.output_dim)
    else:
        index = GalleryIndex(
            embedder.output_dim,
            metadata=_gallery_metadata(args, pipeline, embedder),
            backend=args.backend,
            approximate_above=args.approximate_above,
            nlist=args.nlist,
            nprobe=args.nprobe or DEFAULT_NPROBE,
        )
    # the images each identity has pooled (by content) are skipped before they are embedded; without
    # --append a database gallery's identities are set to this run's images, so nothing stored counts
    records = target.image_records if database and args.append else None
    try:
        report = enrol_gallery_report(
            index,
            args.folder,
            pipeline=pipeline,
            embedder=embedder,
            progress=not args.quiet,
            workers=_workers(args),
            pipeline_factory=functools.partial(_pipeline, args),
            records=records,
        )
    except GalleryIndexError as exc:
        raise CommandError(str(exc)) from None
    failures = report.failures
    for path, reason in failures:
        print(f"kprpe search enrol: skipped {path}: {reason}", file=sys.stderr)
    if args.append:
        _unrecorded_notice(location, report.unrecorded, target if database else index)
    if not report.pooled and not report.already_pooled:
        raise CommandError(f"no identity in {args.folder} had a usable face; nothing enrolled")
    enrolled, thumbnails = len(report.pooled), {}
    if database:
        if report.pooled:
            target.write(index, pool=args.append)
        index = target
    else:
        if report.pooled or not appending:
            index.save(location)
        thumbnails = _enrol_thumbnails(args, location, pipeline, index, fresh=not appending)
    payload = {
        "gallery": str(location),
        "identities": len(index),
        "enrolled": enrolled,
        "images": sum(report.pooled.values()),
        "already_pooled": report.already_pooled,
        "index": index.describe(),
        **thumbnails,
        "failures": [{"file": p, "reason": r} for p, r in failures],
    }
    text = f"gallery {location}: {len(index)} identities ({enrolled} from {args.folder}"
    if report.already_pooled:
        text += f"; {report.already_pooled} images already pooled, skipped"
    emit(args, payload, text + ")" + _failed_line(failures))
    return 1 if failures else 0


def _unrecorded_notice(location: str, unrecorded: dict[str, int], gallery) -> None:
    """Say once when an image of FOLDER may be pooled twice because the gallery cannot tell: its identities
    hold images pooled without a record (an older gallery, or faces enrolled through kprpe serve), or the
    gallery keeps no record at all (a Milvus gallery created before there was one)."""
    if not getattr(gallery, "records_images", True):
        print(
            f"kprpe search enrol: notice: {location} was created before galleries recorded their images "
            "(Milvus cannot add the field to it), so images are pooled without a record and re-running an "
            "--append pools them again; re-enrol it with --overwrite to keep a record",
            file=sys.stderr,
        )
    elif unrecorded:
        example = next(iter(unrecorded))
        print(
            f"kprpe search enrol: notice: {len(unrecorded)} identities of {location} (e.g. {example!r}) hold "
            f"{sum(unrecorded.values())} images pooled without a record of which they were (enrolled before "
            "galleries recorded them, or through kprpe serve); those are unknown, so a copy of one is pooled "
            "again",
            file=sys.stderr,
        )


def _enrol_thumbnails(args: argparse.Namespace, location: str, pipeline, index, *, fresh: bool) -> dict:
    """The page's thumbnails beside the index (``INDEX.thumbnails``): a replaced index takes its old ones
    with it; ``--thumbnails`` keeps the first usable face of each identity that has none (one more
    detection per identity: the enrolment itself keeps no crops)."""
    from ..gallery.search import gallery_images
    from ..gallery.thumbnails import ThumbnailStore, thumbnails_beside

    store = ThumbnailStore(thumbnails_beside(location))
    if fresh:
        store.clear()
    if not args.thumbnails:
        return {}
    written = 0
    for name, paths in gallery_images(args.folder).items():
        if name not in index or store.numbers(name):
            continue
        for path in paths:
            try:
                faces = pipeline.faces_in_file(path)
            except (ImageLoadError, *pipeline.skip_errors):
                continue
            store.add(name, faces[0].image)
            written += 1
            break
    return {"thumbnails": str(store.folder), "thumbnails_written": written}


def _cmd_search_remove(args: argparse.Namespace) -> int:
    from ..gallery.database import is_database_uri, open_gallery
    from ..gallery.thumbnails import ThumbnailStore, thumbnails_beside

    location = _gallery_location(args)
    index = open_gallery(location, backend=args.backend)
    removed = index.remove(args.identities)
    index.save(location)  # a database gallery has written it already
    thumbnails = None if is_database_uri(location) else thumbnails_beside(location)
    if thumbnails is not None and thumbnails.is_dir():  # the page's thumbnails of the removed go too
        for name in removed:
            ThumbnailStore(thumbnails).remove(name)
    payload = {"gallery": str(location), "removed": removed, "identities": len(index)}
    text = f"gallery {location}: removed {', '.join(removed) or 'nothing'}; {len(index)} identities left"
    emit(args, payload, text)
    return 0


def _cmd_search_query(args: argparse.Namespace) -> int:
    from ..gallery.database import open_gallery

    if args.top_k <= 0:
        raise CommandError(f"-k must be positive, got {args.top_k}")
    location = _gallery_location(args)
    index = open_gallery(location, backend=args.backend, nprobe=args.nprobe)
    apply_model_defaults(args)  # before the pipeline: the weights choose the default aligner
    pipeline = _pipeline(args)
    embedder = _embedder(args)
    index.check_compatible(embedder.fingerprint, embedder.output_dim)
    choice = _threshold(args, embedder)
    failed: list[tuple[str, str]] = []
    results: list[dict] = []  # crops are embedded and dropped an embedder batch at a time
    pending: list = []

    def search_pending() -> None:
        unit, _ = embedder.embed_faces([r.face for r in pending])
        for record, row in zip(pending, index.search(unit, k=args.top_k), strict=True):
            matches = [
                {"identity": h.identity, "score": h.score, "same": h.score >= choice.threshold} for h in row
            ]
            results.append(
                {
                    "name": record.name,
                    "file": record.source,
                    "face_index": record.face_index,
                    "face_score": _score(record.face.score),
                    "matches": matches,
                }
            )
        pending.clear()

    for part in pipeline.iter_batches(args.inputs, progress=not args.quiet):
        failed.extend(part.failures)
        pending.extend(part.records)
        if len(pending) >= embedder.batch_size:
            search_pending()
    if pending:
        search_pending()
    failures = _report_failures("search query", failed)
    payload = {
        "gallery": str(location),
        "threshold": choice.threshold,
        "threshold_source": choice.source,
        "results": results,
        "failures": failures,
    }
    lines = [f"gallery {location}, threshold {choice.threshold:g} ({choice.source}):"]
    for r in results:
        best = r["matches"][0] if r["matches"] else None
        found = (
            f"{best['identity']} {best['score']:.4f} ({'same' if best['same'] else 'below threshold'})"
            if best
            else "no identity"
        )
        lines.append(f"  {r['file']} face {r['face_index']}: {found}")
    emit(args, payload, "\n".join(lines) + _failed_line(failures))
    return 1 if failures else 0


# --gallery: where the gallery lives, a file or a database (docs/cli.md: one name in every command)
GALLERY_HELP = (
    "where the gallery lives: a file path (the FAISS/NumPy .npz index of 'kprpe search enrol') or a vector "
    "database: milvus:///PATH.db (Milvus Lite, embedded), http://HOST:19530 (a Milvus server), "
    "qdrant:///FOLDER, qdrant+http://HOST:6333 (see docs/serving.md)"
)


def _add_index_options(parser: argparse.ArgumentParser, *, build: bool) -> None:
    from ..gallery.index import DEFAULT_APPROXIMATE_ABOVE, INDEX_BACKENDS

    group = parser.add_argument_group("index")
    group.add_argument(
        "--backend",
        choices=INDEX_BACKENDS,
        default="auto",
        help="faiss, numpy (exact, no dependency) or auto (faiss when installed; default)",
    )
    group.add_argument(
        "--nprobe",
        type=int,
        default=None,
        help="IVF lists searched per query once the index is approximate (recall vs speed)",
    )
    if build:
        group.add_argument(
            "--approximate-above",
            type=int,
            default=DEFAULT_APPROXIMATE_ABOVE,
            metavar="N",
            help=f"switch to an IVF index at N identities (default {DEFAULT_APPROXIMATE_ABOVE}; "
            "0 = always exact)",
        )
        group.add_argument("--nlist", type=int, default=None, help="IVF lists (default sqrt(identities))")


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
    """Add ``align``, ``embed``, ``verify`` and ``search`` to the ``kprpe`` command."""
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

    p = subparsers.add_parser(
        "search",
        help="enrol a gallery of identities, then identify query faces",
        description="'kprpe search enrol FOLDER --gallery index.npz' then "
        "'kprpe search query IMAGES --gallery index.npz'; 'kprpe search remove "
        "NAMES --gallery index.npz'. FAISS when installed, NumPy otherwise; a --gallery URI keeps the "
        "gallery in a vector database (milvus:///gallery.db, http://HOST:19530).",
    )
    search_sub = p.add_subparsers(dest="search_command", metavar="ACTION", required=True)
    e = search_sub.add_parser(
        "enrol",
        aliases=["enroll"],
        help="build an index from GALLERY/<identity>/<images>",
        description="One template per identity: the normalised mean of its images' embeddings. "
        "The index is an .npz that loads with allow_pickle=False.",
    )
    e.add_argument("folder", metavar="FOLDER", help="FOLDER/<identity>/<images>")
    add_gallery_option(e, help=f"{GALLERY_HELP}; required", old=("-o", "--output"))
    e.add_argument(
        "--append",
        action="store_true",
        help="add to GALLERY if it exists (new identities are added, existing ones pool the new images; an "
        "image an identity has already pooled, by content, is skipped); without it a database gallery's "
        "identities in FOLDER are set to this run's templates",
    )
    add_overwrite_option(
        e, help="replace an existing GALLERY file (without --append); a database gallery: drop it first"
    )
    e.add_argument(
        "--thumbnails",
        action="store_true",
        help="also keep a 56x56 thumbnail of each identity's first usable face in GALLERY.thumbnails, as "
        "kprpe serve's page shows (one more face detection per identity)",
    )
    _add_pipeline_options(e, all_faces=False)
    add_model_options(e)
    add_workers_option(e)
    _add_index_options(e, build=True)
    add_json_option(e)
    e.set_defaults(func=_cmd_search_enrol)
    r = search_sub.add_parser("remove", help="remove identities from an index (no re-enrolment)")
    r.add_argument("identities", nargs="+", metavar="IDENTITY")
    add_gallery_option(r, help=f"{GALLERY_HELP}; required")
    r.add_argument("--backend", choices=("auto", "faiss", "numpy"), default="auto")
    add_json_option(r)
    r.set_defaults(func=_cmd_search_remove)
    q = search_sub.add_parser("query", help="top-k identities for the faces of query photos")
    q.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS")
    add_gallery_option(q, help=f"{GALLERY_HELP}; required")
    q.add_argument("-k", "--top-k", type=int, default=5, help="identities to return per face (default 5)")
    q.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="score at or above which a match counts as the same person (default: the calibration beside "
        f"--weights, else {DEFAULT_THRESHOLD})",
    )
    _add_pipeline_options(q)
    add_model_options(q)
    _add_index_options(q, build=False)
    add_json_option(q)
    q.set_defaults(func=_cmd_search_query)
