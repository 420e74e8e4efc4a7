"""Checkpoint folders of a run: the ``latest`` pointer and ``meta.json`` are data a user can damage."""

from __future__ import annotations

import pytest

from kprpe.train.checkpoint import CheckpointState, latest_checkpoint, read_meta


def _complete(run, name):
    folder = run / "checkpoints" / name
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text('{"step": 1}')
    return folder


def test_latest_pointer_never_leads_outside_the_run(tmp_path):
    run = tmp_path / "run"
    good = _complete(run, "step_00000010")
    outside = tmp_path / "elsewhere"
    (outside).mkdir()
    (outside / "meta.json").write_text('{"step": 99}')
    (run / "checkpoints" / "latest").write_text("../../elsewhere\n")
    assert latest_checkpoint(run) == good  # falls back to the newest complete checkpoint inside the run
    (run / "checkpoints" / "latest").write_text(str(outside))
    assert latest_checkpoint(run) == good
    (run / "checkpoints" / "latest").write_text("step_00000010\n")
    assert latest_checkpoint(run) == good


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]"])
def test_corrupt_meta_json_is_a_clear_error(tmp_path, content):
    folder = _complete(tmp_path, "step_00000001")
    (folder / "meta.json").write_bytes(content)
    with pytest.raises(CheckpointState, match="meta.json"):
        read_meta(folder)
