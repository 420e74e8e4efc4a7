"""``kprpe serve``: load the model (and index) once, then answer HTTP requests until interrupted.

It takes the face commands' options (docs/cli.md): the model options (``--engine onnx`` included), the
aligner, ``--mode``, ``--gallery``, ``--landmarks request`` for keypoints sent with each request, ``-q``."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import CommandError, KprpeError
from .face import add_aligner_options
from .options import add_gallery_option, add_model_options, add_quiet_option, apply_model_defaults

# ``--landmarks request``: each request carries its face's keypoints (the face commands' --landmarks FILE,
# for uploads, which have no file name to look up)
LANDMARKS_FROM_REQUEST = "request"

__all__ = ["register", "build_service"]


def build_service(args: argparse.Namespace):
    """Model, aligner, index and threshold from the command line (shared by the CLI and the tests)."""
    from ..face.detector import MissingDependencyError
    from ..face.pipeline import DEFAULT_THRESHOLD
    from ..serve.app import FaceService
    from ..thresholds import resolve_threshold
    from .face import _embedder

    aligner = _aligner(args)
    # the face commands' model loading: a checkpoint or repo id, or an ONNX file with --engine onnx
    embedder = _embedder(args)
    index, location = None, args.gallery
    if location:
        from ..gallery.database import is_database_uri, open_gallery

        index = open_gallery(location, nprobe=args.nprobe)
        if is_database_uri(location):  # every change is written to the database when it is made
            location = None
    thumbnails = _thumbnail_store(args, location)
    choice = resolve_threshold(
        args.threshold,
        args.weights,
        model_fingerprint=embedder.fingerprint,
        flip=embedder.flip,
        default=DEFAULT_THRESHOLD,
    )
    try:
        return FaceService(
            embedder,
            aligner=aligner,
            index=index,
            threshold=choice.threshold,
            threshold_source=choice.source,
            index_path=location,
            api_key=getattr(args, "api_key", None) or os.environ.get("KPRPE_API_KEY") or None,
            thumbnails=thumbnails,
            aligner_options={
                "detector": args.detector,
                "landmark_model": args.landmark_model,
                "upsample": args.upsample,
                "weights": getattr(args, "aligner_weights", None),
                "device": args.device,
                "min_score": args.min_score,
                "mode": args.mode,
            },
        )
    except MissingDependencyError as exc:
        raise CommandError(str(exc)) from None
    except ValueError as exc:  # AlignerLoadError (bad DFA weights, device or score) is one too
        raise CommandError(str(exc)) from None


def _aligner(args: argparse.Namespace) -> str:
    """The service's aligner: ``--landmarks request`` (clients send keypoints), else ``--aligner``. The old
    ``--aligner supplied`` still works, with a warning."""
    if args.aligner == "supplied":
        from .options import REMOVED_IN

        prog = getattr(args, "command_prog", "kprpe serve")
        print(
            f"{prog}: warning: --aligner supplied is deprecated, use --landmarks {LANDMARKS_FROM_REQUEST} "
            f"(the old spelling goes in kprpe {REMOVED_IN})",
            file=sys.stderr,
        )
        args.aligner, args.landmarks = "dlib", LANDMARKS_FROM_REQUEST
    if args.landmarks is not None and args.landmarks != LANDMARKS_FROM_REQUEST:
        raise CommandError(
            f"--landmarks takes '{LANDMARKS_FROM_REQUEST}' here (each request sends its face's 5 keypoints), "
            f"not a file ({args.landmarks}): uploads have no file name to look up in it"
        )
    if args.landmarks and args.aligner == "dfa":
        raise CommandError(
            f"--landmarks {LANDMARKS_FROM_REQUEST} and --aligner dfa both give keypoints; choose one"
        )
    apply_model_defaults(args)  # an --aligner left unset: chosen from the weights (dlib with --landmarks)
    return "supplied" if args.landmarks else args.aligner


def _thumbnail_store(args: argparse.Namespace, gallery_file: str | None):
    """``--thumbnails DIR`` (``none``: keep none); by default a folder beside a gallery file (``--gallery
    gallery.npz`` -> ``gallery.npz.thumbnails``). A gallery without a file of its own (in memory, or in a
    vector database) keeps none unless given a folder."""
    from ..gallery.thumbnails import ThumbnailStore, thumbnails_beside

    folder = getattr(args, "thumbnails", None)
    if folder == "none":
        return None
    if folder is None:
        if not gallery_file:
            return None
        folder = thumbnails_beside(gallery_file)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CommandError(f"--thumbnails {folder} exists and is not a folder")
    return ThumbnailStore(folder)


def limits_from_args(args: argparse.Namespace):
    from ..serve.app import ServeLimits

    return ServeLimits(
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=int(args.max_megapixels * 1e6),
        request_timeout_s=args.timeout,
        max_concurrent=args.max_concurrent,
        max_queued=args.max_queued,
        read_timeout_s=args.read_timeout,
        idle_timeout_s=args.idle_timeout,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import server_config
        from ..serve.routes import create_app
    except ImportError as exc:
        raise CommandError(
            f"kprpe serve needs FastAPI and uvicorn ({exc}); pip install 'kprpe[serve]'"
        ) from None
    try:
        limits = limits_from_args(args)
    except KprpeError as exc:  # a limit that is not positive
        raise CommandError(str(exc)) from None
    service = build_service(args)
    from ..serve.routes import is_loopback

    app = create_app(service, limits, host=args.host)
    writes = (
        "gallery changes need the API key" if service.api_key
        else "gallery changes allowed (loopback only)" if is_loopback(args.host)
        else "gallery changes refused (no --api-key)"
    )
    if not args.quiet:
        print(
            f"kprpe serve: page and API at http://{args.host}:{args.port}/ ; {writes}; "
            f"aligner={service.aligner} threshold={service.threshold:g} ({service.threshold_source})"
            + ("" if service.index is None else f" gallery={args.gallery} ({len(service.index)} identities)"),
            file=sys.stderr,
            flush=True,
        )
    log_level = "warning" if args.quiet and args.log_level == "info" else args.log_level
    config = server_config(app, limits, host=args.host, port=args.port, log_level=log_level)
    uvicorn.Server(config).run()
    return 0


def register(subparsers) -> None:
    """Add ``serve`` to the ``kprpe`` command."""
    from ..face.align import ALIGN_MODES
    from ..serve.app import ServeLimits
    from .face import _upsample

    defaults = ServeLimits()
    p = subparsers.add_parser(
        "serve",
        help="HTTP service: a web page at / and /embed, /verify, /search, /health (FastAPI + uvicorn)",
        description="Serve a KP-RPE checkpoint over HTTP. POST /embed (file 'image'), /verify (files 'a', "
        "'b'), "
        "/search (file 'image', form 'k'); GET /health. JSON answers; errors are JSON with a 4xx "
        "status. See docs/serving.md.",
    )
    add_model_options(p)  # --weights, --flip/--no-flip, --batch-size, --device, --engine (onnx too)
    faces = p.add_argument_group("faces")
    add_aligner_options(faces, device=False)  # --aligner, --aligner-weights, --min-score
    # the old --aligner supplied: accepted (with a warning) but no longer offered
    aligner = next(a for a in faces._group_actions if "--aligner" in a.option_strings)
    aligner.metavar = "{" + ",".join(aligner.choices) + "}"
    aligner.choices = (*aligner.choices, "supplied")
    aligner.deprecated_values = {"supplied": f"--landmarks {LANDMARKS_FROM_REQUEST}"}  # docs/cli.md lists it
    faces.add_argument(
        "--landmarks",
        metavar=LANDMARKS_FROM_REQUEST,
        default=None,
        help=f"{LANDMARKS_FROM_REQUEST}: clients send each face's 5 keypoints (form field 'keypoints', JSON "
        "[[x, y] x 5] in photo pixels); no detector runs",
    )
    faces.add_argument(
        "--mode",
        choices=ALIGN_MODES,
        default="aligned",
        help="aligned: similarity transform to the ArcFace template (default); unaligned: detector box "
        "resized to 112; prealigned: uploads already are 112x112 crops",
    )
    faces.add_argument(
        "--detector", choices=("hog", "cnn"), default="hog", help="dlib detector (default hog)"
    )
    faces.add_argument(
        "--landmark-model", choices=("68", "5"), default="68", help="dlib shape model (default 68)"
    )
    faces.add_argument(
        "--upsample",
        type=_upsample,
        default="auto",
        help="dlib upsampling for small faces: auto (0, then 1, then 2 until a face is found) or 0..4",
    )
    add_gallery_option(
        p,
        help="the gallery (enables /search): a file of 'kprpe search enrol' or a vector database URI: "
        "http://HOST:19530 (a Milvus server several kprpe serve processes can share), milvus:///PATH.db, "
        "qdrant:///FOLDER",
    )
    p.add_argument(
        "--thumbnails",
        metavar="DIR",
        default=None,
        help="folder for the enrolled faces' 56x56 thumbnails the page shows, by identity (default: beside "
        "--gallery, GALLERY.thumbnails; 'none': keep none)",
    )
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=None,
        help="key the page's gallery changes (enrol/remove, header X-API-Key) must carry (default: env "
        "KPRPE_API_KEY). Without one, changes are allowed only when --host is a loopback address",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="same-person threshold (default: the calibration beside --weights, else 0.3)",
    )
    p.add_argument(
        "--nprobe", type=int, default=None, help="IVF lists searched per query (approximate indexes)"
    )
    add_quiet_option(p, help="no start-up line; uvicorn logs warnings only")
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-upload-mb",
        type=float,
        default=defaults.max_upload_bytes / 2**20,
        help="largest file per upload field, MiB (default %(default)g)",
    )
    g.add_argument(
        "--max-megapixels",
        type=float,
        default=defaults.max_pixels / 1e6,
        help="largest image, megapixels, checked before decoding (default %(default)g)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=defaults.request_timeout_s,
        help="seconds a request may take, waiting included (default %(default)g)",
    )
    g.add_argument(
        "--max-concurrent",
        type=int,
        default=defaults.max_concurrent,
        help="requests decoding/inferring at once (default %(default)d; the model runs one at a time)",
    )
    g.add_argument(
        "--max-queued",
        type=int,
        default=defaults.max_queued,
        help="requests allowed to wait or stream their body in; more get a JSON 503 (default %(default)d)",
    )
    g.add_argument(
        "--read-timeout",
        type=float,
        default=defaults.read_timeout_s,
        help="seconds a connection may take to send its request headers, and then its body; slower ones are "
        "closed or answered 408 (default %(default)g)",
    )
    g.add_argument(
        "--idle-timeout",
        type=float,
        default=defaults.idle_timeout_s,
        help="seconds an idle keep-alive connection is kept open (default %(default)g)",
    )
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=_cmd_serve)
