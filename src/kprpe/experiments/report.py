"""Turn the digits experiment's raw job results into mean ± std tables (Markdown), a JSON file and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..files import atomic_path, atomic_write_text
from .digits_data import SWEEP_UNITS
from .digits_models import MODEL_SPECS

__all__ = ["aggregate", "markdown_table", "write_outputs", "plot_sweeps", "PAPER_NUMBERS"]

PAPER_NUMBERS = "[paper, Fig. 1] Abs-PE: 98.1% on MNIST, 77.27% on AffNIST; KP-RPE is the most robust."
REGIME_TITLES = {
    "none": "trained without augmentation",
    "mild": "trained with mild augmentation (same for every model)",
}


def _stats(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return dict(
        mean=float(arr.mean()),
        std=float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        n=int(len(arr)),
        values=[float(v) for v in arr],
    )


def aggregate(results: dict) -> dict:
    """``{head: {regime: {model: {metric: {mean, std, n, values}}}}}``.

    Metrics: every test set by name, plus ``<factor>_mean`` (a sweep's mean over its levels) and
    ``train_seconds``. Means and stds are over seeds (std with ddof=1).
    """
    sweeps = results["config"]["sweeps"]
    grouped: dict = {}
    for job in results["jobs"]:
        metrics = dict(job["accuracy"])
        for factor, levels in sweeps.items():
            names = [f"{factor}@{lvl:g}" for lvl in levels]
            metrics[f"{factor}_mean"] = float(np.mean([job["accuracy"][n] for n in names]))
        metrics["train_seconds"] = job["train_seconds"]
        cell = grouped.setdefault(job["head"], {}).setdefault(job["regime"], {}).setdefault(job["model"], {})
        for k, v in metrics.items():
            cell.setdefault(k, []).append(v)
    return {
        h: {
            r: {m: {k: _stats(v) for k, v in cell.items()} for m, cell in by_model.items()}
            for r, by_model in by_regime.items()
        }
        for h, by_regime in grouped.items()
    }


def _fmt(stat: dict, best: bool = False) -> str:
    text = f"{stat['mean']:.1f} ± {stat['std']:.1f}" if stat["n"] > 1 else f"{stat['mean']:.1f}"
    return f"**{text}**" if best else text


def markdown_table(results: dict, summary: dict | None = None) -> str:
    """One block per (head, regime): rows = models, columns = clean, AffNIST-style mix and each sweep's
    mean over its levels; best mean per column in bold."""
    summary = aggregate(results) if summary is None else summary
    cfg = results["config"]
    sweeps = list(cfg["sweeps"])
    columns = ["clean", "affnist"] + [f"{f}_mean" for f in sweeps]
    titles = ["clean", "AffNIST-style mix"] + [
        f"{f} (mean of {', '.join(f'{v:g}' for v in cfg['sweeps'][f])})" for f in sweeps
    ]
    seeds = len(cfg["seeds"])
    lines = [
        f"Test accuracy (%), mean ± std over {seeds} seed{'s' if seeds > 1 else ''} "
        f"({'seeds ' + ', '.join(map(str, cfg['seeds']))}); best mean per column in bold. {PAPER_NUMBERS}",
        "",
    ]
    for head in cfg["model_heads"]:
        for regime in cfg["regimes"]:
            block = summary.get(head, {}).get(regime)
            if not block:
                continue
            lines.append(f"### Head `{head}`, {REGIME_TITLES[regime]}")
            lines.append("")
            lines.append("| model | " + " | ".join(titles) + " | train s |")
            lines.append("|---" * (len(titles) + 2) + "|")
            best = {c: max(block[m][c]["mean"] for m in block) for c in columns}
            for model in [m for m in MODEL_SPECS if m in block]:
                cells = [_fmt(block[model][c], np.isclose(block[model][c]["mean"], best[c])) for c in columns]
                label = MODEL_SPECS[model].label
                lines.append(
                    f"| {label} (`{model}`) | "
                    + " | ".join(cells)
                    + f" | {block[model]['train_seconds']['mean']:.0f} |"
                )
            lines.append("")
    return "\n".join(lines)


def plot_sweeps(results: dict, summary: dict, head: str, regime: str, path: Path) -> None:
    """Accuracy versus strength for each sweep (clean at the identity level), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    block = summary[head][regime]
    factors = list(cfg["sweeps"])
    ncols = 3
    nrows = math.ceil((len(factors) + 2) / ncols)  # the sweeps, the AffNIST-style bars, the legend
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.9 * nrows), squeeze=False)
    panels = list(grid.flat)
    axes = [panels[: len(factors) + 1]]
    legend_ax = panels[len(factors) + 1]
    for extra in panels[len(factors) + 2 :]:
        extra.axis("off")
    models = [m for m in MODEL_SPECS if m in block]
    cmap = plt.get_cmap("tab20" if len(models) > 10 else "tab10")
    markers = "osD^v<>pPX*h"
    for k, model in enumerate(models):
        style = dict(
            color=cmap(k), marker=markers[k % len(markers)], label=MODEL_SPECS[model].label, lw=1.5, ms=4
        )
        if MODEL_SPECS[model].group != "main":
            style["ls"] = "--"
        for ax, factor in zip(axes[0], factors, strict=False):
            identity = 1.0 if factor == "scale" else 0.0
            levels = sorted([identity] + list(cfg["sweeps"][factor]))
            names = ["clean" if lv == identity else f"{factor}@{lv:g}" for lv in levels]
            mean = np.array([block[model][n]["mean"] for n in names])
            std = np.array([block[model][n]["std"] for n in names])
            ax.plot(levels, mean, **style)
            ax.fill_between(levels, mean - std, mean + std, color=style["color"], alpha=0.12)
        bar_ax = axes[0][-1]
        bar_ax.bar(
            k,
            block[model]["affnist"]["mean"],
            yerr=block[model]["affnist"]["std"],
            color=style["color"],
            capsize=3,
        )
    for ax, factor in zip(axes[0], factors, strict=False):
        ax.set_title(f"{factor}")
        ax.set_xlabel(SWEEP_UNITS.get(factor, "strength"))
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    bar_ax = axes[0][-1]
    bar_ax.set_title("AffNIST-style mix")
    bar_ax.set_xticks(
        range(len(models)), [MODEL_SPECS[m].label for m in models], rotation=70, ha="right", fontsize=7
    )
    bar_ax.set_ylabel("test accuracy (%)")
    bar_ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0][0].get_legend_handles_labels()
    legend_ax.axis("off")
    legend_ax.legend(handles, labels, loc="center", fontsize=9, title="model (dashed: ablation/control)")
    fig.suptitle(
        f"UCI digits, head '{head}', {REGIME_TITLES[regime]} ({len(cfg['seeds'])} seed(s), mean ± std)"
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_outputs(
    results: dict, out_dir: str | Path, command: str = "", plots: bool = True
) -> dict[str, Path]:
    """Write ``digits_results.json`` (all numbers), ``digits_table.md`` and one PNG per (head, regime).

    Returns the written paths by kind.
    """
    out = Path(out_dir)
    summary = aggregate(results)
    results = dict(results, summary=summary, command=command)
    table = markdown_table(results, summary)
    header = "# Digits experiment (paper Fig. 1 on UCI handwriting)\n\n"
    if command:
        header += (
            f"Made by: `{command}` (elapsed {results['elapsed_seconds']:.0f} s, "
            f"{results.get('cpu_count')} CPUs)\n\n"
        )
    paths = {"json": out / "digits_results.json", "table": out / "digits_table.md"}
    atomic_write_text(paths["json"], json.dumps(results, indent=1, sort_keys=False) + "\n")
    atomic_write_text(paths["table"], header + table + "\n")
    if plots:
        for head in results["config"]["model_heads"]:
            for regime in results["config"]["regimes"]:
                if regime in summary.get(head, {}):
                    p = out / f"digits_{head}_{regime}.png"
                    plot_sweeps(results, summary, head, regime, p)
                    paths[f"plot_{head}_{regime}"] = p
    return paths
