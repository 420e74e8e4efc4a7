"""Our number beside the one published for a model-zoo checkpoint, so a user sees at once whether their setup
(data, alignment, keypoints, flip) reproduces the paper.

The published numbers are those of :mod:`kprpe.zoo.catalog` (copied from the source it names). A set is
matched to a published column by its name (``lfw``, ``cfp_fp``, ``agedb_30``, ``calfw``, ``cplfw``, ``IJBB``,
``IJBC``, ``tinyface``...): verification sets compare the 10-fold accuracy, IJB sets TAR at FAR 1e-4 (the
source's "@0.01" columns are percent: 0.01 % = 1e-4), TinyFace the rank-1 and rank-5 rates.

A repo id alone does not prove the weights are the published ones (anything can sit in a cache under that
name): the numbers are compared only when the checkpoint has the published architecture's parameter count,
and otherwise ``results["published_not_compared"]`` says why not.
"""

from __future__ import annotations

import re

__all__ = ["published_metric", "attach_published", "published_lines", "published_parameters"]

# the catalog's architecture (before any " (...)" note) -> the kprpe preset that builds it
_ARCHITECTURE_PRESETS = {
    "ViT-Base + KP-RPE": "vit_base_kprpe",
    "ViT-Base": "vit_base",
    "IR-101": "ir_101",
    "IR-50": "ir_50",
    "IR-18": "ir_18",
}

# normalised set name -> catalog column
_SET_COLUMNS = {
    "lfw": "LFW",
    "cfpfp": "CFPFP",
    "agedb": "AGEDB",
    "agedb30": "AGEDB",
    "calfw": "CALFW",
    "cplfw": "CPFLW",
    "ijbb": "IJBB@0.01",
    "ijbc": "IJBC@0.01",
    "tinyface": "TinyFace R1",
}
IJB_FAR = 1e-4


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def published_metric(set_name: str) -> str | None:
    """The catalog column that corresponds to an evaluation set, or None."""
    return _SET_COLUMNS.get(_normalise(set_name))


def _ours(column: str, result: dict) -> float | None:
    """Our value, in percent, for the catalog ``column`` from one set's result dict."""
    if column.startswith("IJB"):
        for row in result.get("tar_at_far", []):
            if abs(row["far_target"] - IJB_FAR) <= 1e-12:
                return 100.0 * row["tar"]
        return None
    if column.startswith("TinyFace"):
        rank = result.get("closed_set", {}).get("rank1" if column.endswith("R1") else "rank5")
        return None if rank is None else 100.0 * rank
    kfold = result.get("kfold")
    return None if not kfold else 100.0 * kfold["accuracy_mean"]


def published_parameters(architecture: str) -> int | None:
    """The parameter count of a catalog architecture (built on the meta device: no memory), or None."""
    import torch

    from ..nn import create_model

    preset = _ARCHITECTURE_PRESETS.get(architecture.split(" (", 1)[0])
    if preset is None:
        return None
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(preset).parameters())


def attach_published(results: dict) -> list[dict]:
    """For a run on a catalogued checkpoint (``results["model"]`` is its repo id) whose parameter count
    (``results["parameters"]``) is the published architecture's, add to each matching set a ``published``
    entry ``{metric, published, ours, difference, source}`` (percent) and return them all; an uncatalogued
    model or set gets nothing, another architecture ``results["published_not_compared"]`` (the reason)."""
    from ..zoo.catalog import SOURCES, find_entry

    model = str(results.get("model") or "")
    entry = find_entry(model) if model.count("/") == 1 else None
    if entry is None or not entry.reported:
        return []
    expected, found = published_parameters(entry.architecture), results.get("parameters")
    if expected is None or found != expected:
        architecture = entry.architecture.split(" (", 1)[0]
        results["published_not_compared"] = (
            f"{model} was published as {architecture}"
            + (f" ({expected:,} parameters)" if expected else "")
            + (f"; these weights have {found:,} parameters" if found else "; these weights' size is unknown")
            + ", so they are not the published model"
            + ("" if expected else " as far as kprpe can check")
        )
        return []
    rows = []
    for name, result in results.get("sets", {}).items():
        columns = [published_metric(name)]
        if columns[0] == "TinyFace R1":
            columns.append("TinyFace R5")
        for column in columns:
            if column is None or column not in entry.reported:
                continue
            ours = _ours(column, result)
            published = entry.reported[column]
            row = dict(
                set=name,
                metric=column,
                published=published,
                ours=ours,
                difference=None if ours is None else ours - published,
                source=SOURCES.get(entry.source, entry.source),
            )
            result.setdefault("published", []).append(row)
            rows.append(row)
    return rows


def published_lines(rows: list[dict], model: str) -> list[str]:
    """Human-readable comparison lines for :func:`attach_published`'s rows."""
    if not rows:
        return []
    lines = [f"Published numbers for {model} (source: {rows[0]['source']}):"]
    for row in rows:
        ours = "not measured" if row["ours"] is None else f"{row['ours']:.2f}"
        diff = "" if row["difference"] is None else f"  (difference {row['difference']:+.2f})"
        lines.append(
            f"  {row['set']:<12} {row['metric']:<12} published {row['published']:.2f}  ours {ours}{diff}"
        )
    return lines
