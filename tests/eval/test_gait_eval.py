"""Gait3D evaluation: part distances and rank metrics against cases made with the published arithmetic
(tests/fixtures/gait_eval), hand-worked small cases, and the probe/gallery split from a partition."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kprpe.eval.gait import (
    GaitEvalError,
    evaluate_gait3d,
    gait3d_split,
    part_distance,
    rank_metrics,
    split_from_partition,
)
from kprpe.gait import GaitPartition

CASES = json.loads(
    (Path(__file__).resolve().parents[1] / "fixtures" / "gait_eval" / "gait_eval.json").read_text()
)
METRICS = ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP")


@pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: f"seed{c['seed']}")
@pytest.mark.parametrize("metric", ["euc", "cos"])
def test_reference_cases(case, metric):
    probe = np.asarray(case["probe_features"], dtype=np.float32)
    gallery = np.asarray(case["gallery_features"], dtype=np.float32)
    expected = case[metric]
    distance = part_distance(probe, gallery, metric)
    # float32 sums over <= a few hundred products: rounding is ~1e-6 relative; 1e-4 is the cases' criterion
    np.testing.assert_allclose(distance, np.asarray(expected["distance"]), rtol=0, atol=1e-4)
    # ranked on the stored matrix, so tie order is numpy's on identical numbers: metrics agree to 1e-6
    result = rank_metrics(
        np.asarray(expected["distance"], dtype=np.float32), case["probe_labels"], case["gallery_labels"]
    )
    assert set(result) == set(METRICS)
    for key in METRICS:
        if expected[key] is None:
            assert result[key] is None, key
        else:
            assert result[key] == pytest.approx(expected[key], abs=1e-6), key


def test_hand_worked_metrics():
    # probe a: gallery ranked [a, b, a] -> first match rank 1, AP = (1/1 + 2/3) / 2, INP = 2/3
    # probe b: ranked [a, a, b]           -> first match rank 3, AP = 1/3, INP = 1/3
    # probe c: no c in the gallery        -> skipped everywhere
    gallery = np.array(["a", "b", "a"])
    distance = np.array([[0.1, 0.2, 0.3], [0.1, 0.3, 0.2], [0.1, 0.2, 0.3]])
    result = rank_metrics(distance, ["a", "b", "c"], gallery)
    assert result["Rank-1"] == pytest.approx(50.0)
    assert result["Rank-5"] is None and result["Rank-10"] is None  # gallery of 3
    assert result["mAP"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 / 3) / 2)
    assert result["mINP"] == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)


def test_no_valid_probe_is_an_error():
    with pytest.raises(GaitEvalError, match="none of the 2 probes"):
        rank_metrics(np.zeros((2, 2)), ["x", "y"], ["a", "b"])


def test_bad_inputs_are_named():
    with pytest.raises(GaitEvalError, match="differ in channels or parts"):
        part_distance(np.zeros((2, 4, 3)), np.zeros((2, 4, 2)))
    with pytest.raises(GaitEvalError, match=r"\[sequences, channels, parts\]"):
        part_distance(np.zeros((2, 4)), np.zeros((2, 4)))
    with pytest.raises(GaitEvalError, match="NaN"):
        part_distance(np.full((1, 2, 1), np.nan), np.zeros((1, 2, 1)))
    with pytest.raises(GaitEvalError, match="metric"):
        part_distance(np.zeros((1, 2, 1)), np.zeros((1, 2, 1)), "l1")
    with pytest.raises(GaitEvalError, match="expected 3 labels"):
        rank_metrics(np.zeros((2, 3)), ["a", "b"], ["a", "b"])
    with pytest.raises(GaitEvalError, match="NaN"):
        rank_metrics(np.array([[np.nan]]), ["a"], ["a"])


def test_cos_distance_of_parallel_features_is_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8, 4)).astype(np.float32)
    d = part_distance(x, 2.5 * x, "cos")
    # unit vectors in float32: dot products of 8 terms are 1 to within a few ulp (1e-6)
    np.testing.assert_allclose(np.diag(d), 0.0, atol=1e-6)
    e = part_distance(x, x, "euc")
    np.testing.assert_allclose(np.diag(e), 0.0, atol=1e-3)  # sqrt of a cancelled float32 difference


def test_gait3d_split_from_partition():
    sequences = [
        ("0001", "cam1", "seq0"),
        ("0001", "cam2", "seq0"),
        ("0002", "cam1", "seq0"),
        ("0002", "cam1", "seq1"),
        ("0003", "cam1", "seq0"),
    ]
    partition = GaitPartition(("0003",), ("0001", "0002"), ("0001-cam2-seq0", "0002-cam1-seq0"))
    probe, gallery = split_from_partition(sequences, partition)
    assert probe.tolist() == [False, True, True, False, False]
    assert gallery.tolist() == [True, False, False, True, False]  # train id 0003 in neither
    same = split_from_partition(sequences, partition.to_mapping())  # the plain JSON mapping works too
    assert [m.tolist() for m in same] == [probe.tolist(), gallery.tolist()]
    with pytest.raises(GaitEvalError, match="1 PROBE_SET sequences are not among the test sequences"):
        gait3d_split(sequences, ["0001"], ["0001-cam9-seq0"])
    with pytest.raises(GaitEvalError, match="no PROBE_SET"):
        split_from_partition(sequences, {"TRAIN_SET": [], "TEST_SET": ["0001"]})


def test_evaluate_gait3d_end_to_end():
    rng = np.random.default_rng(0)
    ids = [f"{i:04d}" for i in range(6)]
    sequences = [(i, f"cam{k}", "seq0") for i in ids for k in range(3)]
    centres = {i: rng.normal(size=(16, 4)) for i in ids}
    features = np.stack([centres[s[0]] + 0.01 * rng.normal(size=(16, 4)) for s in sequences])
    partition = GaitPartition(tuple(ids[:2]), tuple(ids[2:]), tuple(f"{i}-cam0-seq0" for i in ids[2:]))
    result = evaluate_gait3d(features, sequences, partition, "euc")
    assert result["probes"] == 4 and result["gallery"] == 8  # 4 test ids x 3 walks, one of each is a probe
    assert result["Rank-1"] == 100.0 and result["mAP"] == 100.0 and result["mINP"] == 100.0
    shuffled = features[rng.permutation(len(features))]  # features no longer belong to their sequences
    assert evaluate_gait3d(shuffled, sequences, partition, "cos")["mAP"] < 100.0
    with pytest.raises(GaitEvalError, match="17 feature rows for 18 sequences"):
        evaluate_gait3d(features[:-1], sequences, partition)
