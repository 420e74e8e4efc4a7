"""``python -m kprpe.bench.embed_memory``: the streaming-embed memory/throughput benchmark runs end to end."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("dlib")
pytest.importorskip("skimage")


def test_make_photos_links_variants(tmp_path):
    from kprpe.bench.embed_memory import make_photos

    paths = make_photos(tmp_path / "p", 10, size=64, variants=3)
    assert len(paths) == 10 and sorted(p.name for p in (tmp_path / "p").iterdir()) == [p.name for p in paths]
    assert paths[0].read_bytes() == paths[3].read_bytes() != paths[1].read_bytes()


@pytest.mark.slow
def test_benchmark_reports_memory_and_speed(tmp_path, capsys):
    from kprpe.bench.embed_memory import main

    out = tmp_path / "r.json"
    assert (
        main(["--counts", "3", "--model", "vit_tiny_kprpe", "--workers", "0", "--trace", "-o", str(out)]) == 0
    )
    [run] = json.loads(out.read_text())["runs"]
    assert run["files"] == 3 and run["faces"] == 3
    assert run["main_peak_rss_mib"] > 0 and run["python_heap_peak_mib"] > 0 and run["files_per_second"] > 0
