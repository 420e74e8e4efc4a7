"""The CVLface evaluation-toolkit layout (Hugging Face ``save_to_disk`` folders + ``metadata.pt``), built here
with ``datasets`` itself; no network."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from kprpe.cli import main
from kprpe.eval import runs
from kprpe.eval.ijb import template_features, template_pair_scores
from kprpe.eval.runs import EvalSettings, ModelHandle
from kprpe.eval.toolkit import (
    ToolkitFormatError,
    evaluate_tinyface,
    evaluate_toolkit,
    find_toolkit_sets,
    open_toolkit_set,
    read_toolkit_metadata,
    toolkit_face_source,
    verification_pairs,
)
from kprpe.eval.verification import verification_metrics

from .conftest import TINY_KPRPE

datasets = pytest.importorskip("datasets")
PIL = pytest.importorskip("PIL.Image")


def _save_set(folder, colors, columns: dict, shuffle_seed: int | None = 0, metadata: dict | None = None):
    """A toolkit set: face i is a flat 112x112 PNG of ``colors[i]``; rows stored in a shuffled order so that
    only the ``index`` column says which face is which."""
    n = len(colors)
    order = np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None else np.arange(n)
    images = [PIL.fromarray(np.full((112, 112, 3), colors[i], dtype=np.uint8)) for i in order]
    data = {"image": images, "index": [int(i) for i in order]}
    features = {"image": datasets.Image(), "index": datasets.Value("int64")}
    for name, (values, value_type) in columns.items():
        data[name] = [values[i] for i in order]
        features[name] = datasets.Value(value_type)
    datasets.Dataset.from_dict(data, features=datasets.Features(features)).save_to_disk(str(folder))
    if metadata is not None:
        torch.save(metadata, folder / "metadata.pt")
    return folder


def _unit_colors(colors) -> np.ndarray:
    c = np.asarray(colors, dtype=np.float64)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


@pytest.fixture
def colour_embedder(monkeypatch):
    """Embeds a face as its unit mean colour, so that every score below is known from the colours."""
    seen = []

    def fake_embed(handle, source, settings, mode, desc):
        images, kps = source.load(0, source.count)
        assert kps.shape == (source.count, 5, 2)
        seen.append(source.fingerprint)
        return _unit_colors(images.reshape(source.count, -1, 3).mean(axis=1)), np.ones(source.count), False

    monkeypatch.setattr(runs, "embed_source", fake_embed)
    return seen


def _handle():
    return ModelHandle(TINY_KPRPE)


def _verification_colors(n_pairs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    colors = rng.integers(20, 236, size=(2 * n_pairs, 3))
    same = [k % 2 == 0 for k in range(n_pairs)]
    for k in range(n_pairs):
        if same[k]:  # a genuine pair: nearly the same colour
            colors[2 * k + 1] = np.clip(colors[2 * k] + rng.integers(-6, 7, 3), 0, 255)
    return colors, [s for s in same for _ in range(2)]


def test_verification_set_is_read_in_index_order(tmp_path):
    colors, is_same = _verification_colors(6)
    folder = _save_set(tmp_path / "lfw", colors, {"is_same": (is_same, "bool")})
    ts = open_toolkit_set(folder)
    assert ts.kind == "verification" and len(ts) == 12 and ts.name == "lfw"
    assert not np.array_equal(ts.rows, np.arange(12))  # stored shuffled
    first, second, labels = verification_pairs(ts)
    np.testing.assert_array_equal(first, np.arange(0, 12, 2))
    np.testing.assert_array_equal(labels, [k % 2 == 0 for k in range(6)])
    source = toolkit_face_source(ts, "template")
    images, kps = source.load(3, 9)  # faces 3..8, gathered from scattered rows
    np.testing.assert_array_equal(images[:, 50, 50], colors[3:9])
    assert kps.shape == (6, 5, 2)


def test_toolkit_verification_scores_pairs_by_index(tmp_path, colour_embedder):
    colors, is_same = _verification_colors(20, seed=1)
    folder = _save_set(tmp_path / "agedb_30", colors, {"is_same": (is_same, "bool")})
    settings = EvalSettings(progress=False, cache_dir=None)
    res = evaluate_toolkit(_handle(), [tmp_path], settings, keypoint_source="template")
    assert res["sets"].keys() == {"agedb_30"}
    got = res["sets"]["agedb_30"]
    feats = _unit_colors(colors)
    scores = np.einsum("ij,ij->i", feats[0::2], feats[1::2])
    want = verification_metrics(scores, np.array(is_same[0::2]))
    assert got["toolkit_kind"] == "verification" and got["num_pairs"] == 20
    assert got["kfold"] == want["kfold"] and got["tar_at_far"] == want["tar_at_far"]
    assert got["tar_at_far_convention"] == "insightface"
    assert find_toolkit_sets(tmp_path) == find_toolkit_sets(folder) == [folder]
    assert len(colour_embedder) == 1


def test_toolkit_ijb_pools_templates_from_metadata(tmp_path, colour_embedder):
    rng = np.random.default_rng(2)
    n_faces = 24
    colors = rng.integers(10, 246, size=(n_faces, 3))
    templates = np.repeat(np.arange(100, 108), 3)  # 8 templates of 3 faces
    medias = np.array([0, 0, 1] * 8) + templates * 10
    faceness = rng.uniform(0.5, 1.0, n_faces).astype(np.float32)
    p1 = np.array([100, 100, 101, 102, 103, 104, 105, 106, 100, 107])
    p2 = np.array([101, 102, 103, 104, 105, 106, 107, 107, 106, 103])
    label = np.array([1, 0, 1, 0, 1, 0, 1, 0, 0, 1])
    meta = dict(templates=templates, medias=medias, faceness_scores=faceness, p1=p1, p2=p2, label=label)
    _save_set(tmp_path / "IJBC_gt_aligned", colors, {}, metadata=meta)
    assert open_toolkit_set(tmp_path / "IJBC_gt_aligned").kind == "ijb"
    settings = EvalSettings(progress=False, cache_dir=None, far_targets=(0.1, 0.5))
    got = evaluate_toolkit(_handle(), [tmp_path / "IJBC_gt_aligned"], settings, keypoint_source="template")
    r = got["sets"]["IJBC_gt_aligned"]
    feats, tids = template_features(_unit_colors(colors), templates, medias, detector_scores=faceness)
    want = verification_metrics(
        template_pair_scores(feats, tids, p1, p2), label.astype(bool), far_targets=(0.1, 0.5)
    )
    assert r["tar_at_far"] == want["tar_at_far"] and r["auc"] == pytest.approx(want["auc"])
    assert r["num_templates"] == 8 and r["use_norm"] is False and r["use_detector_score"] is True
    assert "kfold" not in r



def test_toolkit_sets_are_calibrated_like_bin_sets(tmp_path, colour_embedder):
    # the toolkit once had its own copy of the verification step, which never calibrated
    from kprpe.eval.calibration import calibrate_threshold

    colors, is_same = _verification_colors(20, seed=4)
    _save_set(tmp_path / "lfw", colors, {"is_same": (is_same, "bool")})
    settings = EvalSettings(progress=False, cache_dir=None, calibrate_far=0.1)
    got = evaluate_toolkit(_handle(), [tmp_path], settings, keypoint_source="template")["sets"]["lfw"]
    feats = _unit_colors(colors)
    scores = np.einsum("ij,ij->i", feats[0::2], feats[1::2])
    assert got["calibration"] == calibrate_threshold(scores, np.array(is_same[0::2]), 0.1)

# TinyFace, hand-checked. Features are unit colours; scores are cosines of these colours.
#   probe 1_a  A=(250,0,0): mate 1_b D=(250,250,0) scores .707; the distractor named 1_x is A itself (1.0) and
#              E=(250,0,100) scores .928: two gallery images above the mate -> rank 3. (If a distractor could
#              match, 1_x would make it rank 1.)
#   probe 2_a  B=(0,250,0): mate 2_b C=(0,60,250) scores .233; D (identity 1) scores .707 above it; A, E score
# 0, F=(60,20,250) .077 -> rank 2.
#   probe 1_c  (250,240,0): D scores .9998, above every other image -> rank 1.
#   probe 3_a  has no mate in the gallery: left out of the rates.
TINY_PROBES = {
    "Probe/1_a.jpg": (250, 0, 0),
    "Probe/2_a.jpg": (0, 250, 0),
    "Probe/1_c.jpg": (250, 240, 0),
    "Probe/3_a.jpg": (10, 10, 250),
}
TINY_MATCHES = {"Gallery_Match/1_b.jpg": (250, 250, 0), "Gallery_Match/2_b.jpg": (0, 60, 250)}
TINY_DISTRACTORS = {
    "Gallery_Distractor/1_x.jpg": (250, 0, 0),
    "Gallery_Distractor/9001.jpg": (250, 0, 100),
    "Gallery_Distractor/9002.jpg": (60, 20, 250),
}


def _tinyface_toolkit(folder):
    everything = {**TINY_PROBES, **TINY_MATCHES, **TINY_DISTRACTORS}
    paths = [f"/data/tinyface/{p}" for p in everything]
    meta = dict(
        image_paths=paths,
        probe_paths=[f"/x/{p}" for p in TINY_PROBES],
        gallery_paths=list(TINY_MATCHES),
        distractor_paths=list(TINY_DISTRACTORS),
    )
    return _save_set(
        folder, list(everything.values()), {"path": (paths, "string")}, shuffle_seed=3, metadata=meta
    )


def test_tinyface_toolkit_ranks_hand_checked(tmp_path, colour_embedder):
    folder = _tinyface_toolkit(tmp_path / "tinyface_aligned_pad_0.1")
    assert open_toolkit_set(folder).kind == "tinyface"
    res = evaluate_tinyface(
        _handle(),
        folder,
        EvalSettings(progress=False, cache_dir=None),
        keypoint_source="template",
        ranks=(1, 2, 3, 20),
    )
    r = res["sets"]["tinyface_aligned_pad_0.1"]
    assert (r["num_probes"], r["num_mated_probes"], r["num_gallery"], r["num_distractors"]) == (4, 3, 5, 3)
    assert r["closed_set"] == pytest.approx({"rank1": 1 / 3, "rank2": 2 / 3, "rank3": 1.0, "rank20": 1.0})
    assert r["layout"] == "CVLface toolkit"


def test_tinyface_original_folders_give_the_same_ranks(tmp_path, colour_embedder):
    root = tmp_path / "Testing_Set"
    for rel, color in {**TINY_PROBES, **TINY_MATCHES, **TINY_DISTRACTORS}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        PIL.fromarray(np.full((112, 112, 3), color, dtype=np.uint8)).save(root / rel.replace(".jpg", ".png"))
    res = evaluate_tinyface(
        _handle(),
        root,
        EvalSettings(progress=False, cache_dir=None),
        keypoint_source="template",
        ranks=(1, 2, 3),
    )
    assert res["sets"]["Testing_Set"]["closed_set"] == pytest.approx(
        {"rank1": 1 / 3, "rank2": 2 / 3, "rank3": 1.0}
    )


class _RunsCode:
    """Pickles as a call to os.system: loading it with plain pickle would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_metadata_is_read_without_unpickling_objects(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"templates": _RunsCode(marker)}, tmp_path / "metadata.pt")
    with pytest.raises(ToolkitFormatError, match="refusing to unpickle"):
        read_toolkit_metadata(tmp_path / "metadata.pt")
    assert not marker.exists()
    # numpy arrays, tensors, strings and lists are fine
    torch.save(
        {"a": np.arange(3), "b": torch.ones(2), "c": ["x.jpg"], "d": np.float32(1.5)}, tmp_path / "ok.pt"
    )
    meta = read_toolkit_metadata(tmp_path / "ok.pt", required=("a", "c"))
    np.testing.assert_array_equal(meta["a"], [0, 1, 2])
    assert meta["c"] == ["x.jpg"] and float(meta["d"]) == 1.5
    with pytest.raises(ToolkitFormatError, match="missing metadata keys"):
        read_toolkit_metadata(tmp_path / "ok.pt", required=("templates",))


def test_bad_layouts_are_named(tmp_path):
    colors, is_same = _verification_colors(2)
    _save_set(tmp_path / "odd", colors[:3], {"is_same": (is_same[:3], "bool")})
    with pytest.raises(ToolkitFormatError, match="even number"):
        open_toolkit_set(tmp_path / "odd")
    data = {"image": [PIL.fromarray(np.zeros((112, 112, 3), np.uint8))] * 2, "index": [0, 0]}
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "dup"))
    with pytest.raises(ToolkitFormatError, match="repeats values"):
        open_toolkit_set(tmp_path / "dup")
    flipped = _save_set(
        tmp_path / "flip", colors, {"is_same": ([True, False, True, True], "bool")}, shuffle_seed=None
    )
    with pytest.raises(ToolkitFormatError, match="is_same differ"):
        verification_pairs(open_toolkit_set(flipped))
    _save_set(tmp_path / "nometa", colors, {})
    with pytest.raises(ToolkitFormatError, match="no 'is_same' column and no metadata.pt"):
        open_toolkit_set(tmp_path / "nometa")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ToolkitFormatError, match="neither a `save_to_disk`"):
        find_toolkit_sets(tmp_path / "empty")


def test_cli_reads_toolkit_folders(tmp_path, capsys):
    colors, is_same = _verification_colors(10, seed=4)
    lfw = _save_set(tmp_path / "val" / "lfw", colors, {"is_same": (is_same, "bool")})
    _tinyface_toolkit(tmp_path / "val" / "tinyface")
    out = tmp_path / "run"
    common = ["--weights", str(TINY_KPRPE), "--keypoints", "template", "--no-cache", "--quiet"]
    assert (
        main(
            [
                "eval",
                "toolkit",
                str(tmp_path / "val"),
                *common,
                "-o",
                str(out),
                "--tar-far-convention",
                "full_curve",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["sets"].keys() == {"lfw", "tinyface"}
    assert results["sets"]["lfw"]["tar_at_far_convention"] == "full_curve"
    assert set(results["sets"]["tinyface"]["closed_set"]) == {"rank1", "rank5", "rank20"}
    summary = (out / "summary.md").read_text()
    assert "TAR@FAR convention — `full_curve`" in summary and "rank1" in summary
    # `verify` takes a toolkit folder in place of a .bin
    assert main(["eval", "verify", str(lfw), *common, "-o", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())["sets"]["lfw"]
    assert r["num_pairs"] == 10 and r["tar_at_far_convention"] == "insightface"
    assert main(["eval", "tinyface", str(tmp_path / "val" / "tinyface"), *common, "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "tinyface", str(lfw), *common, "-o", str(out)]) == 2
    assert "not TinyFace" in capsys.readouterr().err


def test_missing_datasets_library_names_the_extra(tmp_path, monkeypatch):
    colors, is_same = _verification_colors(2)
    folder = _save_set(tmp_path / "lfw", colors, {"is_same": (is_same, "bool")})
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ToolkitFormatError, match=r"kprpe\[eval-toolkit\]"):
        open_toolkit_set(folder)
