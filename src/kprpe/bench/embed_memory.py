"""Peak memory and throughput of streaming ``kprpe embed``: ``python -m kprpe.bench.embed_memory``.

Makes folders of N photos (hard links to a few variants of skimage's astronaut, so the disk cost is nil),
runs the embedding of each in a fresh process and reports the peak resident memory of that process and of
its worker processes, and photos per second. ``--legacy`` measures the former way (every crop collected,
then embedded at once) for comparison. Random weights of the chosen preset are used: throughput and memory
do not depend on the weights' values.

    python -m kprpe.bench.embed_memory --counts 200,2000 --model vit_small_kprpe --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main", "make_photos"]


def make_photos(folder: Path, count: int, *, size: int = 256, variants: int = 8) -> list[Path]:
    """``count`` photos of one face (``variants`` distinct files, the rest hard links to them)."""
    import numpy as np
    from PIL import Image

    try:
        from skimage.data import astronaut
    except ImportError:
        raise SystemExit("the benchmark photos come from scikit-image (pip install 'kprpe[dev]')") from None
    face = astronaut()[0:300, 80:380]
    folder.mkdir(parents=True, exist_ok=True)
    originals = []
    for i in range(variants):
        variant = np.roll(face, 5 * i, axis=1)[:, ::-1] if i % 2 else np.roll(face, 5 * i, axis=1)
        image = Image.fromarray(np.ascontiguousarray(variant)).resize((size, size), Image.BILINEAR)
        path = folder / f"v{i}.jpg"
        image.save(path, quality=92)
        originals.append(path)
    paths = []
    for i in range(count):
        path = folder / f"photo{i:06d}.jpg"
        source = originals[i % variants]
        try:
            os.link(source, path)
        except OSError:  # a file system without hard links
            path.write_bytes(source.read_bytes())
        paths.append(path)
    for original in originals:
        original.unlink()
    return paths


def _high_water_mib(pid: int | str = "self") -> float | None:
    """VmHWM: the peak resident memory of a process since it started its program. (``ru_maxrss`` would also
    count the parent's memory a spawned worker inherits between fork and exec.)"""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class _WorkerWatch:
    """Samples the peak memory of this process's children (the workers) while they live (Linux /proc)."""

    def __init__(self) -> None:
        import threading

        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _children(self) -> list[str]:
        found = []
        for task in Path("/proc/self/task").glob("*"):
            try:
                found += (task / "children").read_text().split()
            except OSError:
                pass
        return found

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for pid in self._children():
                value = _high_water_mib(pid)
                if value is not None:
                    self.peak = max(self.peak or 0.0, value)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.peak


def _child(args: argparse.Namespace) -> None:
    """One measurement, in its own process so that ru_maxrss is this run's alone."""
    import torch

    import kprpe
    from kprpe.face import FaceEmbedder, FacePipeline

    torch.manual_seed(0)
    model = kprpe.create_model(args.model)
    embedder = FaceEmbedder(model, batch_size=args.batch_size, device="cpu")
    pipeline = FacePipeline()
    folder = Path(args.folder)
    watch = _WorkerWatch()
    if args.trace:
        import tracemalloc

        tracemalloc.start()
    started = time.perf_counter()
    if args.legacy:
        batch = pipeline.process([folder], progress=False)
        unit, _ = embedder.embed_faces([record.face for record in batch.records])
        faces, files = len(unit), len(batch.records) + len(batch.failures)
    else:
        from kprpe.streaming.shards import embed_to_output

        summary = embed_to_output(
            [folder],
            Path(args.out),
            pipeline=pipeline,
            embedder=embedder,
            workers=args.workers,
            pipeline_factory=FacePipeline,
            progress=False,
        )
        faces, files = summary.embedded, summary.files
    seconds = time.perf_counter() - started
    worker_peak = watch.stop()
    traced = None
    if args.trace:
        import tracemalloc

        traced = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    main_peak = _high_water_mib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "files": files,
                "faces": faces,
                "seconds": round(seconds, 2),
                "files_per_second": round(files / seconds, 2),
                "main_peak_rss_mib": round(main_peak, 1),
                "worker_peak_rss_mib": round(worker_peak, 1) if worker_peak else None,
                "python_heap_peak_mib": traced,
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # options only when spelled out, as kprpe's own
        prog="python -m kprpe.bench.embed_memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--counts", default="200,2000", help="photo counts to compare (default 200,2000)")
    parser.add_argument(
        "--model", default="vit_small_kprpe", help="preset, random weights (default vit_small_kprpe)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="photo side in pixels (default 256)")
    parser.add_argument("--legacy", action="store_true", help="collect every crop first (the former way)")
    parser.add_argument(
        "--trace", action="store_true", help="also report the peak of the Python heap (tracemalloc; slower)"
    )
    parser.add_argument("-o", "--output", help="also write the results as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="kprpe-embed-memory-") as scratch:
        for count in (int(c) for c in args.counts.split(",") if c):
            folder = Path(scratch) / f"photos{count}"
            make_photos(folder, count, size=args.size)
            command = (
                [
                    sys.executable,
                    "-m",
                    "kprpe.bench.embed_memory",
                    "--child",
                    "--folder",
                    str(folder),
                    "--out",
                    str(Path(scratch) / f"out{count}.parquet"),
                    "--model",
                    args.model,
                    "--workers",
                    str(args.workers),
                    "--batch-size",
                    str(args.batch_size),
                ]
                + (["--legacy"] if args.legacy else [])
                + (["--trace"] if args.trace else [])
            )
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(
                    f"the run over {count} photos failed (exit status {done.returncode}):\n{done.stderr}",
                    file=sys.stderr,
                )
                return 1
            row = {
                "count": count,
                "model": args.model,
                "workers": args.workers,
                "legacy": args.legacy,
                **json.loads(done.stdout.strip().splitlines()[-1]),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.output:
        from kprpe.files import write_json

        write_json(
            args.output, {"load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "runs": results}
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
