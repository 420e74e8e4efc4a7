"""``kprpe search enrol | remove | query``: a gallery of identities on the command line.

The face options, the pipeline and the model are those of ``align``/``embed``/``verify``
(:mod:`kprpe.cli.face`), and so are the output convention and exit status: 0 all inputs processed; 1
finished, but some inputs failed (they are listed in the output); 2 nothing could be done.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from ..errors import CommandError
from ..gallery.search import GalleryIndexError
from ..images import ImageLoadError
from ..thresholds import DEFAULT_THRESHOLD
from .face import (
    _add_pipeline_options,
    _check_output,
    _embedder,
    _failed_line,
    _pipeline,
    _report_failures,
    _score,
    _threshold,
    _workers,
)
from .options import (
    add_gallery_option,
    add_json_option,
    add_model_options,
    add_overwrite_option,
    add_workers_option,
    apply_model_defaults,
    emit,
    require_gallery,
)

__all__ = ["register"]


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


def register(subparsers) -> None:
    """Add ``search`` (``enrol``/``enroll``, ``remove``, ``query``) to the ``kprpe`` command."""
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
