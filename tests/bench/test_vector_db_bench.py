"""``python -m kprpe.bench.vector_db`` on a small gallery: every engine enrols it, finds the planted mates and
agrees with exact search (all three search exactly at this size)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from kprpe.bench.vector_db import main, run_gallery_engine_benchmark
from kprpe.gallery.index import faiss_available

ENGINES = [
    engine
    for engine, ready in (
        ("faiss", faiss_available()),
        ("milvus", importlib.util.find_spec("pymilvus") is not None),
        ("qdrant", importlib.util.find_spec("qdrant_client") is not None),
    )
    if ready
]


def test_every_engine_finds_the_planted_mates(tmp_path):
    results = run_gallery_engine_benchmark(
        300, 64, engines=ENGINES, queries=20, latency_queries=3, workdir=str(tmp_path), log=lambda _: None
    )
    assert [row["engine"] for row in results["engines"]] == ENGINES
    for row in results["engines"]:
        # 64-d: a query has cosine ~0.7 to its mate and ~N(0, 1/64) to the 299 others, so a stranger above
        # the mate is a 5.6-sigma event (about 1e-8 per pair, 6e-5 over the 6,000 pairs)
        assert row["recall_at_1_vs_exact"] == 1.0 and row["mate_at_rank_1"] == 1.0, row
        assert row["enrol_ids_per_second"] > 0 and row["ms_per_query"] > 0
    assert list(tmp_path.iterdir()) == []  # the galleries were deleted


def test_command_line_checks_its_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--engines", "faiss,redis", "--entries", "300"])
    assert "unknown engines ['redis']" in capsys.readouterr().err
    out = tmp_path / "r.json"
    assert (
        main(["--engines", ENGINES[0], "--entries", "200", "--dim", "8", "--queries", "5", "-o", str(out)])
        == 0
    )
    assert json.loads(out.read_text())["engines"][0]["entries"] == 200
