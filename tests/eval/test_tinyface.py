from __future__ import annotations

import numpy as np
import pytest

from kprpe.eval.images import DataFormatError
from kprpe.eval.tinyface import TinyFaceProtocol, first_match_ranks, tinyface_identification, tinyface_label


def test_labels_come_from_the_file_name_prefix():
    assert tinyface_label("/a/b/12_3.jpg") == 12 and tinyface_label("7_x_y.png") == 7
    with pytest.raises(DataFormatError, match="file-name prefix"):
        tinyface_label("/a/probe/abc_1.jpg")


def test_ranks_hand_checked_with_ties_against_the_probe():
    # probe 0 = (1, 0), label 5; probe 1 = (0, 1), label 6. Scores are exact products of these vectors.
    probes = np.array([[1.0, 0.0], [0.0, 1.0]])
    matches = np.array(
        [
            [0.6, 0.8],  # label 5: p0 .6, p1 .8
            [0.8, -0.6],  # label 5: p0 .8 (p0's best mate), p1 -.6
            [0.8, 0.6],
        ]
    )  # label 6: p0 .8 (ties p0's best mate), p1 .6 (p1's mate)
    distractors = np.array(
        [
            [1.0, 0.0],  # p0 1.0, p1 0
            [-0.8, 0.6],  # p0 -.8, p1 .6 (ties p1's mate)
            [0.28, 0.96],
        ]
    )  # p0 .28, p1 .96
    # p0: best mate .8; the label-6 match (.8, a tie: counted against the probe) and distractor 0 (1.0) ->
    # rank 3 p1: best mate .6; match 0 (.8), distractor 1 (.6, tie), distractor 2 (.96) -> rank 4
    ranks = first_match_ranks(probes, matches, distractors, np.array([5, 6]), np.array([5, 5, 6]))
    np.testing.assert_array_equal(ranks, [3, 4])
    # a probe whose identity is not in the gallery gets rank 0
    assert first_match_ranks(probes[:1], matches, distractors, np.array([7]), np.array([5, 5, 6]))[0] == 0


def test_protocol_finds_rows_by_name_and_never_matches_distractors():
    paths = ["/set/Probe/1_0.jpg", "/set/Gallery_Match/1_1.jpg", "/set/Gallery_Distractor/1_9.jpg"]
    features = np.array([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])
    protocol = TinyFaceProtocol.from_paths(paths, ["Probe/1_0.png"], ["1_1.jpg"], ["x/1_9.jpg"])
    res = tinyface_identification(features, protocol, ranks=(1, 2))
    assert res["closed_set"] == {"rank1": 0.0, "rank2": 1.0}
    with pytest.raises(DataFormatError, match="1 probe images are not in the set"):
        TinyFaceProtocol.from_paths(paths, ["Probe/2_0.jpg"], ["1_1.jpg"], [])
    with pytest.warns(UserWarning, match="share a file name"):
        TinyFaceProtocol.from_paths(paths + ["/elsewhere/1_0.jpg"], ["1_0.jpg"], ["1_1.jpg"], [])
