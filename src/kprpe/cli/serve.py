"""``kprpe serve``: load the model (and index) once, then answer HTTP requests until interrupted."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import CommandError, KprpeError

__all__ = ["register", "build_service"]


def build_service(args: argparse.Namespace):
    """Model, aligner, index and threshold from the command line (shared by the CLI and the tests)."""
    from ..face.detector import MissingDependencyError
    from ..face.embedder import FaceEmbedder
    from ..face.pipeline import DEFAULT_THRESHOLD
    from ..nn import CheckpointError
    from ..serve.app import FaceService
    from ..thresholds import resolve_threshold
    from .options import apply_model_defaults

    apply_model_defaults(args)  # no --weights: the published default; a repo id -> its verified snapshot
    weights = args.weights_path
    if getattr(args, "flip", False) and args.no_flip:
        raise CommandError("--flip and --no-flip contradict each other; give one")
    # the DFA's official pipeline has no flip TTA, so neither has --aligner dfa unless --flip asks for it
    flip = getattr(args, "flip", False) or (not args.no_flip and args.aligner != "dfa")
    try:
        embedder = FaceEmbedder.from_weights(weights, flip=flip, batch_size=2, device=args.device)
    except (CheckpointError, ValueError, OSError) as exc:
        raise CommandError(f"cannot load weights {weights}: {exc}") from None
    except (RuntimeError, AssertionError) as exc:
        raise CommandError(f"cannot use device {args.device!r} for weights {weights}: {exc}") from None
    index, location = None, getattr(args, "gallery_uri", None)
    if location and args.index:
        raise CommandError("give the gallery once: --gallery or --index, not both")
    location = location or args.index
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
            aligner=args.aligner,
            index=index,
            threshold=choice.threshold,
            threshold_source=choice.source,
            index_path=location,
            api_key=getattr(args, "api_key", None) or os.environ.get("KPRPE_API_KEY") or None,
            thumbnails=thumbnails,
            aligner_options={
                "detector": args.detector,
                "landmark_model": args.landmark_model,
                "weights": getattr(args, "aligner_weights", None),
                "device": args.device,
                "min_score": getattr(args, "min_aligner_score", None),
            },
        )
    except MissingDependencyError as exc:
        raise CommandError(str(exc)) from None
    except ValueError as exc:  # AlignerLoadError (bad DFA weights, device or score) is one too
        raise CommandError(str(exc)) from None


def _thumbnail_store(args: argparse.Namespace, gallery_file: str | None):
    """``--thumbnails DIR`` (``none``: keep none); by default a folder beside a gallery file (``--index
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
    print(
        f"kprpe serve: page and API at http://{args.host}:{args.port}/ ; {writes}; aligner={service.aligner} "
        f"threshold={service.threshold:g} ({service.threshold_source})"
        + (
            f" index={args.gallery_uri or args.index} ({len(service.index)} identities)"
            if service.index is not None
            else ""
        ),
        file=sys.stderr,
        flush=True,
    )
    config = server_config(app, limits, host=args.host, port=args.port, log_level=args.log_level)
    uvicorn.Server(config).run()
    return 0


def register(subparsers) -> None:
    """Add ``serve`` to the ``kprpe`` command."""
    from ..serve.app import ALIGNERS, ServeLimits

    defaults = ServeLimits()
    p = subparsers.add_parser(
        "serve",
        help="HTTP service: a web page at / and /embed, /verify, /search, /health (FastAPI + uvicorn)",
        description="Serve a KP-RPE checkpoint over HTTP. POST /embed (file 'image'), /verify (files 'a', "
        "'b'), "
        "/search (file 'image', form 'k'); GET /health. JSON answers; errors are JSON with a 4xx "
        "status. See docs/serving.md.",
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="W",
        help="checkpoint file or directory, or a published repo id (see kprpe models --zoo); default: the "
        "published KP-RPE ViT-Base, minchul/cvlface_adaface_vit_base_kprpe_webface4m, downloaded on first "
        "use",
    )
    p.add_argument(
        "--aligner",
        choices=sorted(ALIGNERS),
        default=None,
        help="dlib: detect faces and landmarks; dfa: the official DFA aligner (its crop, no flip TTA unless "
        "--flip); supplied: clients send 5 keypoints per image. Default: dfa with the published KP-RPE "
        "weights (dlib, with a notice, when it cannot be had offline), dlib with any other weights",
    )
    p.add_argument(
        "--aligner-weights",
        metavar="W",
        default="minchul/cvlface_DFA_mobilenet",
        help="DFA checkpoint file/folder or repo id (default minchul/cvlface_DFA_mobilenet)",
    )
    p.add_argument(
        "--min-aligner-score",
        type=float,
        default=None,
        metavar="S",
        help="with --aligner dfa: answer 422 'no face' when the DFA face score is below S",
    )
    p.add_argument(
        "--index", metavar="INDEX", help="gallery index from 'kprpe search enrol' (enables /search)"
    )
    p.add_argument(
        "--gallery",
        dest="gallery_uri",
        metavar="URI",
        default=None,
        help="the gallery as a file path (like --index) or a vector database URI: http://HOST:19530 (a "
        "Milvus server several kprpe serve processes can share), milvus:///PATH.db, qdrant:///FOLDER",
    )
    p.add_argument(
        "--thumbnails",
        metavar="DIR",
        default=None,
        help="folder for the enrolled faces' 56x56 thumbnails the page shows, by identity (default: beside "
        "--index, INDEX.thumbnails; 'none': keep none)",
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
    p.add_argument("--detector", choices=("hog", "cnn"), default="hog", help="dlib detector (default hog)")
    p.add_argument(
        "--landmark-model", choices=("68", "5"), default="68", help="dlib shape model (default 68)"
    )
    p.add_argument("--no-flip", action="store_true", help="disable flip test-time augmentation")
    p.add_argument("--flip", action="store_true", help="flip test-time augmentation even with --aligner dfa")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
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
