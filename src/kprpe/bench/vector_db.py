"""Gallery engines side by side: the FAISS file index (the default) against Milvus Lite and Qdrant's local
mode, on the same synthetic gallery.

``python -m kprpe.bench.vector_db --entries 1000000 --engines faiss,milvus,qdrant -o gallery_db.json``
enrols ``--entries`` identities (random unit vectors in 512-d, uniform on the sphere: no structure for any
index to exploit) through each engine's real enrolment path (:meth:`GalleryIndex.add_embeddings` + ``save``
for FAISS; :meth:`DatabaseGallery.write` for the databases), then plants ``--queries`` queries, each a noisy
copy of one enrolled identity (cosine about 0.7 to its mate), and measures

- enrolment throughput (identities per second, to a persisted gallery),
- recall@1 against exact search (the engine's top-1 equals NumPy's float64 exact top-1) and how often the
  planted mate is found at rank 1,
- the median latency of single top-10 queries.

FAISS uses its defaults (exact below ``approximate_above`` = 200k identities, IVF with ``nprobe`` 64 above);
Milvus uses an exact ``FLAT`` index, Qdrant's local mode searches exactly. Gallery files are written under
``--workdir`` (default: a temporary folder, deleted afterwards).
"""

from __future__ import annotations

import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..gallery.database import DatabaseGallery
from ..gallery.index import GalleryIndex
from ..gallery.search import exact_top_k
from .index import (
    _median_ms,
    _peak_rss_gib,
    _unit,
    emit_results,
    gallery_bench_parser,
    synthetic_gallery_chunks,
)

__all__ = ["ENGINES", "run_gallery_engine_benchmark", "main"]

ENGINES = ("faiss", "milvus", "qdrant")
CHUNK = 16384  # identities enrolled per call: the batches an enrolment writes


def _names(start: int, count: int) -> list[str]:
    return [f"id{start + i:08d}" for i in range(count)]


def _enrol(engine: str, workdir: Path, entries: int, dim: int, seed: int):
    """Enrol the synthetic gallery; ``(searchable gallery, seconds, templates (entries, dim))``."""
    templates = np.empty((entries, dim), np.float32)
    began = time.perf_counter()
    if engine == "faiss":
        gallery = GalleryIndex(dim, backend="faiss")
    else:
        uri = f"milvus://{workdir / 'gallery.db'}" if engine == "milvus" else f"qdrant://{workdir / 'qdrant'}"
        gallery = DatabaseGallery.open(uri, dim=dim, metadata={"model_fingerprint": "bench"})
    for start, rows in synthetic_gallery_chunks(
        entries, dim, structure="uniform", clusters=1, seed=seed, chunk=CHUNK
    ):
        templates[start : start + rows.shape[0]] = rows
        if engine == "faiss":
            gallery.add_embeddings(_names(start, rows.shape[0]), rows)
        else:
            staging = GalleryIndex(dim, backend="numpy", approximate_above=0)
            staging.add_embeddings(_names(start, rows.shape[0]), rows)
            gallery.write(staging, pool=False)
    if engine == "faiss":
        gallery.save(workdir / "gallery.npz")
    return gallery, time.perf_counter() - began, templates


def _measure(engine: str, folder: Path, entries, dim, queries, latency_queries, seed, log) -> dict:
    gallery, enrol_s, templates = _enrol(engine, folder, entries, dim, seed)
    log(f"{engine}: enrolled {entries:,} x {dim} in {enrol_s:.1f} s ({entries / enrol_s:,.0f} ids/s)")
    rng = np.random.default_rng(seed + 1)
    mates = rng.choice(entries, queries, replace=False)
    noise = _unit(rng.standard_normal((queries, dim)))
    probe = _unit(np.sqrt(0.5) * templates[mates] + np.sqrt(0.5) * noise).astype(np.float32)
    exact_rows, _ = exact_top_k(probe, templates, 1)
    began = time.perf_counter()
    hits = gallery.search(probe, k=10)
    batch_s = time.perf_counter() - began
    top1 = np.array([int(row[0].identity[2:]) for row in hits])
    latency = _median_ms(lambda q: gallery.search(q, k=10), probe[:latency_queries])
    row = dict(
        engine=engine,
        kind=gallery.describe().get("kind"),
        entries=entries,
        enrol_seconds=enrol_s,
        enrol_ids_per_second=entries / enrol_s,
        recall_at_1_vs_exact=float(np.mean(top1 == exact_rows[:, 0])),
        mate_at_rank_1=float(np.mean(top1 == mates)),
        ms_per_query=latency,
        batch_seconds=batch_s,
        disk_mib=sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20,
        peak_rss_gib=_peak_rss_gib(),
    )
    log(
        f"{engine}: recall@1 vs exact {row['recall_at_1_vs_exact']:.3f}, mate at rank 1 "
        f"{row['mate_at_rank_1']:.3f}, {latency:.1f} ms/query, disk {row['disk_mib']:.0f} MiB"
    )
    if hasattr(gallery, "close"):
        gallery.close()
    return row


def run_gallery_engine_benchmark(
    entries: int,
    dim: int = 512,
    *,
    engines=ENGINES,
    queries: int = 100,
    latency_queries: int = 20,
    seed: int = 0,
    workdir: str | None = None,
    log=print,
) -> dict:
    results = []
    if workdir is not None:  # a named folder that does not exist yet is made, not a traceback
        Path(workdir).mkdir(parents=True, exist_ok=True)
    for engine in engines:
        folder = Path(tempfile.mkdtemp(prefix=f"kprpe-bench-{engine}-", dir=workdir))
        try:
            results.append(_measure(engine, folder, entries, dim, queries, latency_queries, seed, log))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return dict(
        entries=entries,
        dim=dim,
        queries=queries,
        latency_queries=latency_queries,
        python=platform.python_version(),
        machine=platform.machine(),
        versions=_versions(engines),
        engines=results,
    )


def _versions(engines) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("faiss-cpu", "pymilvus", "milvus-lite", "qdrant-client"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def main(argv: list[str] | None = None) -> int:
    parser = gallery_bench_parser("python -m kprpe.bench.vector_db", __doc__, queries=100, latency_queries=20)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: faiss,milvus,qdrant")
    parser.add_argument("--workdir", default=None, help="folder for the galleries (default: a temporary one)")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    if args.entries < 100 or args.dim <= 0 or not 0 < args.queries <= args.entries:
        parser.error("--entries must be >= 100, --dim positive and --queries between 1 and --entries")
    if args.output:
        from ..files import check_output_path

        check_output_path(args.output, inputs=[], overwrite=True)
    results = run_gallery_engine_benchmark(
        args.entries,
        args.dim,
        engines=engines,
        queries=args.queries,
        latency_queries=min(args.latency_queries, args.queries),
        workdir=args.workdir,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    emit_results(results, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
