"""``kprpe eval``: verification (.bin), IJB-B/C 1:1, custom pairs, identification and the
alignment-robustness sweep. Each run writes ``results.json``, ``summary.md`` and PNG plots into
``-o/--output``, and prints by the one output convention (docs/cli.md): the Markdown summary on a terminal,
one line of compact JSON (the results without curves, and the files written) with ``--json`` or on a pipe."""

from __future__ import annotations

import argparse
import pickle
import sys
import warnings
from pathlib import Path

from ..errors import CommandError
from ..eval.metrics import DEFAULT_FAR_TARGETS, TAR_FAR_CONVENTIONS
from .options import (
    add_deprecated_alias,
    add_json_option,
    add_model_options,
    add_output_option,
    add_quiet_option,
    apply_model_defaults,
    emit,
    json_safe,
)

__all__ = ["register"]

_EPILOG = """protocols:
  verify    insightface .bin sets (lfw, cfp_fp, agedb_30, calfw, cplfw, ...): 10-fold accuracy (thresholds
            chosen on 9 folds, accuracy on the 10th, mean ± std), VAL@FAR=1e-3, TAR@FAR, ROC. Images are
            pre-aligned; keypoints from --landmarks (CSV idx,ldmk_0..ldmk_9 normalised), the kprpe.face
            landmark backend, or the ArcFace template. .bin files are read with a restricted unpickler.
  ijb       IJB-B / IJB-C 1:1 from the insightface meta files: template features, TAR at FAR 1e-6..1e-1, ROC.
  pairs     custom pairs CSV (image_a,image_b,label); pre-aligned images, or photos + a 5-point landmark file.
  identify  identity folders: closed-set rank-1/5/20 (CMC) with distractors, open-set DIR@FPIR
            (TinyFace / IJB-S style).
  toolkit   the official CVLface evaluation toolkit (Hugging Face `save_to_disk` folders, e.g. facerec_val/):
            each set by its kind -- verification, IJB-B/C 1:1, TinyFace. Needs kprpe[eval-toolkit].
  tinyface  TinyFace rank-1/5/20 exactly as the official protocol (toolkit folder or Probe/Gallery_* folders).
  keypoint-noise
            how much a model depends on its landmarks: .bin faces with Gaussian keypoint noise (sigma px in
            the 112 crop) or one landmark displaced; embedding cosine to the clean-keypoint embedding and
            accuracy.
  sweep     the paper's Figure 5: accuracy as the crop moves from aligned (t=0) to the detector-box crop
            (t=1), for one or several checkpoints, as a PNG plot and a JSON table.

Embeddings are cached (--cache-dir, default $KPRPE_CACHE_DIR or ~/.cache/kprpe/embeddings), so another
protocol or a re-run on the same faces with the same weights does not recompute them. See docs/eval.md."""


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


_LANDMARKS_ONLY = "--landmarks alone: this protocol's keypoints come from it"
# which landmark file (kprpe.landmarks.LANDMARK_FORMATS) each protocol's --landmarks reads
_INDEX_CSV = ("index-csv",)  # sets of aligned crops, by image index: verify, toolkit, keypoint-noise
_PIXEL_LIST = ("pixel-list",)  # photos by name, in pixels: ijb, pairs, sweep


def _check_landmarks(args, accepted: tuple[str, ...]) -> None:
    """A landmark file of another format is refused by its content, naming both formats (docs/cli.md)."""
    from ..landmarks import require_landmark_format

    given = args.landmarks if isinstance(args.landmarks, list) else [args.landmarks]
    for path in given:
        if path is not None:
            require_landmark_format(path, accepted)


def _common(p: argparse.ArgumentParser, *, keypoint_backend: bool = True) -> None:
    """Options every protocol shares; ``keypoint_backend``: the protocol has ``--keypoints backend`` (the
    ones whose keypoints always come from --landmarks accept --aligner for one version, with a warning)."""
    add_output_option(p, type=Path, help="output folder (results.json, summary.md, plots)")
    g = p.add_argument_group("run")
    g.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="embedding cache folder (default: $KPRPE_CACHE_DIR or ~/.cache/kprpe/embeddings)",
    )
    g.add_argument("--no-cache", action="store_true", help="neither read nor write cached embeddings")
    if keypoint_backend:
        g.add_argument(
            "--aligner",
            choices=("dlib", "dfa"),
            default="dlib",
            help="landmark backend of --keypoints backend: dlib (default) or dfa (the official DFA aligner, "
            "which the published KP-RPE weights were evaluated with; runs on --device, batched)",
        )
        g.add_argument(
            "--aligner-weights",
            metavar="W",
            default="minchul/cvlface_DFA_mobilenet",
            help="DFA checkpoint file/folder or Hugging Face repo id (default minchul/cvlface_DFA_mobilenet)",
        )
    else:  # keypoints come from --landmarks: these never did anything here (and still do nothing)
        g.set_defaults(aligner="dlib", aligner_weights=None)
        add_deprecated_alias(g, "--aligner", new=_LANDMARKS_ONLY, dest="ignored_aligner")
        add_deprecated_alias(g, "--aligner-weights", new=_LANDMARKS_ONLY, dest="ignored_aligner_weights")
    add_quiet_option(g)
    add_json_option(g)
    g.add_argument(
        "--far",
        type=_float_list,
        default=list(DEFAULT_FAR_TARGETS),
        help="FAR targets for TAR@FAR, comma-separated (default: 1e-6,...,1e-1)",
    )
    g.add_argument(
        "--tar-far-convention",
        choices=TAR_FAR_CONVENTIONS,
        default="insightface",
        help="how TAR@FAR picks the ROC point: insightface (default; the papers' numbers: sklearn "
        "roc_curve with dropped intermediate points, nearest FAR), full_curve (every threshold, "
        "nearest FAR), at_most (best TAR with FAR <= target). See docs/eval.md",
    )


def _add_norm_pooling_option(p: argparse.ArgumentParser, *, old: str, old_value: bool) -> None:
    """``--norm-pooling`` / ``--no-norm-pooling``: IJB template pooling, one flag and one default for ``eval
    ijb`` and ``eval toolkit`` (``old``: the command's former spelling, which stores ``old_value``)."""
    p.add_argument(
        "--norm-pooling",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="IJB: keep each face feature's norm when pooling (insightface's IJB script); default off: unit "
        "features x detector score, the official toolkit's headline Norm:False_Det:True",
    )
    add_deprecated_alias(
        p, old, new=f"--{'' if old_value else 'no-'}norm-pooling", dest="norm_pooling", const=old_value
    )


def _calibrate_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calibrate",
        type=float,
        default=None,
        metavar="FAR",
        help="also write the threshold for this false-accept rate beside the weights "
        "(<weights>.threshold.json; used by kprpe verify/search/serve). Needs one set",
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint: verification, IJB, identification, robustness sweep",
        description=__doc__,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="protocol", metavar="PROTOCOL")
    parser.set_defaults(func=lambda args: _missing_protocol(parser))

    p = sub.add_parser(
        "verify",
        help="insightface .bin verification sets, 10-fold protocol",
        description="10-fold accuracy (mean ± std), VAL@FAR=1e-3, TAR@FAR and ROC on .bin sets.",
    )
    add_model_options(p)
    p.add_argument(
        "sets",
        nargs="*",
        type=Path,
        default=[],
        help="sets to evaluate: .bin files or CVLface toolkit folders (save_to_disk; kprpe[eval-toolkit])",
    )
    p.add_argument(
        "--bin",
        dest="bins",
        action="append",
        default=[],
        type=Path,
        help="a .bin set (repeat for several: --bin lfw.bin --bin cfp_fp.bin)",
    )
    p.add_argument(
        "--landmarks",
        action="append",
        type=Path,
        default=None,
        help="per-set landmark CSV (idx,ldmk_0..ldmk_9, normalised; idx = image index); repeat in "
        "the order of the sets (--bin ones first)",
    )
    p.add_argument(
        "--keypoints",
        choices=("auto", "file", "backend", "template"),
        default="auto",
        help="keypoint source: file (--landmarks), backend (kprpe.face prealigned landmarks), template "
        "(ArcFace template; right only for images aligned to it); auto picks in that order",
    )
    _common(p)
    _calibrate_option(p)
    p.set_defaults(func=_run_verify)

    p = sub.add_parser(
        "ijb",
        help="IJB-B / IJB-C 1:1 verification (TAR@FAR)",
        description="Template-based 1:1 verification from the insightface IJB meta files.",
    )
    add_model_options(p)
    p.add_argument("--name", default="IJBC", help="set name in the report (default IJBC)")
    p.add_argument(
        "--tid-mid", required=True, type=Path, help="*_face_tid_mid.txt: image_name template_id media_id"
    )
    p.add_argument("--pairs", required=True, type=Path, help="*_template_pair_label.txt: t1 t2 label")
    p.add_argument(
        "--landmarks", required=True, type=Path, help="*_name_5pts_score.txt: image_name x0 y0 .. x4 y4 score"
    )
    p.add_argument("--images", required=True, type=Path, help="folder of loose crops")
    p.add_argument(
        "--t", type=float, default=0.0, help="0 aligned (default), 1 detector-box crop (unaligned)"
    )
    _add_norm_pooling_option(p, old="--no-norm", old_value=False)
    p.add_argument("--no-detector-score", action="store_true", help="do not weight faces by detector score")
    _common(p, keypoint_backend=False)
    _calibrate_option(p)
    p.set_defaults(func=_run_ijb)

    p = sub.add_parser(
        "pairs",
        help="custom pairs CSV (image_a,image_b,label)",
        description="Verification on a pairs CSV; images pre-aligned or cropped from landmarks.",
    )
    add_model_options(p)
    p.add_argument("--pairs", required=True, type=Path, help="CSV rows image_a,image_b,label (1/0)")
    p.add_argument("--root", type=Path, default=None, help="image folder (default: the CSV's folder)")
    p.add_argument(
        "--landmarks",
        type=Path,
        default=None,
        help="pixel landmarks 'image x0 y0 .. x4 y4 [score]'; without it images must be pre-aligned",
    )
    p.add_argument(
        "--keypoints",
        choices=("auto", "backend", "template"),
        default="auto",
        help="keypoints for pre-aligned images (no --landmarks)",
    )
    p.add_argument("--t", type=float, default=0.0, help="with --landmarks: 0 aligned, 1 detector-box crop")
    _common(p)
    _calibrate_option(p)
    p.set_defaults(func=_run_pairs)

    p = sub.add_parser(
        "identify",
        help="identification on identity folders: rank-1/5/20, open-set DIR@FPIR",
        description="Closed-set CMC with distractors in the gallery; open-set when probes lack mates.",
    )
    add_model_options(p)
    p.add_argument(
        "--gallery", required=True, type=Path, help="gallery folder (identity/image or --label-regex)"
    )
    p.add_argument("--probe", required=True, type=Path, help="probe folder (same layout)")
    p.add_argument(
        "--distractors", type=Path, default=None, help="folder of distractor images added to the gallery"
    )
    p.add_argument(
        "--label-regex", default=None, help="identity = first group matched on the file name, e.g. '^(\\d+)_'"
    )
    p.add_argument(
        "--gallery-per",
        choices=("image", "identity"),
        default="image",
        help="gallery entries: every image (TinyFace) or one averaged template per identity (IJB-S)",
    )
    p.add_argument("--ranks", type=_float_list, default=[1, 5, 20], help="ranks to report (default 1,5,20)")
    p.add_argument("--fpir", type=_float_list, default=[0.01, 0.1], help="open-set FPIR targets")
    p.add_argument("--keypoints", choices=("auto", "backend", "template"), default="auto")
    p.add_argument("--name", default="identification", help="set name in the report")
    _common(p)
    p.set_defaults(func=_run_identify)

    p = sub.add_parser(
        "toolkit",
        help="CVLface evaluation toolkit folders: verification, IJB-B/C, TinyFace",
        description="Every set of the official toolkit layout (Hugging Face save_to_disk folders; "
        "a folder of them such as facerec_val/ is searched), each by its kind.",
    )
    add_model_options(p)
    p.add_argument("sets", nargs="+", type=Path, help="toolkit set folders, or folders holding them")
    p.add_argument(
        "--landmarks",
        action="append",
        type=Path,
        default=None,
        help="per-set landmark CSV (idx,ldmk_0..ldmk_9 normalised; idx = the index column), in the "
        "order the sets are found",
    )
    p.add_argument("--keypoints", choices=("auto", "file", "backend", "template"), default="auto")
    _add_norm_pooling_option(p, old="--ijb-use-norm", old_value=True)
    p.add_argument(
        "--no-detector-score", action="store_true", help="IJB: do not weight faces by detector score"
    )
    p.add_argument("--ranks", type=_float_list, default=[1, 5, 20], help="TinyFace ranks (default 1,5,20)")
    _common(p)
    p.set_defaults(func=_run_toolkit)

    p = sub.add_parser(
        "tinyface",
        help="TinyFace rank-1/5/20 (official protocol)",
        description="Closed-set identification: probes against gallery matches plus distractors; "
        "labels from the file-name prefix; inner product of flip-summed unit features.",
    )
    add_model_options(p)
    p.add_argument(
        "folder",
        type=Path,
        help="CVLface toolkit TinyFace folder, or a TinyFace test folder with Probe/, Gallery_Match/, "
        "Gallery_Distractor/",
    )
    p.add_argument("--keypoints", choices=("auto", "backend", "template"), default="auto")
    p.add_argument("--ranks", type=_float_list, default=[1, 5, 20], help="ranks to report (default 1,5,20)")
    p.add_argument("--name", default=None, help="set name in the report (default: the folder name)")
    _common(p)
    p.set_defaults(func=_run_tinyface)

    _register_keypoint_noise(sub)

    from .eval_gait import register_gait

    register_gait(sub)

    p = sub.add_parser(
        "sweep",
        help="accuracy vs alignment (paper Fig. 5), several checkpoints in one plot",
        description="For each t, faces are cropped on the path from the aligned crop (t=0) to the "
        "detector-box crop (t=1); keypoints follow the warp.",
    )
    add_model_options(p, repeatable=True)
    p.add_argument("--pairs", required=True, type=Path, help="CSV image_a,image_b,label of raw photos")
    p.add_argument(
        "--landmarks", required=True, type=Path, help="pixel landmarks 'image x0 y0 .. x4 y4 [score]'"
    )
    p.add_argument(
        "--boxes",
        type=Path,
        default=None,
        help="detector boxes 'image x1 y1 x2 y2' (default: landmarks' box, enlarged)",
    )
    p.add_argument("--root", type=Path, default=None, help="image folder (default: the CSV's folder)")
    p.add_argument(
        "--t",
        dest="t_values",
        type=_float_list,
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="interpolation points in [0, 1] (default 0,0.25,0.5,0.75,1)",
    )
    _common(p, keypoint_backend=False)
    p.set_defaults(func=_run_sweep)


def _missing_protocol(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _landmark_backend(args):
    """This run's landmark backend (for the DFA loaded now, so a bad checkpoint fails before any work)."""
    from ..eval.landmarks import DEFAULT_LANDMARK_BACKEND, LandmarkBackend

    aligner = getattr(args, "aligner", "dlib")
    if aligner != "dfa":
        return DEFAULT_LANDMARK_BACKEND  # dlib takes no settings: its loaded pipeline is shared
    weights = getattr(args, "aligner_weights", None)
    backend = LandmarkBackend(aligner, weights=weights, device=args.device, batch_size=args.batch_size)
    backend.load()  # AlignerLoadError: one line naming the weights or device
    return backend


def _path_arguments(args) -> list[str]:
    """Every argument value that names something on disk except the output and the cache: the inputs."""
    values = []
    for name, value in vars(args).items():
        if name in ("output", "cache_dir", "func"):
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (str, Path)) and str(item) and Path(item).exists():
                values.append(str(item))
    return values


def _settings(args):
    from ..eval.runs import EvalSettings
    from ..files import OutputPathError, check_not_input

    if args.batch_size <= 0:
        _fail(f"--batch-size must be positive, got {args.batch_size}")
    t = getattr(args, "t", None)  # ijb and pairs: the point on the aligned -> box-crop path
    if t is not None and not 0 <= t <= 1:
        _fail(f"--t must lie in [0, 1], got {t}")
    out = Path(args.output)
    # the outputs are checked before any work: an evaluation must not run for hours to fail at the write
    if out.exists() and not out.is_dir():
        _fail(
            f"-o/--output {out} is an existing file; the output is a folder (results.json, summary.md, plots)"
        )
    blocked = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        _fail(f"-o/--output {out} cannot be created: {blocked} is a file")
    for name in ("results.json", "summary.md", "roc.png", "sweep.json", "sweep.png"):
        if (out / name).is_dir():
            _fail(f"-o/--output {out}: {out / name} is a folder where a result file goes")
        try:  # a result file is never written over an input (kprpe.files' output rule)
            check_not_input(out / name, _path_arguments(args), inside=False)
        except OutputPathError as exc:
            _fail(str(exc))
    for far in args.far:
        if not 0 < far < 1:
            _fail(f"--far values must lie in (0, 1), got {far}")
    from ..eval.embedding import default_cache_dir

    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    calibrate = getattr(args, "calibrate", None)
    if calibrate is not None and not 0 < calibrate < 1:
        _fail(f"--calibrate must be a false-accept rate in (0, 1), got {calibrate}")
    if calibrate is not None and hasattr(args, "bins"):
        count = _count_sets([*args.bins, *args.sets])
        if count != 1:
            _fail(
                f"--calibrate needs exactly one set (a .bin file or one toolkit set), got {count}: a "
                "threshold is calibrated on one dataset"
            )
    landmark_backend = _landmark_backend(args)
    apply_model_defaults(args)  # no --weights: the published KP-RPE ViT-Base (after the output checks)
    return EvalSettings(
        # eval's --aligner finds keypoints on crops and never makes one: the flip rule's default is on
        flip=args.flip is not False,
        batch_size=args.batch_size,
        device=args.device,
        cache_dir=cache,
        progress=not args.quiet,
        far_targets=tuple(args.far),
        tar_far_convention=args.tar_far_convention,
        calibrate_far=calibrate,
        landmark_backend=landmark_backend,
    )


def _count_sets(paths) -> int:
    """How many sets ``kprpe eval verify`` will evaluate: a toolkit folder may hold several (facerec_val/)."""
    from ..errors import KprpeError
    from ..eval.toolkit import find_toolkit_sets

    count = 0
    for path in paths:
        try:
            count += len(find_toolkit_sets(path)) if Path(path).is_dir() else 1
        except (KprpeError, OSError):  # not a toolkit folder: the run itself says so
            count += 1
    return count


def _fail(message: str):
    raise CommandError(message)


def _guarded(run):
    """Turn data and checkpoint problems into one-line user errors (no tracebacks for bad input)."""
    from ..nn import CheckpointError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            return run()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        _fail(str(exc))
    except (ValueError, pickle.UnpicklingError, CheckpointError, RuntimeError) as exc:
        _fail(str(exc))


def _handle(spec: str, engine: str = "torch"):
    """A sweep's ``--weights [NAME=]W``: one handle per compared checkpoint."""
    from ..eval.runs import ModelHandle

    name, sep, path = str(spec).partition("=")
    if not sep:
        name, path = "", spec
    return ModelHandle(Path(path), name=name, engine=engine)


def _model(args):
    """The one handle of a single-model run, passed to everything that needs the model (embeddings,
    parameter count, calibration fingerprint) so that it is loaded once; built on the path
    apply_model_defaults resolved, so a repo id's snapshot is not verified (hashed) a second time."""
    from ..eval.runs import ModelHandle

    return ModelHandle(Path(args.weights), engine=args.engine, resolved=getattr(args, "weights_path", None))


def _start(args, landmark_formats: tuple[str, ...] | None = None, *, single_model: bool = True):
    """The opening every protocol shares, in this order: a --landmarks file of another format is refused
    (``landmark_formats``: the ones the protocol reads), then the settings (option values, output folder,
    landmark backend, model defaults), then the run's model handle (``single_model``; a sweep makes one per
    --weights itself). Returns ``(settings, handle or None)``."""
    if landmark_formats is not None:
        _check_landmarks(args, landmark_formats)
    settings = _settings(args)
    return settings, (_guarded(lambda: _model(args)) if single_model else None)


def _bin_sets(args, none_given: str) -> list[Path]:
    """``--bin`` sets, then positional ones, each with its --landmarks file when they are given."""
    sets = [*args.bins, *args.sets]
    if not sets:
        _fail(none_given)
    if args.landmarks and len(args.landmarks) != len(sets):
        _fail(f"give one --landmarks per set ({len(sets)} sets, {len(args.landmarks)} landmark files)")
    return sets


def _write_outputs(out: Path, results: dict, roc: bool = True) -> tuple[str, list[str]]:
    """results.json, summary.md and the ROC plot; returns the summary and the files written."""
    from ..eval.published import attach_published, published_lines
    from ..eval.report import markdown_summary, plot_roc
    from ..files import atomic_write_text, write_json

    published = attach_published(results)  # a model-zoo checkpoint: its authors' numbers beside ours
    columns = []
    if published:

        def cell(name: str, result: dict) -> str:
            rows = result.get("published", [])
            return (
                "; ".join(
                    f"{r['published']:.2f} ({r['difference']:+.2f})"
                    if r["difference"] is not None
                    else f"{r['published']:.2f}"
                    for r in rows
                )
                or "–"
            )

        columns = [("published (ours − published)", cell)]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    summary = markdown_summary(results, extra_columns=columns)
    if published:
        summary += "\n" + "\n".join(published_lines(published, results["model"])) + "\n"
    atomic_write_text(out / "summary.md", summary)
    curves = {n: r["roc"] for n, r in results.get("sets", {}).items() if "roc" in r}
    if roc and curves:
        plot_roc(
            curves, out / "roc.png", title=f"{results['protocol']} — {Path(str(results.get('weights'))).name}"
        )
    files = [str(out / "results.json"), str(out / "summary.md")]
    return summary, files + ([str(out / "roc.png")] if roc and curves else [])


def _finish(args, results: dict, summary: str, files: list[str], calibration: dict | None = None) -> int:
    """Print a protocol's result by the output convention: the Markdown summary, or compact JSON of the
    results without their curves (they are in results.json) and the files written."""
    light = {key: value for key, value in results.items() if key not in ("sets", "sweep")}
    light["sets"] = {
        name: {key: value for key, value in result.items() if key != "roc"}
        for name, result in results.get("sets", {}).items()
    }
    if "sweep" in results:
        light["sweep"] = results["sweep"]
    payload = {"output": str(args.output), "files": files, "results": light}
    text = f"{summary}\nwrote {', '.join(files)}"
    if calibration is not None:
        payload["calibration"] = calibration
        cal = calibration
        text += (
            f"\ncalibrated threshold {cal['threshold']:.6f} for FAR {cal['far_target']:g} on "
            f"{cal['dataset']} (measured FAR {cal['far']:.3g}, TAR {cal['tar']:.4f}); wrote {cal['file']}"
        )
    emit(args, json_safe(payload), text)
    return 0


def _report(args, handle, results: dict, *, roc: bool = True) -> int:
    """How a single-model protocol ends: results.json, summary.md, the ROC plot (``roc``), the threshold
    when --calibrate asks for one, and the printed result."""
    summary, files = _write_outputs(args.output, results, roc=roc)
    return _finish(args, results, summary, files, _write_calibration(args, results, handle))


def _write_calibration(args, results: dict, handle) -> dict | None:
    """With ``--calibrate``: the threshold measured on the (single) set goes beside the weights, with the
    fingerprint of the model the run used (``handle``: already loaded, not loaded again)."""
    if getattr(args, "calibrate", None) is None:
        return None
    from ..eval.calibration import write_calibration
    from ..face.pipeline import model_fingerprint

    ((dataset, result),) = results["sets"].items()
    if "calibration" not in result:
        _fail(f"{dataset} gave no calibration: a threshold needs verification pairs")
    if "error" in result["calibration"]:
        _fail(result["calibration"]["error"])
    # the model as the commands that read the file load it (an ONNX file's fingerprint is its hash)
    fingerprint = _guarded(lambda: model_fingerprint(handle()))
    path = write_calibration(
        args.weights,
        result["calibration"],
        model_fingerprint=fingerprint,
        dataset=dataset,
        protocol=results["protocol"],
        flip=results["flip"],
    )
    cal = result["calibration"]
    return {key: cal[key] for key in ("threshold", "far_target", "far", "tar")} | {
        "dataset": dataset,
        "file": str(path),
    }


def _run_verify(args) -> int:
    from ..eval.runs import evaluate_bins
    from ..eval.toolkit import evaluate_toolkit

    settings, handle = _start(args, _INDEX_CSV)
    sets = _bin_sets(args, "give at least one set: a .bin file or a CVLface toolkit folder (or --bin FILE)")
    if args.keypoints == "file" and not args.landmarks:
        _fail("--keypoints file needs --landmarks")
    landmarks = args.landmarks or [None] * len(sets)
    bins = [(s, lm) for s, lm in zip(sets, landmarks, strict=True) if not s.is_dir()]
    folders = [(s, lm) for s, lm in zip(sets, landmarks, strict=True) if s.is_dir()]
    results = None
    if bins:
        results = _guarded(
            lambda: evaluate_bins(
                handle,
                [b for b, _ in bins],
                settings,
                keypoint_source=args.keypoints,
                landmarks=[lm for _, lm in bins],
            )
        )
    if folders:
        toolkit = _guarded(
            lambda: evaluate_toolkit(
                handle,
                [f for f, _ in folders],
                settings,
                keypoint_source=args.keypoints,
                landmarks=[lm for _, lm in folders] if args.landmarks else None,
            )
        )
        if results is None:
            results = toolkit
        else:
            results["sets"].update(toolkit["sets"])
    return _report(args, handle, results)


def _run_ijb(args) -> int:
    from ..eval.runs import evaluate_ijb

    settings, handle = _start(args, _PIXEL_LIST)
    results = _guarded(
        lambda: evaluate_ijb(
            handle,
            name=args.name,
            tid_mid=args.tid_mid,
            pairs=args.pairs,
            landmarks=args.landmarks,
            images_dir=args.images,
            settings=settings,
            t=args.t,
            use_norm=args.norm_pooling,
            use_detector_score=not args.no_detector_score,
        )
    )
    return _report(args, handle, results)


def _run_pairs(args) -> int:
    from ..eval.runs import evaluate_pairs

    settings, handle = _start(args, _PIXEL_LIST)
    results = _guarded(
        lambda: evaluate_pairs(
            handle,
            args.pairs,
            settings,
            images_root=args.root,
            landmarks=args.landmarks,
            t=args.t,
            keypoint_source=args.keypoints,
        )
    )
    return _report(args, handle, results)


def _run_identify(args) -> int:
    from ..eval.runs import evaluate_identification

    settings, handle = _start(args)
    ranks = _int_ranks(args.ranks)  # 1.5 is refused, as toolkit and tinyface refuse it (was cut to 1)
    results = _guarded(
        lambda: evaluate_identification(
            handle,
            settings,
            gallery=args.gallery,
            probe=args.probe,
            distractors=args.distractors,
            label_regex=args.label_regex,
            keypoint_source=args.keypoints,
            ranks=ranks,
            fpir_targets=args.fpir,
            gallery_per=args.gallery_per,
            name=args.name,
        )
    )
    return _report(args, handle, results, roc=False)


def _int_ranks(values) -> list[int]:
    ranks = [int(r) for r in values]
    if any(r < 1 or r != v for r, v in zip(ranks, values, strict=True)):
        _fail(f"--ranks must be positive integers, got {values}")
    return ranks


def _run_toolkit(args) -> int:
    from ..eval.toolkit import evaluate_toolkit

    settings, handle = _start(args, _INDEX_CSV)
    results = _guarded(
        lambda: evaluate_toolkit(
            handle,
            args.sets,
            settings,
            keypoint_source=args.keypoints,
            landmarks=args.landmarks,
            ijb_use_norm=args.norm_pooling,
            ijb_use_detector_score=not args.no_detector_score,
            ranks=_int_ranks(args.ranks),
        )
    )
    return _report(args, handle, results)


def _run_tinyface(args) -> int:
    from ..eval.toolkit import evaluate_tinyface

    settings, handle = _start(args)
    results = _guarded(
        lambda: evaluate_tinyface(
            handle,
            args.folder,
            settings,
            keypoint_source=args.keypoints,
            ranks=_int_ranks(args.ranks),
            name=args.name,
        )
    )
    return _report(args, handle, results, roc=False)


def _run_sweep(args) -> int:
    from ..eval.report import plot_sweep
    from ..eval.runs import robustness_sweep
    from ..files import write_json

    settings, _ = _start(args, _PIXEL_LIST, single_model=False)
    results = _guarded(
        lambda: robustness_sweep(
            [_handle(w, args.engine) for w in args.weights],
            args.pairs,
            args.landmarks,
            settings,
            t_values=args.t_values,
            images_root=args.root,
            boxes=args.boxes,
        )
    )
    summary, files = _write_outputs(args.output, results, roc=False)
    sweep = results["sweep"]
    write_json(args.output / "sweep.json", sweep)
    plot_sweep(sweep["t"], sweep["accuracy"], args.output / "sweep.png")
    files += [str(args.output / "sweep.json"), str(args.output / "sweep.png")]
    return _finish(args, results, summary, files)


def _register_keypoint_noise(sub) -> None:
    p = sub.add_parser(
        "keypoint-noise",
        help="embedding cosine and accuracy vs keypoint noise (bad landmarks)",
        description="Perturb the keypoints of aligned .bin faces (Gaussian noise of sigma pixels on "
        "every keypoint; one landmark moved d pixels) and report the cosine to the "
        "clean-keypoint embedding and the 10-fold accuracy per condition, with a plot.",
    )
    add_model_options(p)
    p.add_argument("sets", nargs="*", type=Path, default=[], help=".bin verification sets")
    p.add_argument(
        "--bin", dest="bins", action="append", default=[], type=Path, help="a .bin set (repeatable)"
    )
    p.add_argument(
        "--landmarks",
        action="append",
        type=Path,
        default=None,
        help="per-set landmark CSV (idx,ldmk_0..ldmk_9, normalised), in the order of the sets",
    )
    p.add_argument(
        "--keypoints",
        choices=("auto", "file", "backend", "template"),
        default="auto",
        help="clean keypoint source, as for verify",
    )
    p.add_argument(
        "--sigmas",
        type=_float_list,
        default=[0.0, 1.0, 2.0, 4.0, 8.0],
        help="Gaussian noise sigmas in crop pixels (default 0,1,2,4,8)",
    )
    p.add_argument(
        "--displacements",
        type=_float_list,
        default=[8.0, 16.0],
        help="distances (crop pixels) one landmark is moved (default 8,16)",
    )
    p.add_argument(
        "--displace-index",
        type=int,
        default=None,
        help="which landmark to move (0-4: eyes, nose, mouth corners); default a random one per face",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default 0)")
    _common(p)
    p.set_defaults(func=_run_keypoint_noise)


def _run_keypoint_noise(args) -> int:
    from ..eval.keypoint_noise import (
        keypoint_noise_study,
        markdown_keypoint_noise,
        write_keypoint_noise_outputs,
    )

    settings, handle = _start(args, _INDEX_CSV)
    sets = _bin_sets(args, "give at least one .bin set")
    results = _guarded(
        lambda: keypoint_noise_study(
            handle,
            sets,
            settings,
            keypoint_source=args.keypoints,
            landmarks=args.landmarks,
            sigmas=args.sigmas,
            displacements=args.displacements,
            displace_index=args.displace_index,
            seed=args.seed,
        )
    )
    paths = write_keypoint_noise_outputs(args.output, results)
    return _finish(args, results, markdown_keypoint_noise(results), [str(p) for p in paths.values()])
