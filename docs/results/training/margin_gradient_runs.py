"""Loss curves of the example config with each margin gradient (docs/training.md, "How the margin heads train").

Run from the repository root (about 2-3 minutes on 2 CPU cores):

    python docs/results/training/margin_gradient_runs.py

Trains ``configs/example_tiny.yaml`` (AdaFace) and the same config with an ArcFace head, each with
``head.margin_gradient`` = straight_through and = exact, on the synthetic example data (made in a temporary
folder), then writes ``margin_gradient.png`` and ``margin_gradient.json`` (the logged curves) next to this file.
``--plot-only`` redraws the figure from ``margin_gradient.json`` without training.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CONFIG = ROOT / "configs" / "example_tiny.yaml"
STEPS = 200
RUNS = [(head, gradient) for head in ("adaface", "arcface") for gradient in ("straight_through", "exact")]


def kprpe(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "kprpe", *args], check=True, cwd=ROOT)


def read_log(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in ("step", "loss", "grad_norm", "norm_mean")}


def target_slope(head: str, gradient: str, target_cos):
    """``d target logit / d cos / s`` of one head at the given target cosines. AdaFace: a low-quality sample
    (feature norm 3 standard deviations below the mean: scaler -1, the full angular margin m)."""
    import torch

    from kprpe.train.heads import build_margin

    cos = torch.stack([target_cos, torch.zeros_like(target_cos)], dim=1).double().requires_grad_(True)
    labels = torch.zeros(len(target_cos), dtype=torch.long)
    margin = build_margin(head, scale=1.0, gradient=gradient).double().eval()
    if head == "adaface":
        margin.batch_mean.fill_(20.0)
        margin.batch_std.fill_(5.0)
    margin(cos, labels, torch.full((len(target_cos),), 5.0, dtype=torch.float64))[:, 0].sum().backward()
    return cos.grad[:, 0].tolist()


def train_all() -> dict[str, dict]:
    curves: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "example_data"
        kprpe("make-example-data", "-o", str(data))
        for head, gradient in RUNS:
            out = Path(tmp) / f"{head}_{gradient}"
            start = time.perf_counter()
            kprpe("train", str(CONFIG), f"data.train={data / 'train.rec'}", f"data.landmarks={data / 'landmarks.csv'}",
                  f"head.type={head}", f"head.margin_gradient={gradient}", f"train.max_steps={STEPS}",
                  "train.log_every=5", "train.checkpoint_every=0", "train.progress=false", "train.tensorboard=false",
                  f"train.output_dir={out}")
            curves[f"{head} {gradient}"] = dict(read_log(out / "train_log.csv"), seconds=time.perf_counter() - start)
    return curves


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from kprpe.files import atomic_path, atomic_write_text

    if "--plot-only" in sys.argv[1:]:
        curves = json.loads((HERE / "margin_gradient.json").read_text())
    else:
        curves = train_all()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    styles = {"straight_through": "-", "exact": "--"}
    colours = {"adaface": "tab:blue", "arcface": "tab:red"}
    for name, c in curves.items():
        head, gradient = name.split()
        kw = dict(ls=styles[gradient], color=colours[head], label=name)
        axes[0].plot(c["step"], c["loss"], **kw)
        axes[1].plot(c["step"], c["grad_norm"], **kw)
        axes[2].plot(c["step"], c["norm_mean"], **kw)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss (log scale)")
    axes[1].set_yscale("log")
    axes[1].set_title("global grad norm before clipping (clip 5)")
    axes[2].set_title("mean feature norm")
    target_cos = torch.linspace(0.5, 1.0 - 1e-6, 400)
    x = (1.0 - target_cos).tolist()
    for head in ("adaface", "arcface"):
        for gradient in ("straight_through", "exact"):
            label = f"{head} {gradient}" + (" (norm -3 std)" if head == "adaface" else "")
            axes[3].plot(x, target_slope(head, gradient, target_cos), ls=styles[gradient], color=colours[head],
                         label=label)
    axes[3].legend(fontsize=8)
    axes[3].set_xscale("log")
    axes[3].set_yscale("log")
    axes[3].set_title("d target logit / d cos, / s")
    axes[3].set_xlabel("1 - target cosine (easier to the left)")
    axes[3].grid(alpha=0.3)
    for ax in axes[:3]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"configs/example_tiny.yaml, {STEPS} steps, s=16: straight-through (official) vs exact margin gradient")
    fig.tight_layout()
    with atomic_path(HERE / "margin_gradient.png") as tmp_png:
        fig.savefig(tmp_png, dpi=90, format="png")
    plt.close(fig)
    atomic_write_text(HERE / "margin_gradient.json", json.dumps(curves, indent=1) + "\n")
    for name, c in curves.items():
        print(f"{name:28s} loss {c['loss'][0]:.3f} -> {c['loss'][-1]:.4f}  grad_norm max {max(c['grad_norm']):.2f}"
              f"  ({c['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
