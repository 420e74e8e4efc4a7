"""Run outputs besides ``results.json``: the ``summary.md`` text (the headline numbers) and PNG plots (ROC /
TAR-FAR, robustness sweep). Plots are written atomically; JSON and Markdown go through :mod:`kprpe.files`."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..files import atomic_write_bytes
from .metrics import TAR_FAR_RULES

__all__ = ["ExtraColumn", "markdown_summary", "plot_roc", "plot_sweep"]


def _pct(x: float) -> str:
    return f"{100.0 * x:.2f}"


def _far_label(far: float) -> str:
    return f"{far:.0e}".replace("e-0", "e-")


# An extra report column: header and a function (set name, that set's result dict) -> cell text. Used to put
# e.g. the published number for a checkpoint beside ours without touching the table code.
ExtraColumn = tuple[str, Callable[[str, dict], str]]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _tar_far_note(verif: dict[str, dict]) -> str:
    conventions = sorted({r.get("tar_at_far_convention", "full_curve") for r in verif.values()})
    rules = "; ".join(f"`{c}`: {TAR_FAR_RULES.get(c, '?')}" for c in conventions)
    return f"TAR@FAR convention — {rules}."


def markdown_summary(results: dict, extra_columns: Sequence[ExtraColumn] = ()) -> str:
    """The headline numbers of a ``results.json`` dict, as Markdown tables.

    ``extra_columns`` are appended to the verification and identification tables (see :data:`ExtraColumn`).
    """
    lines = [f"# kprpe eval: {results.get('protocol', '?')}", ""]
    meta = [
        ("weights", results.get("weights")),
        ("mode", results.get("mode")),
        ("keypoints", results.get("keypoint_source")),
        ("flip TTA", results.get("flip")),
    ]
    lines += [f"- {k}: `{v}`" for k, v in meta if v is not None]
    if results.get("published_not_compared"):
        lines.append(f"- published numbers: not compared — {results['published_not_compared']}")
    lines.append("")
    extra_headers = [h for h, _ in extra_columns]
    sets = results.get("sets", {})
    verif = {n: r for n, r in sets.items() if "tar_at_far" in r}
    if verif:
        far_targets = [row["far_target"] for row in next(iter(verif.values()))["tar_at_far"]]
        header = (
            ["set", "pairs", "accuracy (10-fold)", "VAL@FAR"]
            + [f"TAR@{_far_label(f)}" for f in far_targets]
            + ["AUC", *extra_headers]
        )
        rows = []
        for name, r in verif.items():
            kf = r.get("kfold")
            acc = f"{_pct(kf['accuracy_mean'])} ± {_pct(kf['accuracy_std'])}" if kf else "–"
            val = r.get("val_at_far")
            val_s = f"{_pct(val['val_mean'])} @ {_far_label(val['far_target'])}" if val else "–"
            tars = [
                (_pct(row["tar"]) if row["resolvable"] else f"({_pct(row['tar'])})")
                for row in r["tar_at_far"]
            ]
            rows.append(
                [
                    name,
                    str(r["num_pairs"]),
                    acc,
                    val_s,
                    *tars,
                    f"{r['auc']:.4f}",
                    *(cell(name, r) for _, cell in extra_columns),
                ]
            )
        lines += _markdown_table(header, rows)
        lines += [
            "",
            "Percentages. TAR in parentheses: the FAR target is below 1/#impostors, so the number is not "
            "resolvable from this many pairs.",
            _tar_far_note(verif),
            "",
        ]
    ident = {n: r for n, r in sets.items() if "closed_set" in r}
    if ident:
        ks = list(next(iter(ident.values()))["closed_set"].keys())
        header = ["set", "probes", "gallery", *ks, "DIR@FPIR", *extra_headers]
        rows = []
        for name, r in ident.items():
            ranks = [_pct(r["closed_set"][k]) for k in ks]
            open_set = r.get("open_set")
            dir_s = (
                ", ".join(f"{_pct(row['dir'])} @ {_far_label(row['fpir_target'])}" for row in open_set)
                if open_set
                else "–"
            )
            rows.append(
                [
                    name,
                    str(r["num_probes"]),
                    str(r["num_gallery"]),
                    *ranks,
                    dir_s,
                    *(cell(name, r) for _, cell in extra_columns),
                ]
            )
        lines += _markdown_table(header, rows)
        lines.append("")
    sweep = results.get("sweep")
    if sweep:
        header = ["t", *sweep["checkpoints"]]
        rows = [
            [f"{t:g}"] + [_pct(sweep["accuracy"][c][i]) for c in sweep["checkpoints"]]
            for i, t in enumerate(sweep["t"])
        ]
        lines += [
            "Accuracy (10-fold, %) as alignment degrades (t=0 aligned, t=1 detector-box crop):",
            "",
            *_markdown_table(header, rows),
        ]
        lines.append("")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_roc(curves: dict[str, dict], path: str | os.PathLike, title: str = "ROC") -> Path:
    """TAR against FAR (log axis) for each named curve ``{"far": [...], "tar": [...]}``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, c in curves.items():
        far, tar = np.asarray(c["far"]), np.asarray(c["tar"])
        keep = far > 0
        ax.plot(far[keep], tar[keep], label=name)
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_sweep(
    t_values,
    accuracy: dict[str, list[float]],
    path: str | os.PathLike,
    title: str = "Accuracy as alignment degrades",
) -> Path:
    """Accuracy (%) against the interpolation t, one line per checkpoint."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, acc in accuracy.items():
        ax.plot(t_values, 100.0 * np.asarray(acc), marker="o", label=name)
    ax.set_xlabel("t (0: aligned, 1: detector-box crop)")
    ax.set_ylabel("verification accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def _save(fig, path) -> Path:
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", bbox_inches="tight")
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())
