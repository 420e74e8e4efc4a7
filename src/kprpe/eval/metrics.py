"""Verification and identification metrics, written out so that every number in a report can be traced.

Conventions: a *score* is a similarity (higher = more likely the same identity); ``labels`` are booleans
(True = genuine / mated pair). For L2-normalised embeddings the cosine similarity ``s`` and the squared
distance ``d`` used by the insightface tools are tied by ``d = 2 - 2 s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_FAR_TARGETS",
    "insightface_cosine_thresholds",
    "TAR_FAR_CONVENTIONS",
    "TAR_FAR_RULES",
    "roc_curve",
    "roc_curve_dropped",
    "roc_auc",
    "tar_at_far",
    "fold_slices",
    "kfold_accuracy",
    "KFoldResult",
    "val_at_far",
    "ValResult",
    "cmc_ranks",
    "rank_accuracy",
    "open_set_dir_at_fpir",
]

DEFAULT_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _check_scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.shape[0]}) and labels ({labels.shape[0]}) differ in length")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int(np.sum(~np.isfinite(scores)))} scores are not finite (NaN/inf)")
    if labels.dtype != bool:
        uniq = np.unique(labels)
        if not np.all(np.isin(uniq, [0, 1])):
            raise ValueError(f"labels must be boolean or 0/1, got values {uniq[:5].tolist()}")
        labels = labels.astype(bool)
    return scores, labels


def insightface_cosine_thresholds(step: float = 0.01) -> np.ndarray:
    """The insightface grid ``d in arange(0, 4, step)`` on squared L2 distance, as cosine thresholds.

    ``d < t`` (same) is ``s > 1 - t/2``; keeping this grid reproduces the published LFW/CFP/AgeDB numbers.
    """
    return 1.0 - np.arange(0.0, 4.0, step) / 2.0


def _roc_counts(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """False/true accept counts at every distinct score, thresholds decreasing; plus #genuine, #impostor."""
    scores, labels = _check_scores_labels(scores, labels)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC needs genuine and impostor pairs; got {n_pos} genuine and {n_neg} impostor")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    # last index of each run of equal scores: all of them are accepted together
    distinct = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(y)[distinct]
    fp = (distinct + 1) - tp
    return fp, tp, s[distinct], n_pos, n_neg


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC as ``(far, tar, thresholds)``: the operating point "accept if score >= threshold" at every distinct
    score, thresholds decreasing, with a first point (far=0, tar=0, threshold=+inf).

    Matches ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``.
    """
    fp, tp, thresholds, n_pos, n_neg = _roc_counts(scores, labels)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, thresholds]


def roc_auc(far: np.ndarray, tar: np.ndarray) -> float:
    """Area under a ROC curve given by increasing ``far`` (trapezoid rule)."""
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2.0))


TAR_FAR_CONVENTIONS = ("insightface", "full_curve", "at_most")
"""How :func:`tar_at_far` picks the ROC point for a target FAR (see its docstring); the first is the
default."""

TAR_FAR_RULES = {
    "insightface": "sklearn roc_curve with drop_intermediate=True, arrays flipped, nearest FAR, first of "
    "equals in flipped order (insightface IJB script; the papers' convention)",
    "full_curve": "every threshold of the ROC, nearest FAR, best TAR at that FAR",
    "at_most": "best TAR with FAR <= target (conservative)",
}
"""One line per convention, for reports."""


def roc_curve_dropped(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC as ``sklearn.metrics.roc_curve(labels, scores)`` returns it by default
    (``drop_intermediate=True``).

    From the points at every distinct score (before the (0, 0) point is prepended), those whose false- and
    true-positive counts both have a zero second difference -- the middle of three points spaced by equal
    steps -- are dropped; the first and last points always stay. Then (0, 0, +inf) is prepended. The papers'
    IJB numbers are read off this curve, so which points survive changes the reported TAR.
    """
    fp, tp, thresholds, n_pos, n_neg = _roc_counts(scores, labels)
    if fp.size > 2:
        keep = np.r_[True, (np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0), True]
        fp, tp, thresholds = fp[keep], tp[keep], thresholds[keep]
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, thresholds]


def _pick_insightface(far: np.ndarray, target: float) -> int:
    """insightface's IJB rule on the dropped curve: flip the arrays, take the smallest ``|far - target|``,
    the first such point in the flipped order; returned as an index into the unflipped arrays."""
    distance_flipped = np.abs(far[::-1] - target)
    return far.size - 1 - int(np.argmin(distance_flipped))  # argmin: first minimum


def tar_at_far(
    scores,
    labels,
    far_targets=DEFAULT_FAR_TARGETS,
    convention: str = "insightface",
) -> list[dict]:
    """TAR at each target FAR; ``convention`` says how the ROC point is chosen.

    - ``"insightface"`` (default; what papers report, from insightface's IJB script and the official KP-RPE
      evaluator): the ROC of :func:`roc_curve_dropped` (sklearn ``roc_curve`` with its default
      ``drop_intermediate=True``); the arrays flipped so FAR descends; the point with the smallest
      ``|far - target|``, the first such point in the flipped order when several are equally near.
    - ``"full_curve"``: the full ROC (every distinct score is a threshold); the point with FAR nearest the
      target, the best TAR among points with that FAR.
    - ``"at_most"``: the best TAR whose FAR does not exceed the target (conservative).

    Each row also gives the FAR actually reached, its threshold, the convention, and ``resolvable`` -- False
    when the target is below 1/#impostors, so no measured point can reach it.
    """
    if convention not in TAR_FAR_CONVENTIONS:
        raise ValueError(f"TAR@FAR convention must be one of {TAR_FAR_CONVENTIONS}, got {convention!r}")
    if convention == "insightface":
        far, tar, thr = roc_curve_dropped(scores, labels)
    else:
        far, tar, thr = roc_curve(scores, labels)
    n_neg = int((~np.asarray(labels, dtype=bool)).sum())
    rows = []
    for target in far_targets:
        if convention == "insightface":
            idx = _pick_insightface(far, float(target))
        elif convention == "full_curve":
            idx = int(np.argmin(np.abs(far - target)))
            # among equally near points take the best TAR (the last one with that FAR)
            idx = int(np.nonzero(far == far[idx])[0][-1])
        else:
            idx = int(np.nonzero(far <= target)[0][-1])
        rows.append(
            dict(
                far_target=float(target),
                tar=float(tar[idx]),
                far=float(far[idx]),
                threshold=float(thr[idx]),
                resolvable=bool(target * n_neg >= 1.0),
                convention=convention,
            )
        )
    return rows


def fold_slices(n: int, n_folds: int = 10) -> list[np.ndarray]:
    """Contiguous folds without shuffling, sizes as ``sklearn.model_selection.KFold``: the first ``n % k``
    folds get one extra pair."""
    if n_folds < 2 or n < n_folds:
        raise ValueError(f"cannot split {n} pairs into {n_folds} folds")
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    bounds = np.r_[0, np.cumsum(sizes)]
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(n_folds)]


def _accuracy_per_threshold(scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of "same if score > t" for every t (vectorised via sorting)."""
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], labels[order]
    # number of pairs with score <= t is searchsorted(s, t, 'right'); those are predicted "different"
    k = np.searchsorted(s, thresholds, side="right")
    neg_below = np.r_[0, np.cumsum(~y)][k]
    pos_above = y.sum() - np.r_[0, np.cumsum(y)][k]
    return (neg_below + pos_above) / s.size


@dataclass
class KFoldResult:
    accuracy_mean: float
    accuracy_std: float
    fold_accuracies: list[float]
    fold_thresholds: list[float]
    best_threshold_all: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def kfold_accuracy(scores, labels, n_folds: int = 10, thresholds=None) -> KFoldResult:
    """The standard verification protocol: for each of ``n_folds`` contiguous folds, pick the threshold that
    maximises accuracy on the other folds (first one on ties), then measure accuracy on the held-out fold.

    ``thresholds``: candidate cosine thresholds (default: :func:`insightface_cosine_thresholds`) or
    ``"exact"`` for every midpoint between consecutive distinct scores (the true optimum, any score scale).
    A pair is predicted genuine when ``score > threshold``. Std is the population std (numpy default), as
    in the published tools.
    """
    scores, labels = _check_scores_labels(scores, labels)
    if isinstance(thresholds, str):
        if thresholds != "exact":
            raise ValueError(f"thresholds must be an array or 'exact', got {thresholds!r}")
        u = np.unique(scores)
        thresholds = np.r_[u[0] - 1.0, (u[1:] + u[:-1]) / 2.0, u[-1] + 1.0]
    elif thresholds is None:
        thresholds = insightface_cosine_thresholds()
    thresholds = np.asarray(thresholds, dtype=np.float64)
    accs, thrs = [], []
    folds = fold_slices(scores.size, n_folds)
    for test_idx in folds:
        train = np.ones(scores.size, dtype=bool)
        train[test_idx] = False
        train_acc = _accuracy_per_threshold(scores[train], labels[train], thresholds)
        best = thresholds[int(np.argmax(train_acc))]
        test_pred = scores[test_idx] > best
        accs.append(float(np.mean(test_pred == labels[test_idx])))
        thrs.append(float(best))
    all_acc = _accuracy_per_threshold(scores, labels, thresholds)
    return KFoldResult(
        accuracy_mean=float(np.mean(accs)),
        accuracy_std=float(np.std(accs)),
        fold_accuracies=accs,
        fold_thresholds=thrs,
        best_threshold_all=float(thresholds[int(np.argmax(all_acc))]),
    )


@dataclass
class ValResult:
    far_target: float
    val_mean: float
    val_std: float
    far_mean: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def val_at_far(scores, labels, far_target: float = 1e-3, n_folds: int = 10, thresholds=None) -> ValResult:
    """VAL (TAR) at a FAR target with the 10-fold protocol: on the training folds the threshold reaching
    the target FAR is linearly interpolated on the FAR(threshold) curve (the insightface procedure; if the
    target cannot be reached the strictest threshold is used), then VAL and FAR are measured on the held-out
    fold."""
    scores, labels = _check_scores_labels(scores, labels)
    if thresholds is None:
        thresholds = insightface_cosine_thresholds(step=0.001)
    thresholds = np.sort(np.asarray(thresholds, dtype=np.float64))[::-1]  # strict -> lenient: FAR increases
    vals, fars = [], []
    for test_idx in fold_slices(scores.size, n_folds):
        train = np.ones(scores.size, dtype=bool)
        train[test_idx] = False
        s_tr, y_tr = scores[train], labels[train]
        neg = np.sort(s_tr[~y_tr])
        far_curve = (neg.size - np.searchsorted(neg, thresholds, side="right")) / max(neg.size, 1)
        if far_curve[-1] >= far_target:
            # keep the first threshold for each FAR value so that interpolation is well defined
            uniq_far, first = np.unique(far_curve, return_index=True)
            threshold = float(np.interp(far_target, uniq_far, thresholds[first]))
        else:
            threshold = float(thresholds[0])
        s_te, y_te = scores[test_idx], labels[test_idx]
        accept = s_te > threshold
        vals.append(float(accept[y_te].mean()) if y_te.any() else np.nan)
        fars.append(float(accept[~y_te].mean()) if (~y_te).any() else np.nan)
    if np.all(np.isnan(vals)) or np.all(np.isnan(fars)):
        raise ValueError("VAL@FAR needs genuine and impostor pairs in the held-out folds")
    # a fold without genuine (or impostor) pairs says nothing about VAL (or FAR): left out of the mean
    return ValResult(
        far_target=float(far_target),
        val_mean=float(np.nanmean(vals)),
        val_std=float(np.nanstd(vals)),
        far_mean=float(np.nanmean(fars)),
    )


def cmc_ranks(similarity, probe_labels, gallery_labels) -> np.ndarray:
    """Rank (1-based) of the first correct gallery entry for each probe, ``0`` for probes whose identity is
    not in the gallery. Ties are counted pessimistically (an impostor with an equal score ranks first).

    ``similarity``: ``(num_probes, num_gallery)``; distractors are gallery entries with labels no probe has.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    probe_labels = np.asarray(probe_labels)
    gallery_labels = np.asarray(gallery_labels)
    if sim.shape != (probe_labels.size, gallery_labels.size):
        raise ValueError(
            f"similarity has shape {sim.shape}, expected ({probe_labels.size}, {gallery_labels.size})"
        )
    mated = probe_labels[:, None] == gallery_labels[None, :]
    has_mate = mated.any(axis=1)
    best_mate = np.where(mated, sim, -np.inf).max(axis=1)
    impostors_above = np.sum((sim >= best_mate[:, None]) & ~mated, axis=1)
    return np.where(has_mate, impostors_above + 1, 0)


def rank_accuracy(ranks: np.ndarray, ks=(1, 5, 20)) -> dict[str, float]:
    """Closed-set identification rate at rank k over the mated probes (ranks > 0)."""
    mated = ranks[ranks > 0]
    if mated.size == 0:
        raise ValueError("no probe has a mate in the gallery; closed-set rank accuracy is undefined")
    return {f"rank{k}": float(np.mean(mated <= k)) for k in ks}


def open_set_dir_at_fpir(similarity, probe_labels, gallery_labels, fpir_targets=(1e-2, 1e-1)) -> list[dict]:
    """Open-set identification: detection-and-identification rate at a false-positive identification rate.

    The threshold for each FPIR target is set on the top scores of the non-mated probes (identity absent
    from the gallery); DIR is the fraction of mated probes whose top-1 gallery entry is correct and scores
    above it.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    ranks = cmc_ranks(sim, probe_labels, gallery_labels)
    top = sim.max(axis=1)
    nonmated_top = np.sort(top[ranks == 0])[::-1]
    mated = ranks > 0
    if nonmated_top.size == 0 or not mated.any():
        raise ValueError("open-set identification needs both mated probes and non-mated probes")
    rows = []
    for target in fpir_targets:
        k = int(np.floor(target * nonmated_top.size))  # number of non-mated probes allowed above threshold
        threshold = float(nonmated_top[k]) if k < nonmated_top.size else -np.inf
        hit = mated & (ranks == 1) & (top > threshold)
        rows.append(
            dict(
                fpir_target=float(target),
                dir=float(hit.sum() / mated.sum()),
                fpir=float(np.mean(nonmated_top > threshold)),
                threshold=threshold,
                resolvable=bool(target * nonmated_top.size >= 1.0),
            )
        )
    return rows
