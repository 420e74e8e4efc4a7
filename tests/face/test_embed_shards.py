"""Embed shards name the model and options that made them: a shard copied in from another output is refused
on resume and on reading, never mixed in (issue 32 item 15)."""

from __future__ import annotations

import shutil

import pytest

from kprpe.streaming.shards import EmbedOutputError, read_embeddings

from .conftest import TINY_WEIGHTS, run_cli

pytest.importorskip("dlib")


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    import torch

    import kprpe

    model = kprpe.load_official(TINY_WEIGHTS)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    return kprpe.save_model(model, tmp_path_factory.mktemp("other") / "other.safetensors")


def _embed(capsys, inputs, weights, out, *extra):
    return run_cli(capsys, "embed", *inputs, "--weights", weights, "-o", out, "-q", "--workers", "0", *extra)


def test_a_shard_of_another_model_is_refused_on_resume(capsys, photo_dir, tmp_path, other_weights):
    """The shard of other weights, copied into an output: resume used to count its files as done and exit 0
    with rows of two models in one output."""
    out, foreign = tmp_path / "out", tmp_path / "foreign"
    first, second = photo_dir / "astronaut.png", photo_dir / "tilted.jpg"
    assert _embed(capsys, [second], other_weights, foreign)[0] == 0
    assert _embed(capsys, [first], TINY_WEIGHTS, out)[0] == 0
    (shard,) = sorted(foreign.glob("part-*"))
    (own,) = sorted(out.glob("part-*"))
    assert shard.suffix == own.suffix
    shutil.copy(shard, out / f"part-000001{shard.suffix}")  # beside this output's own shard
    code, payload, err = _embed(capsys, [first, second], TINY_WEIGHTS, out)
    assert code == 2 and payload is None
    assert "part-000001" in err and "another model" in err and "Traceback" not in err
    with pytest.raises(EmbedOutputError, match="another model"):
        read_embeddings(out)


def test_a_shard_without_a_fingerprint_is_refused(capsys, photo_dir, tmp_path):
    """The shard of this very output with its settings removed from the manifest (as older kprpe wrote it)."""
    out = tmp_path / "out"
    assert _embed(capsys, [photo_dir / "astronaut.png"], TINY_WEIGHTS, out, "--shard-rows", "1")[0] == 0
    (shard,) = sorted(out.glob("part-*"))
    _drop_settings(shard)
    code, _, err = _embed(capsys, [photo_dir], TINY_WEIGHTS, out)
    assert code == 2 and "names no model fingerprint" in err


def _drop_settings(shard) -> None:
    """Remove ``settings`` from a shard's manifest, in place (Parquet schema metadata or the .npz member)."""
    import json

    import numpy as np

    if shard.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(shard)
        manifest = json.loads(table.schema.metadata[b"kprpe"])
        del manifest["settings"]
        pq.write_table(table.replace_schema_metadata({b"kprpe": json.dumps(manifest).encode()}), shard)
        return
    with np.load(shard) as data:
        arrays = {name: data[name] for name in data.files}
    manifest = json.loads(str(arrays["manifest"]))
    del manifest["settings"]
    arrays["manifest"] = np.asarray(json.dumps(manifest))
    with open(shard, "wb") as stream:
        np.savez(stream, **arrays)
