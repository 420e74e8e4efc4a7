"""What ``kprpe embed`` writes does not depend on ``--workers``: worker processes run tasks ahead of the
results, so tasks the in-process path never runs (segments inside a time gap) come back from them and must
be dropped, not recorded in the shard manifests (kprpe.streaming.stream.iter_task_results)."""

from __future__ import annotations

import numpy as np
import pytest

from kprpe.streaming.shards import HEADER, ShardFolder, _completed_from, read_embeddings
from kprpe.streaming.stream import Completed

from .conftest import TINY_WEIGHTS, run_cli

pytest.importorskip("av")
pytest.importorskip("dlib")


def _manifests(out) -> list[dict]:
    import json

    header = json.loads((out / HEADER).read_text())
    return [manifest for _, manifest in ShardFolder(out, header["shard_format"], header).manifests()]


@pytest.mark.slow  # starts a worker process (seconds on a loaded machine)
def test_a_time_gap_gives_the_same_manifests_and_rows_with_workers(capsys, gap_clip, tmp_path):
    outputs = {}
    for workers in ("0", "1"):
        out = tmp_path / f"w{workers}.parquet"
        # 10 fps, 16 frames a segment: the face is in segment 0, then 3 and 4; segments 1 and 2 hold no frame
        argv = ["embed", gap_clip, "--weights", TINY_WEIGHTS, "-o", out, "-q", "--workers", workers]
        code, payload, _ = run_cli(capsys, *argv, "--fps", "10", "--batch-size", "4")
        assert code == 0 and payload["embedded"] == 20, payload
        outputs[workers] = out
    manifests = {workers: _manifests(out) for workers, out in outputs.items()}
    tasks = {w: [task for m in found for task in m["tasks"]] for w, found in manifests.items()}
    key = str(gap_clip.resolve())
    # [key, segment, rows, end, frames (, the segment of the next frame, after a gap)]
    assert tasks["0"] == [[key, 0, 10, False, 10, 3], [key, 3, 4, False, 4], [key, 4, 6, True, 6]]
    assert tasks["1"] == tasks["0"]
    for name in ("rows", "failures"):
        assert [m[name] for m in manifests["1"]] == [m[name] for m in manifests["0"]], name

    # what a resumed run reads back is the same, and it finds nothing left to do either way
    read_back = {}
    for workers, out in outputs.items():
        read_back[workers] = Completed()
        _completed_from(_manifests(out), read_back[workers])
        assert read_back[workers].file_done(gap_clip)
        code, payload, _ = run_cli(
            capsys, "embed", gap_clip, "--weights", TINY_WEIGHTS, "-o", out, "-q", "--workers", workers,
            "--fps", "10", "--batch-size", "4",
        )  # fmt: skip
        assert code == 0 and payload["embedded"] == 0 and payload["skipped_files"] == 1, payload
    assert read_back["1"] == read_back["0"]

    rows = {workers: read_embeddings(out) for workers, out in outputs.items()}
    for column in ("file", "name", "frame", "time", "face_index"):
        assert rows["1"][column].tolist() == rows["0"][column].tolist(), column
    for column in ("box", "landmarks", "keypoints", "score", "embedding", "norm"):
        np.testing.assert_allclose(rows["1"][column], rows["0"][column], atol=1e-6, err_msg=column)
