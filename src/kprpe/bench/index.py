"""Gallery-index benchmark: query latency and recall@1 of the IVF index against exact search.

``python -m kprpe.bench.index --entries 1000000`` builds a :class:`~kprpe.gallery.index.GalleryIndex` of
synthetic 512-d identities, searches it exactly (FAISS flat, and a few queries with the NumPy fallback),
trains the IVF index and measures recall@1 (approximate top-1 == exact top-1) and single-query latency for
several ``nprobe``.

Synthetic data: with ``--structure clustered`` (default) identities are drawn around ``--clusters`` random
centres (cosine about 0.25 within a cluster, 0 across), a crude stand-in for the structure real face
embeddings have; ``uniform`` draws them uniformly on the sphere, the worst case for any inverted-list index
(no structure to exploit). Queries are noisy copies of enrolled identities (cosine about 0.7 to their mate).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import numpy as np

from ..gallery.index import GalleryIndex
from ..gallery.search import exact_top_k

__all__ = ["emit_results", "gallery_bench_parser", "synthetic_gallery_chunks", "run_index_benchmark", "main"]


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def synthetic_gallery_chunks(
    entries: int, dim: int, *, structure: str, clusters: int, seed: int, chunk: int = 65536
):
    """Yield ``(start, unit rows)`` chunks of synthetic identity templates (float32)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((clusters, dim)))
    within = 0.25 if structure == "clustered" else 0.0
    for start in range(0, entries, chunk):
        count = min(chunk, entries - start)
        noise = _unit(rng.standard_normal((count, dim)))
        rows = np.sqrt(within) * centres[rng.integers(0, clusters, count)] + np.sqrt(1 - within) * noise
        yield start, _unit(rows).astype(np.float32)


def _median_ms(search, queries: np.ndarray) -> float:
    times = []
    for query in queries:
        began = time.perf_counter()
        search(query[None])
        times.append(time.perf_counter() - began)
    return float(np.median(times) * 1e3)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def run_index_benchmark(
    entries: int = 1_000_000,
    dim: int = 512,
    *,
    queries: int = 500,
    latency_queries: int = 50,
    nprobes=(1, 4, 16, 32, 64, 128),
    nlist: int | None = None,
    structure: str = "clustered",
    clusters: int = 4096,
    numpy_queries: int = 3,
    seed: int = 0,
    log=print,
) -> dict:
    import faiss

    index = GalleryIndex(dim, backend="faiss", approximate_above=0)
    began = time.perf_counter()
    for start, rows in synthetic_gallery_chunks(
        entries, dim, structure=structure, clusters=clusters, seed=seed
    ):
        index.add_embeddings([f"id{start + i:08d}" for i in range(rows.shape[0])], rows)
    add_s = time.perf_counter() - began
    log(f"added {entries:,} x {dim} in {add_s:.1f} s (peak RSS {_peak_rss_gib():.1f} GiB)")

    rng = np.random.default_rng(seed + 1)
    mates = rng.choice(entries, queries, replace=False)
    probe = _unit(
        np.sqrt(0.5) * index.template_rows[mates] + np.sqrt(0.5) * _unit(rng.standard_normal((queries, dim)))
    )
    probe = probe.astype(np.float32)

    began = time.perf_counter()
    exact_rows, _ = index.search_rows(probe, 10)
    exact_batch_s = time.perf_counter() - began
    exact_ms = _median_ms(lambda q: index.search_rows(q, 10), probe[:latency_queries])
    mate_recall = float(np.mean(exact_rows[:, 0] == mates))
    log(
        f"exact (faiss flat): {exact_ms:.1f} ms/query, batch of {queries}: {exact_batch_s:.1f} s; "
        f"mate found at rank 1 for {mate_recall:.3f}"
    )

    rows = index.template_rows
    numpy_ms = _median_ms(lambda q: exact_top_k(q, rows, 10), probe[:numpy_queries])
    numpy_rows, _ = exact_top_k(probe[:numpy_queries], rows, 10)
    numpy_agrees = bool((numpy_rows[:, 0] == exact_rows[:numpy_queries, 0]).all())
    log(f"exact (numpy fallback): {numpy_ms:.0f} ms/query, top-1 agrees with faiss: {numpy_agrees}")

    began = time.perf_counter()
    index.build_approximate(nlist)
    build_s = time.perf_counter() - began
    log(f"IVF trained and filled in {build_s:.1f} s: {index.describe()} (peak RSS {_peak_rss_gib():.1f} GiB)")

    rows_out = []
    for nprobe in nprobes:
        index.set_nprobe(nprobe)
        approx_rows, _ = index.search_rows(probe, 10)
        recall1 = float(np.mean(approx_rows[:, 0] == exact_rows[:, 0]))
        recall10 = float(
            np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx_rows, exact_rows, strict=True)])
        )
        latency = _median_ms(lambda q: index.search_rows(q, 10), probe[:latency_queries])
        rows_out.append(
            dict(
                nprobe=nprobe,
                recall_at_1=recall1,
                recall_10_at_10=recall10,
                ms_per_query=latency,
                speedup=exact_ms / latency,
            )
        )
        log(
            f"nprobe {nprobe:>4}: recall@1 {recall1:.3f}, 10@10 {recall10:.3f}, {latency:.2f} ms/query "
            f"({exact_ms / latency:.1f}x faster than exact)"
        )
    return dict(
        entries=entries,
        dim=dim,
        structure=structure,
        clusters=clusters if structure == "clustered" else None,
        queries=queries,
        latency_queries=latency_queries,
        nlist=index.describe()["nlist"],  # the trained IVF index's own
        faiss=faiss.__version__,
        faiss_threads=int(faiss.omp_get_max_threads()),
        python=platform.python_version(),
        machine=platform.machine(),
        add_seconds=add_s,
        exact_ms_per_query=exact_ms,
        exact_batch_seconds=exact_batch_s,
        numpy_ms_per_query=numpy_ms,
        numpy_top1_agrees=numpy_agrees,
        exact_mate_rank1=mate_recall,
        ivf_build_seconds=build_s,
        approximate=rows_out,
        peak_rss_gib=_peak_rss_gib(),
    )


def gallery_bench_parser(
    prog: str, doc: str, *, queries: int, latency_queries: int
) -> argparse.ArgumentParser:
    """The options every gallery benchmark takes: its size, the queries, ``-o`` (the JSON output)."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # options only when spelled out, as kprpe's own
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument(
        "--queries", type=int, default=queries, help=f"queries for recall (default {queries})"
    )
    parser.add_argument(
        "--latency-queries",
        type=int,
        default=latency_queries,
        help=f"single queries timed (default {latency_queries})",
    )
    parser.add_argument("-o", "--output", default=None, help="write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = gallery_bench_parser("python -m kprpe.bench.index", __doc__, queries=500, latency_queries=50)
    parser.add_argument("--nprobe", default="1,4,16,32,64,128", help="comma-separated nprobe values")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default sqrt(entries))")
    parser.add_argument("--structure", choices=("clustered", "uniform"), default="clustered")
    parser.add_argument("--clusters", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: all)")
    args = parser.parse_args(argv)
    if args.entries < 100 or args.dim <= 0 or args.queries <= 0:
        parser.error("--entries must be >= 100 and --dim, --queries positive")
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    results = run_index_benchmark(
        args.entries,
        args.dim,
        queries=args.queries,
        latency_queries=args.latency_queries,
        nprobes=[int(v) for v in args.nprobe.split(",") if v],
        nlist=args.nlist,
        structure=args.structure,
        clusters=args.clusters,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    emit_results(results, args.output)
    return 0


def emit_results(results: dict, output: str | None) -> None:
    """Print a benchmark's results as JSON, and write them to ``output`` when given."""
    if output:
        from ..files import write_json

        write_json(output, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
