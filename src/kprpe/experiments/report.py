"""Turn the digits experiment's raw job results into mean ± std tables (Markdown), a JSON file and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..files import atomic_path, atomic_write_text
from .digits_data import SWEEP_UNITS
from .digits_models import MODEL_SPECS

__all__ = [
    "aggregate",
    "markdown_table",
    "write_outputs",
    "plot_sweeps",
    "plot_learning_curves",
    "plot_keypoint_noise",
    "PAPER_NUMBERS",
    "QUICK_REFERENCE",
    "QUICK_SPREAD",
    "quick_spread_bands",
    "quick_run_notice",
]

# The full converged run the --quick numbers are compared with (same models, head and regime; 3 seeds, the
# convergence rule with a 100-epoch cap), found next to the sources in a checkout of the repository.
QUICK_GAP_WARNING = 5.0  # points of clean accuracy below the reference that mark a model as not converged
QUICK_REFERENCE = Path("docs") / "results" / "converged" / "digits_results.json"
# ... per data set: a --quick --data mnist run is compared with the calibrated MNIST run (a longer version of
# the same setup: docs/results/mnist_calibrated)
MNIST_REFERENCE = Path("docs") / "results" / "mnist_calibrated" / "digits_results.json"
QUICK_REFERENCES = {"uci": QUICK_REFERENCE, "mnist": MNIST_REFERENCE}
# How far --quick numbers move across seeds and CPU kinds (float32 kernels round differently on AVX2 and
# AVX-512, and training amplifies the difference): measured quick runs, with how they were made.
QUICK_SPREAD = Path("docs") / "results" / "quick" / "quick_spread.json"
QUICK_SPREADS = {
    "uci": QUICK_SPREAD,
    "mnist": Path("docs") / "results" / "mnist_calibrated" / "quick_spread.json",
}
# A handful of runs under-estimates a range: the band is the measured min..max widened by half its width on
# each side, and by at least this many points (one clean test digit is 0.25 point).
QUICK_SPREAD_FLOOR = 1.0

PAPER_NUMBERS = "[paper, Fig. 1] Abs-PE: 98.1% on MNIST, 77.27% on AffNIST; KP-RPE is the most robust."
REGIME_TITLES = {
    "none": "trained without augmentation",
    "mild": "trained with mild augmentation (same for every model)",
    "medium": "trained with mild augmentation and shifts up to 12.5% of the canvas (same for every model)",
    "calibrated": "trained with mild augmentation and shifts up to 14% of the canvas (same for every model)",
    "wide": "trained with mild augmentation and shifts up to 15% of the canvas (same for every model)",
    "wider": "trained with mild augmentation and shifts up to 20% of the canvas (same for every model)",
    "placed": "trained with random placement on the canvas (same for every model)",
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
        if "epochs_used" in job:
            metrics["epochs_used"] = float(job["epochs_used"])
            metrics["best_epoch"] = float(job["best_epoch"])
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


def data_names(cfg: dict) -> tuple[str, str]:
    """(data set, name of the headline transformed test set) for titles; results without ``data`` are UCI."""
    if cfg.get("data") == "mnist":
        return "real MNIST, affNIST protocol", "affNIST protocol"
    return "UCI handwriting", "AffNIST-style mix"


def markdown_table(results: dict, summary: dict | None = None) -> str:
    """One block per (head, regime): rows = models, columns = clean, AffNIST-style mix and each sweep's
    mean over its levels; best mean per column in bold."""
    summary = aggregate(results) if summary is None else summary
    cfg = results["config"]
    sweeps = list(cfg["sweeps"])
    columns = ["clean", "affnist"] + [f"{f}_mean" for f in sweeps]
    titles = ["clean", data_names(cfg)[1]] + [
        f"{f} (mean of {', '.join(f'{v:g}' for v in cfg['sweeps'][f])})" for f in sweeps
    ]
    seeds = len(cfg["seeds"])
    converge = bool(cfg.get("converge"))
    lines = [
        f"Test accuracy (%), mean ± std over {seeds} seed{'s' if seeds > 1 else ''} "
        f"({'seeds ' + ', '.join(map(str, cfg['seeds']))}); best mean per column in bold. {PAPER_NUMBERS}",
        "",
    ]
    if "epochs_used" in cfg or converge:
        from .digits import convergence_rule

        lines += [f"Training length: {convergence_rule(cfg)}.", ""]
    for head in cfg["model_heads"]:
        for regime in cfg["regimes"]:
            block = summary.get(head, {}).get(regime)
            if not block:
                continue
            lines.append(f"### Head `{head}`, {REGIME_TITLES[regime]}")
            lines.append("")
            epochs_col = converge and all("epochs_used" in block[m] for m in block)
            extra = " epochs used (best) |" if epochs_col else ""
            lines.append("| model | " + " | ".join(titles) + " | train s |" + extra)
            lines.append("|---" * (len(titles) + 2 + int(epochs_col)) + "|")
            best = {c: max(block[m][c]["mean"] for m in block) for c in columns}
            for model in [m for m in MODEL_SPECS if m in block]:
                cells = [_fmt(block[model][c], np.isclose(block[model][c]["mean"], best[c])) for c in columns]
                label = MODEL_SPECS[model].label
                row = (
                    f"| {label} (`{model}`) | "
                    + " | ".join(cells)
                    + f" | {block[model]['train_seconds']['mean']:.0f} |"
                )
                if epochs_col:
                    used, best_ep = (
                        block[model]["epochs_used"]["values"],
                        block[model]["best_epoch"]["values"],
                    )
                    row += (
                        " "
                        + ", ".join(f"{u:.0f} ({b:.0f})" for u, b in zip(used, best_ep, strict=True))
                        + " |"
                    )
                lines.append(row)
            lines.append("")
            lines += _keypoint_noise_block(block)
    return "\n".join(lines)


def _keypoint_columns(block: dict) -> list[str]:
    any_model = next(iter(block.values()))
    noise = sorted((k for k in any_model if k.startswith("kpnoise@")), key=lambda k: float(k.split("@")[1]))
    shift = sorted((k for k in any_model if k.startswith("kpshift@")), key=lambda k: float(k.split("@")[1]))
    return noise + shift


def _keypoint_noise_block(block: dict) -> list[str]:
    """Clean test accuracy with bad keypoints, for the models that read keypoints."""
    columns = _keypoint_columns(block)
    models = [m for m in MODEL_SPECS if m in block and _reads_keypoints(m)]
    if not columns or not models:
        return []
    titles = [
        f"noise σ={c.split('@')[1]} px" if c.startswith("kpnoise") else f"one moved {c.split('@')[1]} px"
        for c in columns
    ]
    lines = [
        "Clean test digits with bad keypoints (images untouched; canvas pixels):",
        "",
        "| model | clean | " + " | ".join(titles) + " |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for model in models:
        cells = [_fmt(block[model][c]) for c in ["clean", *columns]]
        lines.append(f"| {MODEL_SPECS[model].label} (`{model}`) | " + " | ".join(cells) + " |")
    return lines + [""]


def _reads_keypoints(model: str) -> bool:
    spec = MODEL_SPECS[model]
    reads = spec.marks or (
        spec.overrides.get("rel_pos") == "kprpe" and spec.overrides.get("kp_input") != "query_position"
    )
    return reads and not spec.learned_keypoints or spec.learned_keypoints


def affnist_bars(ax, bars: list[tuple[float, float]], colors: list) -> float:
    """One bar per (mean, std) on ``ax`` with its value printed, the y axis zoomed to where the bars differ
    (affNIST accuracies of 77-88% look alike from 0). Returns the axis's lower limit."""
    for k, ((mean, std), color) in enumerate(zip(bars, colors, strict=True)):
        ax.bar(k, mean, yerr=std, color=color, capsize=3)
    # a little below the lowest mean - std, down to a multiple of 5; 0 when that is close to it anyway
    low = 5 * math.floor((min((m - s for m, s in bars), default=0.0) - 2) / 5)
    low = low if low >= 20 else 0
    ax.set_ylim(low, 100)
    span = 100 - low
    for k, (mean, std) in enumerate(bars):
        # above the error bar, or inside the bar where the top of the panel leaves no room
        above = mean + std + 0.07 * span <= 100
        y = mean + std + 0.01 * span if above else mean - std - 0.01 * span
        ax.text(
            k,
            y,
            f"{mean:.1f}",
            ha="center",
            va="bottom" if above else "top",
            fontsize=7,
            bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none", alpha=0.7),
        )
    # a zoomed axis says so: bar heights no longer compare as ratios
    ax.set_ylabel(f"test accuracy (%), axis from {low}" if low else "test accuracy (%)")
    ax.grid(alpha=0.3, axis="y")
    return low


def plot_sweeps(results: dict, summary: dict, head: str, regime: str, path: Path) -> None:
    """Accuracy versus strength for each sweep (clean at the identity level), one line per model."""
    fig = sweeps_figure(results, summary, head, regime)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        _pyplot().close(fig)


def sweeps_figure(results: dict, summary: dict, head: str, regime: str):
    """The figure :func:`plot_sweeps` saves: a panel per sweep, the affNIST-protocol bars, the legend."""
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
    for ax, factor in zip(axes[0], factors, strict=False):
        ax.set_title(f"{factor}")
        ax.set_xlabel(SWEEP_UNITS.get(factor, "strength"))
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    bar_ax = axes[0][-1]
    affnist = [block[m]["affnist"] for m in models]
    affnist_bars(bar_ax, [(a["mean"], a["std"]) for a in affnist], [cmap(k) for k in range(len(models))])
    bar_ax.set_title(data_names(cfg)[1])
    bar_ax.set_xticks(
        range(len(models)), [MODEL_SPECS[m].label for m in models], rotation=70, ha="right", fontsize=7
    )
    handles, labels = axes[0][0].get_legend_handles_labels()
    legend_ax.axis("off")
    legend_ax.legend(handles, labels, loc="center", fontsize=9, title="model (dashed: ablation/control)")
    fig.suptitle(
        f"{data_names(cfg)[0]}, head '{head}', {REGIME_TITLES[regime]} "
        f"({len(cfg['seeds'])} seed(s), mean ± std)"
    )
    fig.tight_layout()
    return fig


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(results: dict, head: str, regime: str, path: Path) -> None:
    """Per job: training accuracy (dashed) and clean validation accuracy (solid) per epoch; a dot marks the
    epoch whose weights were tested."""
    plt = _pyplot()
    jobs = [j for j in results["jobs"] if j["head"] == head and j["regime"] == regime and "curve" in j]
    models = [m for m in MODEL_SPECS if any(j["model"] == m for j in jobs)]
    cmap = plt.get_cmap("tab20" if len(models) > 10 else "tab10")
    fig, (ax_val, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.6))
    for k, model in enumerate(models):
        for j in (j for j in jobs if j["model"] == model):
            curve, color = j["curve"], cmap(k)
            epochs = np.arange(1, len(curve["train_accuracy"]) + 1)
            label = (
                MODEL_SPECS[model].label
                if j["seed"] == min(x["seed"] for x in jobs if x["model"] == model)
                else None
            )
            ax_val.plot(epochs, curve["train_accuracy"], ls="--", lw=0.8, color=color, alpha=0.6)
            if curve.get("val_accuracy"):
                ax_val.plot(epochs, curve["val_accuracy"], lw=1.3, color=color, label=label)
                ax_val.plot(
                    j["best_epoch"], curve["val_accuracy"][j["best_epoch"] - 1], "o", color=color, ms=4
                )
            else:
                ax_val.lines[-1].set_label(label)
            ax_loss.plot(epochs, curve["train_loss"], lw=1.0, color=color, label=label)
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("accuracy (%)")
    ax_val.set_title("clean validation (solid; dot = tested weights), training (dashed)")
    ax_val.grid(alpha=0.3)
    ax_val.legend(fontsize=7)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_loss.grid(alpha=0.3)
    cfg = results["config"]
    fig.suptitle(
        f"Learning curves: head '{head}', {REGIME_TITLES[regime]} ({len(cfg['seeds'])} seed(s))", fontsize=10
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def plot_keypoint_noise(summary: dict, head: str, regime: str, path: Path, title: str = "") -> bool:
    """Clean test accuracy versus keypoint noise sigma (left) and with one keypoint displaced (right), for
    the models that read keypoints. Returns False (no file) when there is nothing to plot."""
    block = summary[head][regime]
    columns = _keypoint_columns(block)
    models = [m for m in MODEL_SPECS if m in block and _reads_keypoints(m)]
    if not columns or not models:
        return False
    plt = _pyplot()
    noise = [c for c in columns if c.startswith("kpnoise@")]
    shift = [c for c in columns if c.startswith("kpshift@")]
    fig, (ax_n, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("tab10")
    for k, model in enumerate(models):
        cell, color = block[model], cmap(k % 10)
        xs = [0.0] + [float(c.split("@")[1]) for c in noise]
        mean = np.array([cell[c]["mean"] for c in ["clean", *noise]])
        std = np.array([cell[c]["std"] for c in ["clean", *noise]])
        ax_n.plot(xs, mean, "o-", color=color, label=MODEL_SPECS[model].label, ms=4)
        ax_n.fill_between(xs, mean - std, mean + std, color=color, alpha=0.12)
        ds = [0.0] + [float(c.split("@")[1]) for c in shift]
        ax_s.plot(ds, [cell[c]["mean"] for c in ["clean", *shift]], "s-", color=color, ms=4)
    ax_n.set_xlabel("keypoint noise sigma (canvas pixels; digit is 16 px)")
    ax_n.set_ylabel("clean test accuracy (%)")
    ax_n.set_title("Gaussian noise on every keypoint")
    ax_s.set_xlabel("displacement of one random keypoint (pixels)")
    ax_s.set_title("one keypoint displaced")
    for ax in (ax_n, ax_s):
        ax.grid(alpha=0.3)
    ax_n.legend(fontsize=7)
    fig.suptitle(title or f"Bad keypoints: head '{head}', {REGIME_TITLES[regime]}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return True


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
    header = f"# Digits experiment (paper Fig. 1 on {data_names(results['config'])[0]})\n\n"
    if command:
        resumed = results.get("resumed_jobs", 0)
        header += (
            f"Made by: `{command}` (elapsed {results['elapsed_seconds']:.0f} s, "
            f"{results.get('cpu_count')} CPUs"
            + (
                f"; {resumed} of {len(results['jobs'])} trainings reused from an earlier sitting"
                if resumed
                else ""
            )
            + ")\n\n"
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
                    if any("curve" in j for j in results["jobs"]):
                        p = out / f"digits_{head}_{regime}_curves.png"
                        plot_learning_curves(results, head, regime, p)
                        paths[f"curves_{head}_{regime}"] = p
                    p = out / f"digits_{head}_{regime}_keypoint_noise.png"
                    if plot_keypoint_noise(summary, head, regime, p):
                        paths[f"kpnoise_{head}_{regime}"] = p
    return paths


def _find_in_checkout(relative: Path) -> Path | None:
    for root in (Path(__file__).resolve().parents[3], Path.cwd()):
        if (root / relative).is_file():
            return root / relative
    return None


def _find_reference(data: str = "uci") -> Path | None:
    return _find_in_checkout(QUICK_REFERENCES[data])


def _find_spread(data: str = "uci") -> Path | None:
    return _find_in_checkout(QUICK_SPREADS[data])


def quick_spread_bands(spread: dict) -> dict[str, dict[str, tuple[float, float, int]]]:
    """model -> metric -> (low, high, runs): the range a --quick run's accuracy is expected in, from the
    measured runs (every seed and CPU kind), widened as :data:`QUICK_SPREAD_FLOOR` says."""
    values: dict[str, dict[str, list[float]]] = {}
    for run in spread["runs"]:
        for model, acc in run["accuracy"].items():
            for metric, value in acc.items():
                values.setdefault(model, {}).setdefault(metric, []).append(float(value))
    bands: dict[str, dict[str, tuple[float, float, int]]] = {}
    for model, by_metric in values.items():
        for metric, vals in by_metric.items():
            lo, hi = min(vals), max(vals)
            widen = max(QUICK_SPREAD_FLOOR, (hi - lo) / 2)
            bands.setdefault(model, {})[metric] = (lo - widen, hi + widen, len(vals))
    return bands


def quick_run_notice(results: dict, wall_seconds: float) -> str:
    """What a ``--quick`` run is and how far its numbers are from the longer reference run."""
    cfg = results["config"]
    jobs = results["jobs"]
    if cfg.get("converge"):
        schedule = f"the convergence rule capped at {cfg['max_epochs']} epochs (patience {cfg['patience']})"
        epochs = "Epochs used (best): " + ", ".join(
            f"{MODEL_SPECS[j['model']].label} {j['epochs_used']} ({j['best_epoch']}, {j['stop_reason']})"
            for j in jobs
        )
    else:
        schedule = f"{cfg['epochs']} epochs each, cosine schedule from learning rate {cfg['lr']:g}"
        epochs = (
            "Epochs: a fixed short schedule; the reference run trained longer (the gaps below show what it "
            "costs)."
        )
    data = cfg.get("data", "uci")
    what = "real MNIST under the affNIST protocol" if data == "mnist" else "the UCI digits"
    lines = [
        "=" * 100,
        f"SHORT RUN (--quick) on {what}: {_count(len(cfg['seeds']), 'seed')}, {len(jobs)} trainings, "
        f"{schedule}, "
        f"{wall_seconds:.0f} s wall on {results.get('cpu_count')} CPUs.",
        epochs,
    ]
    ref_path = _find_reference(data)
    if ref_path is None:
        lines.append(
            f"No reference results found ({QUICK_REFERENCES[data]} is in the source repository): see "
            "docs/experiments.md for the longer run's numbers."
        )
        return "\n".join(lines + ["=" * 100])
    ref = json.loads(ref_path.read_text(encoding="utf-8"))
    ref_summary = ref.get("summary") or aggregate(ref)
    ref_cfg = ref["config"]
    if ref_cfg.get("converge"):
        ref_schedule = f"cap {ref_cfg.get('max_epochs')} epochs"
    else:  # a fixed schedule (the calibrated MNIST run): its length and size are what the quick run shortens
        train = f"{ref_cfg['train_limit']:,} training digits" if ref_cfg.get("train_limit") else "every digit"
        ref_schedule = f"{ref_cfg['epochs']} epochs, {train}"
    lines.append(
        f"Reference: {'/'.join(ref_path.parts[-4:])} ({_count(len(ref_cfg['seeds']), 'seed')}, "
        f"{ref_schedule}, "
        f"made by `{ref.get('command', '?')}`). Quick minus reference, in points:"
    )
    mix = "affNIST protocol" if data == "mnist" else "AffNIST-style"  # the mix of random affines, named
    lines.append(f"  {'model':<40} {'clean (quick / ref)':>26} {mix + ' (quick / ref)':>30}")
    quick_summary = aggregate(results)
    for head, by_regime in quick_summary.items():
        for regime, by_model in by_regime.items():
            for model, cell in by_model.items():
                ref_cell = ref_summary.get(head, {}).get(regime, {}).get(model)
                if ref_cell is None:
                    lines.append(f"  {MODEL_SPECS[model].label:<40} (not in the reference run)")
                    continue
                parts = []
                for metric in ("clean", "affnist"):
                    q, r = cell[metric]["mean"], ref_cell[metric]
                    parts.append(f"{q:5.1f} / {r['mean']:5.1f} ± {r['std']:3.1f} ({q - r['mean']:+5.1f})")
                lines.append(f"  {MODEL_SPECS[model].label:<40} {parts[0]:>26} {parts[1]:>30}")
    spread_path = _find_spread(data)
    if spread_path is not None and _is_default_quick(cfg):
        spread = json.loads(spread_path.read_text(encoding="utf-8"))
        lines += _spread_lines(spread, quick_summary, ref_summary, spread_path, mix)
    else:  # another schedule or size than the measured one: only this run's own gaps can be judged
        if spread_path is None and _is_default_quick(cfg):
            lines.append(
                f"No measured spread of quick runs on this data set ({QUICK_SPREADS[data]}): the gaps above "
                "cannot be told apart from seed-to-seed and CPU-to-CPU variation."
            )
        behind = [
            (model, ref_summary[h][r][model]["clean"]["mean"] - cell["clean"]["mean"])
            for h, by_regime in quick_summary.items()
            for r, by_model in by_regime.items()
            for model, cell in by_model.items()
            if model in ref_summary.get(h, {}).get(r, {})
        ]
        for model, gap in behind:
            if gap > QUICK_GAP_WARNING:
                lines.append(
                    f"WARNING: {MODEL_SPECS[model].label} is {gap:.1f} points below its reference clean "
                    "accuracy: it has not converged in this short run; do not rank it from these numbers."
                )
    for h, by_regime in ref_summary.items():
        for r, by_model in by_regime.items():
            if r not in quick_summary.get(h, {}):  # only the blocks the quick run trained
                continue
            ranked = sorted(by_model, key=lambda m: -by_model[m]["affnist"]["mean"])
            lines.append(
                f"Reference ranking on the {mix if data == 'mnist' else mix + ' mix'} (head {h}, {r} aug.): "
                + ", ".join(f"{MODEL_SPECS[m].label} {by_model[m]['affnist']['mean']:.1f}" for m in ranked)
            )
    capped = sum(j.get("stop_reason") == "max_epochs" for j in ref.get("jobs", []))
    if capped:  # a reference that did not converge must not be called converged
        lines.append(
            f"Read model comparisons from the reference run (more seeds, longer), but {capped} of its "
            f"{len(ref['jobs'])} trainings ended at the epoch cap, not at a plateau: they are not converged."
        )
    elif ref_cfg.get("converge"):
        lines.append("Read model comparisons from the reference run (more seeds, trained to its plateau).")
    else:
        lines.append("Read model comparisons from the reference run (more seeds, longer, on more digits).")
    return "\n".join(lines + ["=" * 100])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _is_default_quick(cfg: dict) -> bool:
    """Whether this run is the measured --quick run (same schedule and sizes), so its spread applies."""
    from .digits import quick_config

    data = cfg.get("data", "uci")  # each data set has its own measured spread
    default = quick_config(data=data).to_dict()
    same = ("epochs", "lr", "width", "depth", "heads", "patch", "canvas", "train_limit", "test_limit")
    same += ("affnist_draws",)
    return not cfg.get("converge") and all(cfg.get(k) == default.get(k) for k in same)


def _spread_lines(
    spread: dict, quick_summary: dict, ref_summary: dict, path: Path, mix: str = "AffNIST-style"
) -> list[str]:
    """The measured spread of --quick numbers, a flag for each number outside it, and the models that no
    measured quick run brings within QUICK_GAP_WARNING points of the reference (not converged by design)."""
    bands = quick_spread_bands(spread)
    runs = spread["runs"]
    kinds = sorted({run["cpu"] for run in runs})
    lines = [
        f"Expected range (measured: {len(runs)} quick runs over seeds {sorted({r['seed'] for r in runs})} on "
        f"{len(kinds)} CPU kind(s), {'/'.join(path.parts[-4:])}): the same seed repeats exactly on one "
        "machine, but float32 rounds differently on other CPUs (AVX2 vs AVX-512) and training amplifies it."
    ]
    outside, short = [], []
    for h, by_regime in quick_summary.items():
        for r, by_model in by_regime.items():
            for model, cell in by_model.items():
                band = bands.get(model)
                if band is None:
                    continue
                label = MODEL_SPECS[model].label
                text = []
                for metric, name in (("clean", "clean"), ("affnist", mix)):
                    lo, hi, _ = band[metric]
                    value = cell[metric]["mean"]
                    text.append(f"{name} {lo:.1f}-{hi:.1f}")
                    if not lo <= value <= hi:
                        outside.append(f"{label} {name} {value:.1f} (expected {lo:.1f}-{hi:.1f})")
                lines.append(f"  {label:<40} {', '.join(text)}")
                ref_cell = ref_summary.get(h, {}).get(r, {}).get(model)
                if ref_cell and ref_cell["clean"]["mean"] - band["clean"][1] > QUICK_GAP_WARNING:
                    short.append(label)
    for label in short:
        lines.append(
            f"NOT CONVERGED BY DESIGN: every measured quick run of {label} is over {QUICK_GAP_WARNING:g} "
            "points below its reference clean accuracy; do not rank it from these numbers."
        )
    for item in outside:
        lines.append(
            f"WARNING: {item} lies outside the spread measured across seeds and CPU kinds: something other "
            "than float rounding differs (data, settings, installed versions or code)."
        )
    return lines
