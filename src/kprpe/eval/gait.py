"""Gait recognition evaluation as published for Gait3D (OpenGait's ``evaluate_Gait3D``, whose ranking code is
Gait3D-Benchmark's): part-averaged distances, then Rank-1/5/10, mAP and mINP in percent.

Written from the protocol's description (docs/gait.md), not from its code. Shapes: features are
``[sequences, channels, parts]``; a distance matrix is ``[probes, gallery]``, smaller = more alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ..errors import KprpeError
from ..gait.partition import sequence_key

__all__ = [
    "GaitEvalError",
    "RANKS",
    "part_distance",
    "rank_metrics",
    "gait3d_split",
    "split_from_partition",
    "evaluate_gait3d",
    "sequence_key",
]

RANKS = (1, 5, 10)


class GaitEvalError(KprpeError, ValueError):
    """Features, labels or a partition that the gait evaluation cannot use."""


def _features(name: str, array) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3:
        raise GaitEvalError(f"{name} features must be [sequences, channels, parts], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise GaitEvalError(f"{name} features must be numbers, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise GaitEvalError(f"{name} features hold {int(np.sum(~np.isfinite(array)))} NaN/inf values")
    return array


def part_distance(probe, gallery, metric: str = "euc") -> np.ndarray:
    """``[n, m]`` distances between probe ``[n, c, p]`` and gallery ``[m, c, p]`` features, per part then
    averaged over the ``p`` parts, in float32 (the published evaluation runs in float32).

    ``euc``: ``sqrt(max(|x|^2 + |y|^2 - 2 x.y, 0))`` per part (the clamp absorbs negative rounding);
    ``cos``: features L2-normalised over channels per part, ``1 - mean over parts of x.y``.
    """
    x, y = _features("probe", probe), _features("gallery", gallery)
    if x.shape[1:] != y.shape[1:]:
        raise GaitEvalError(
            f"probe [n, c, p] = {list(x.shape)} and gallery {list(y.shape)} differ in channels or parts"
        )
    if metric not in ("euc", "cos"):
        raise GaitEvalError(f"metric must be 'euc' or 'cos', got {metric!r}")
    # parts first: [p, n, c] @ [p, c, m] -> [p, n, m]
    xp, yp = np.transpose(x, (2, 0, 1)), np.transpose(y, (2, 1, 0))
    if metric == "cos":
        # zero vectors stay zero (distance 1), as with a normalisation that guards its denominator
        xp = xp / np.maximum(np.linalg.norm(xp, axis=2, keepdims=True), np.float32(1e-12))
        yp = yp / np.maximum(np.linalg.norm(yp, axis=1, keepdims=True), np.float32(1e-12))
        return (np.float32(1.0) - np.matmul(xp, yp).mean(axis=0)).astype(np.float32)
    squares = (xp * xp).sum(axis=2)[:, :, None] + (yp * yp).sum(axis=1)[:, None, :] - 2 * np.matmul(xp, yp)
    return np.sqrt(np.maximum(squares, np.float32(0.0))).mean(axis=0).astype(np.float32)


def _labels(name: str, labels, size: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != size:
        raise GaitEvalError(
            f"{name} labels: expected {size} labels (one per row/column), got shape {labels.shape}"
        )
    return labels


def rank_metrics(distance, probe_labels, gallery_labels) -> dict[str, float | None]:
    """Rank-1/5/10, mAP and mINP in percent from a ``[n, m]`` distance matrix (smaller = closer).

    Each probe row is ranked with ``np.argsort`` (ties in numpy's order). A probe whose label has no match
    in the gallery is skipped for every metric. Rank-r: share of valid probes whose first match is within the
    first r (``None`` when the gallery has fewer than r sequences). AP: mean over the matches of
    (matches so far / 1-based position). INP: matches / 1-based position of the last match.
    Raises :class:`GaitEvalError` when no probe has a match (every metric would be undefined).
    """
    distance = np.asarray(distance)
    if distance.ndim != 2:
        raise GaitEvalError(f"distance must be a [probes, gallery] matrix, got shape {distance.shape}")
    if not np.all(np.isfinite(distance)):
        raise GaitEvalError(f"distance holds {int(np.sum(~np.isfinite(distance)))} NaN/inf values")
    n, m = distance.shape
    probe_labels = _labels("probe", probe_labels, n)
    gallery_labels = _labels("gallery", gallery_labels, m)
    order = np.argsort(distance, axis=1)
    matches = gallery_labels[order] == probe_labels[:, None]  # [n, m], True where the ranked item matches
    valid = matches.any(axis=1)
    if not valid.any():
        raise GaitEvalError(f"none of the {n} probes has a matching label in the gallery of {m}")
    matches = matches[valid]
    found = np.cumsum(matches, axis=1)
    cmc = (found >= 1).astype(np.float32)  # the published code keeps CMC in float32: match it to 1e-6
    cmc_mean = cmc.sum(axis=0) / np.float32(cmc.shape[0]) * np.float32(100)
    positions = np.arange(1, m + 1, dtype=np.float64)
    num_matches = matches.sum(axis=1).astype(np.float64)
    average_precision = (found / positions * matches).sum(axis=1) / num_matches
    last_match = m - 1 - np.argmax(matches[:, ::-1], axis=1)  # 0-based index of the hardest match
    inverse_negative = num_matches / (last_match + 1.0)
    result: dict[str, float | None] = {
        f"Rank-{r}": (float(cmc_mean[r - 1]) if r <= m else None) for r in RANKS
    }
    result["mAP"] = float(np.mean(average_precision) * 100)
    result["mINP"] = float(np.mean(inverse_negative) * 100)
    return result


def gait3d_split(
    sequences: Iterable[Sequence[str]], test_ids: Iterable[str], probe_set: Iterable[str]
) -> tuple[np.ndarray, np.ndarray]:
    """The Gait3D probe/gallery split: boolean masks ``(probe, gallery)`` over ``sequences`` (each an
    ``(id, type, view)``). Probe: test sequences whose ``id-type-view`` is in ``probe_set``; gallery: every
    other test sequence (no same-camera or same-video exclusion, as published). Sequences of ids outside
    ``test_ids`` are in neither. A probe name that matches no sequence raises :class:`GaitEvalError` (a
    silently smaller probe set would change the numbers)."""
    sequences = [tuple(s) for s in sequences]
    test = set(test_ids)
    probes = set(probe_set)
    keys = [sequence_key(*s) for s in sequences]
    in_test = np.array([s[0] in test for s in sequences], dtype=bool)
    is_probe = np.array([k in probes for k in keys], dtype=bool)
    missing = probes - {k for k, t in zip(keys, in_test, strict=True) if t}
    if missing:
        first = ", ".join(sorted(missing)[:5])
        raise GaitEvalError(
            f"{len(missing)} PROBE_SET sequences are not among the test sequences (first: {first})"
        )
    return in_test & is_probe, in_test & ~is_probe


def split_from_partition(
    sequences: Iterable[Sequence[str]], partition: Mapping
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`gait3d_split` with ``TEST_SET`` and ``PROBE_SET`` read from a partition mapping (or a
    :class:`kprpe.gait.GaitPartition`)."""
    test_ids, probe_set = partition["TEST_SET"], partition.get("PROBE_SET")
    if not probe_set:
        raise GaitEvalError("the partition has no PROBE_SET: the Gait3D split needs one probe list")
    return gait3d_split(sequences, test_ids, probe_set)


def evaluate_gait3d(
    features, sequences: Sequence[Sequence[str]], partition: Mapping, metric: str = "euc"
) -> dict:
    """The whole published protocol on embedded sequences: ``features [N, c, p]`` of ``sequences`` (each an
    ``(id, type, view)``, in the same order) -> :func:`rank_metrics` on the Gait3D split of ``partition``,
    plus ``probes`` and ``gallery`` (how many sequences each side had)."""
    features = _features("sequence", features)
    sequences = [tuple(s) for s in sequences]
    if features.shape[0] != len(sequences):
        raise GaitEvalError(f"{features.shape[0]} feature rows for {len(sequences)} sequences")
    probe, gallery = split_from_partition(sequences, partition)
    if not gallery.any():
        raise GaitEvalError("the split has no gallery sequences (test ids with a single sequence each?)")
    labels = np.array([s[0] for s in sequences])
    distance = part_distance(features[probe], features[gallery], metric)
    result: dict = rank_metrics(distance, labels[probe], labels[gallery])
    result.update(probes=int(probe.sum()), gallery=int(gallery.sum()))
    return result
