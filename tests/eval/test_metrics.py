from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from sklearn.model_selection import KFold

from kprpe.eval.metrics import (
    TAR_FAR_CONVENTIONS,
    cmc_ranks,
    fold_slices,
    insightface_cosine_thresholds,
    kfold_accuracy,
    open_set_dir_at_fpir,
    rank_accuracy,
    roc_auc,
    roc_curve,
    roc_curve_dropped,
    tar_at_far,
    val_at_far,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(500) < 0.3
    scores = np.round(rng.normal(labels * 1.0, 1.0), 1)  # rounding creates many ties
    far, tar, thr = roc_curve(scores, labels)
    sk_far, sk_tar, sk_thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(far, sk_far)
    np.testing.assert_allclose(tar, sk_tar)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert roc_auc(far, tar) == pytest.approx(roc_auc_score(labels, scores))


def test_tar_at_far_hand_computed():
    # 4 genuine, 10 impostors; accept if score >= threshold
    genuine = [0.9, 0.8, 0.5, 0.2]
    impostor = [0.85, 0.4, 0.3, 0.1, 0.05, 0.0, -0.1, -0.2, -0.3, -0.4]
    scores = np.array(genuine + impostor)
    labels = np.array([1] * 4 + [0] * 10, dtype=bool)
    rows = {r["far_target"]: r for r in tar_at_far(scores, labels, [0.1, 0.2, 0.01], convention="at_most")}
    # FAR <= 0.1 allows one impostor (0.85): threshold 0.5 accepts 3 of 4 genuine; 0.4 would add an impostor
    assert rows[0.1]["tar"] == pytest.approx(0.75) and rows[0.1]["far"] == pytest.approx(0.1)
    assert rows[0.2]["tar"] == pytest.approx(0.75) and rows[0.2]["far"] == pytest.approx(0.2)
    assert rows[0.01]["tar"] == pytest.approx(0.25) and rows[0.01]["far"] == 0.0
    assert rows[0.1]["resolvable"] and not rows[0.01]["resolvable"]
    nearest = {r["far_target"]: r for r in tar_at_far(scores, labels, [0.2, 0.01], convention="full_curve")}
    # nearest to 0.2: FAR 0.2 is reached at threshold 0.4 (two impostors), TAR then 3/4
    assert nearest[0.2]["far"] == pytest.approx(0.2) and nearest[0.2]["tar"] == pytest.approx(0.75)
    assert nearest[0.01]["far"] == 0.0 and nearest[0.01]["tar"] == pytest.approx(0.25)


def test_fold_sizes_match_sklearn_kfold():
    for n in (100, 103, 6000):
        ours = fold_slices(n, 10)
        theirs = [test for _, test in KFold(n_splits=10, shuffle=False).split(np.arange(n))]
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)


def test_kfold_known_answer_one_error_per_fold():
    # 10 folds of 10 pairs; in each fold one impostor scores 0.95, above every genuine pair (0.8):
    # any sensible threshold misclassifies exactly it -> every fold scores 0.9, std 0.
    scores, labels = [], []
    for _ in range(10):
        scores += [0.8] * 5 + [0.2] * 4 + [0.95]
        labels += [True] * 5 + [False] * 5
    res = kfold_accuracy(np.array(scores), np.array(labels), thresholds="exact")
    assert res.accuracy_mean == pytest.approx(0.9)
    assert res.accuracy_std == pytest.approx(0.0)
    assert all(0.2 < t < 0.8 for t in res.fold_thresholds)


def test_kfold_known_answer_uneven_errors():
    # fold k has k % 3 flipped impostors -> accuracies 1, .9, .8 repeating
    scores, labels = [], []
    for k in range(10):
        n_err = k % 3
        scores += [0.7] * 5 + [0.1] * (5 - n_err) + [0.99] * n_err
        labels += [True] * 5 + [False] * 5
    res = kfold_accuracy(np.array(scores), np.array(labels))  # insightface grid
    expected = np.array([1.0 - 0.1 * (k % 3) for k in range(10)])
    np.testing.assert_allclose(res.fold_accuracies, expected)
    assert res.accuracy_mean == pytest.approx(expected.mean())
    assert res.accuracy_std == pytest.approx(expected.std())


def _reference_kfold(scores, labels, thresholds):
    """Straightforward loop (the insightface procedure on cosine thresholds)."""
    accs = []
    for train, test in KFold(n_splits=10, shuffle=False).split(scores):
        train_acc = [np.mean((scores[train] > t) == labels[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(np.mean((scores[test] > best) == labels[test]))
    return np.mean(accs), np.std(accs)


def test_kfold_matches_reference_loop_on_random_scores():
    rng = np.random.default_rng(3)
    labels = np.repeat([True, False], 300)
    rng.shuffle(labels)
    scores = np.clip(rng.normal(np.where(labels, 0.5, 0.1), 0.2), -1, 1)
    thresholds = insightface_cosine_thresholds()
    res = kfold_accuracy(scores, labels)
    mean, std = _reference_kfold(scores, labels, thresholds)
    assert res.accuracy_mean == pytest.approx(mean)
    assert res.accuracy_std == pytest.approx(std)


def test_val_at_far_separable_and_hand_case():
    labels = np.tile([True, False], 500)
    scores = np.where(labels, 0.9, 0.0) + np.linspace(0, 0.05, 1000)
    res = val_at_far(scores, labels, 1e-3)
    assert res.val_mean == pytest.approx(1.0) and res.far_mean == pytest.approx(0.0)
    # genuine scores below every impostor: nothing genuine can be accepted at a low FAR
    res2 = val_at_far(np.where(labels, -0.5, 0.5) + np.linspace(0, 0.01, 1000), labels, 1e-3)
    assert res2.val_mean == pytest.approx(0.0)
    # folds holding only genuine pairs do not count as FAR 0 / folds holding only impostors not as VAL 0
    res3 = val_at_far(np.where(np.repeat([True, False], 500), 0.9, 0.0) + np.linspace(0, 0.05, 1000),
                      np.repeat([True, False], 500), 1e-3)
    assert res3.val_mean == pytest.approx(1.0)


def test_metric_input_errors_are_clear():
    with pytest.raises(ValueError, match="differ in length"):
        roc_curve([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="genuine and impostor"):
        roc_curve([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="not finite"):
        kfold_accuracy([np.nan] * 20, [True, False] * 10)
    with pytest.raises(ValueError, match="folds"):
        kfold_accuracy([0.1] * 5, [True] * 5)


def test_cmc_and_open_set_hand_computed():
    gallery = np.array(["a", "b", "c", "x1"], dtype=object)  # x1: distractor
    probes = np.array(["a", "b", "c", "z"], dtype=object)  # z: no mate
    sim = np.array([
        [0.9, 0.1, 0.2, 0.3],  # a: rank 1
        [0.5, 0.4, 0.1, 0.6],  # b: two impostors above -> rank 3
        [0.1, 0.2, 0.3, 0.3],  # c: tie with the distractor counts against it -> rank 2
        [0.2, 0.7, 0.1, 0.0],  # z: non-mated, top score 0.7
    ])
    ranks = cmc_ranks(sim, probes, gallery)
    np.testing.assert_array_equal(ranks, [1, 3, 2, 0])
    acc = rank_accuracy(ranks, (1, 2, 3))
    assert acc == pytest.approx({"rank1": 1 / 3, "rank2": 2 / 3, "rank3": 1.0})
    rows = open_set_dir_at_fpir(sim, probes, gallery, fpir_targets=(0.5,))
    # one non-mated probe: FPIR 0.5 allows none above the threshold 0.7 -> only 'a' (0.9) is detected
    assert rows[0]["dir"] == pytest.approx(1 / 3)
    assert rows[0]["fpir"] == 0.0


def test_tar_far_conventions_hand_computed():
    # 4 genuine, 4 impostors; three scores hold one genuine and one impostor each, so the ROC climbs
    # diagonally (1,1) -> (2,2) -> (3,3) in (impostors, genuine) accepted and sklearn drops the middle point.
    scores = np.array([0.9, 0.8, 0.7, 0.6] + [0.9, 0.8, 0.7, 0.0])
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    far, tar, thr = roc_curve_dropped(scores, labels)
    np.testing.assert_array_equal(far, [0, 0.25, 0.75, 0.75, 1.0])
    np.testing.assert_array_equal(tar, [0, 0.25, 0.75, 1.0, 1.0])
    pick = {c: tar_at_far(scores, labels, [0.5, 0.3], convention=c) for c in TAR_FAR_CONVENTIONS}
    # target 0.5: FAR 0.5 is on the full curve (TAR 0.5). On the dropped curve FAR 0.25 and 0.75 are equally
    # near; flipped, the first of them is FAR 0.75 with TAR 1.0.
    assert (pick["full_curve"][0]["far"], pick["full_curve"][0]["tar"]) == (0.5, 0.5)
    assert (pick["insightface"][0]["far"], pick["insightface"][0]["tar"]) == (0.75, 1.0)
    assert (pick["at_most"][0]["far"], pick["at_most"][0]["tar"]) == (0.5, 0.5)
    # target 0.3: FAR 0.25 is nearest on every curve
    assert {c: rows[1]["tar"] for c, rows in pick.items()} == {c: 0.25 for c in TAR_FAR_CONVENTIONS}
    assert pick["insightface"][0]["threshold"] == 0.6


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_dropped_roc_and_insightface_rule_match_sklearn(seed):
    """The rule written out with sklearn's own roc_curve, as the insightface IJB script uses it."""
    rng = np.random.default_rng(seed)
    labels = rng.random(3000) < 0.3
    scores = np.round(rng.normal(labels * 1.5, 1.0), 2)  # ties make the dropping matter
    far, tar, thr = roc_curve_dropped(scores, labels)
    sk_far, sk_tar, sk_thr = sk_roc_curve(labels, scores)
    np.testing.assert_array_equal(far, sk_far)
    np.testing.assert_array_equal(tar, sk_tar)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    targets = [1e-4, 1e-3, 3e-3, 1e-2, 0.05, 0.1, 0.5]
    fpr, tpr = np.flipud(sk_far), np.flipud(sk_tar)
    for row, target in zip(tar_at_far(scores, labels, targets), targets, strict=True):
        _, k = min(zip(np.abs(fpr - target), range(len(fpr)), strict=True))
        assert row["tar"] == tpr[k] and row["far"] == fpr[k]


def test_tar_at_far_rejects_unknown_convention():
    with pytest.raises(ValueError, match="convention must be one of"):
        tar_at_far([0.1, 0.2], [0, 1], [0.1], convention="nearest")
