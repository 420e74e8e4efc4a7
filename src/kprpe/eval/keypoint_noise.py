"""How much a model depends on its landmarks: embeddings and verification accuracy with perturbed keypoints.

For every face of an aligned set the clean keypoints (landmark file, landmark backend or template, as in
``kprpe eval verify``) are perturbed in two ways, with fixed random draws (``seed``):

- Gaussian noise of standard deviation ``sigma`` pixels (in the face crop, 112 px) on every keypoint — the
  same unit draws scaled by each sigma, so the curve is smooth in sigma;
- one landmark (a random one per face, or ``displace_index``) moved by ``d`` pixels in a random direction —
  a detector that gets one point wrong, as on profile faces.

The images are never touched. Reported per condition: the cosine between each face's embedding and its
clean-keypoint embedding (mean, 5th percentile, minimum) and the 10-fold verification accuracy. A model
that ignores keypoints gives cosine 1 everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .binfile import read_verification_bin
from .embedding import FaceSource, embed_faces
from .verification import bin_face_source, pair_scores, resolve_keypoint_source, verification_metrics

__all__ = [
    "DEFAULT_SIGMAS",
    "DEFAULT_DISPLACEMENTS",
    "perturbed_source",
    "keypoint_noise_study",
    "markdown_keypoint_noise",
    "plot_keypoint_noise",
    "write_keypoint_noise_outputs",
]

DEFAULT_SIGMAS = (0.0, 1.0, 2.0, 4.0, 8.0)
DEFAULT_DISPLACEMENTS = (8.0, 16.0)


def perturbed_source(source: FaceSource, offsets_px: np.ndarray, tag: str) -> FaceSource:
    """``source`` whose keypoints are moved by ``offsets_px[i]`` (pixels, ``(N, K, 2)``) for face ``i``."""
    if offsets_px.shape[0] != source.count:
        raise ValueError(f"{offsets_px.shape[0]} keypoint offsets for {source.count} faces")

    def load(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        images, keypoints = source.load(start, stop)
        height, width = images.shape[1:3]
        scale = np.array([width, height], dtype=np.float64)
        moved = np.asarray(keypoints, dtype=np.float64) + offsets_px[start:stop] / scale
        return images, moved.astype(np.float32)

    return FaceSource(count=source.count, load=load, fingerprint=f"{source.fingerprint}|{tag}")


def _condition(
    kind: str, level: float, clean: np.ndarray, emb: np.ndarray, issame: np.ndarray, n_folds: int
) -> dict:
    cosine = np.einsum("ij,ij->i", clean.astype(np.float64), emb.astype(np.float64))
    scores = pair_scores(emb, np.arange(0, len(emb), 2), np.arange(1, len(emb), 2))
    metrics = verification_metrics(scores, issame, n_folds=n_folds)
    kfold = metrics.get("kfold", {})
    return dict(
        kind=kind,
        level=float(level),
        cosine_mean=float(cosine.mean()),
        cosine_p05=float(np.percentile(cosine, 5)),
        cosine_min=float(cosine.min()),
        accuracy_mean=kfold.get("accuracy_mean"),
        accuracy_std=kfold.get("accuracy_std"),
        auc=metrics["auc"],
    )


def keypoint_noise_study(
    handle,
    bin_paths: Sequence[str | os.PathLike],
    settings,
    *,
    keypoint_source: str = "auto",
    landmarks: Sequence[str | os.PathLike | None] | None = None,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    displacements: Sequence[float] = DEFAULT_DISPLACEMENTS,
    displace_index: int | None = None,
    seed: int = 0,
) -> dict:
    """Embedding cosine and verification accuracy versus keypoint noise on ``.bin`` sets.

    ``handle`` returns the model when called (:class:`kprpe.eval.runs.ModelHandle`); ``settings`` is an
    :class:`kprpe.eval.runs.EvalSettings` (flip, batch size, device, folds). Sigma 0 is always included.
    """
    sigmas = sorted({0.0, *(float(s) for s in sigmas)})
    if any(s < 0 for s in sigmas) or any(d <= 0 for d in displacements):
        raise ValueError(
            f"sigmas must be >= 0 and displacements > 0, got {list(sigmas)} and {list(displacements)}"
        )
    landmarks = list(landmarks) if landmarks else [None] * len(bin_paths)
    if len(landmarks) != len(bin_paths):
        raise ValueError(f"{len(landmarks)} landmark files for {len(bin_paths)} .bin sets")
    model = handle()
    sets, kinds = {}, set()
    backend = getattr(settings, "landmark_backend", None)
    for path, lm in zip(bin_paths, landmarks, strict=True):
        vb = read_verification_bin(path)
        kind = resolve_keypoint_source(keypoint_source, lm, backend)
        kinds.add(kind)
        source = bin_face_source(vb, path, kind, lm, backend=backend)
        n = source.count
        num_kp = source.load(0, 1)[1].shape[1]
        if displace_index is not None and not 0 <= displace_index < num_kp:
            raise ValueError(f"displace_index must be in [0, {num_kp - 1}], got {displace_index}")
        rng = np.random.default_rng(seed)
        unit = rng.standard_normal((n, num_kp, 2))
        which = rng.integers(0, num_kp, n) if displace_index is None else np.full(n, displace_index)
        angle = rng.uniform(0.0, 2.0 * np.pi, n)
        direction = np.stack([np.cos(angle), np.sin(angle)], -1)

        def embed(src: FaceSource, label: str, set_name: str = vb.name) -> np.ndarray:
            return embed_faces(
                model,
                src,
                flip=settings.flip,
                batch_size=settings.batch_size,
                device=settings.device,
                progress=settings.progress,
                desc=f"{set_name} {label}",
            )[0]

        clean = embed(source, "clean")
        conditions = []
        for sigma in sigmas:
            emb = (
                clean
                if sigma == 0
                else embed(perturbed_source(source, sigma * unit, f"noise{sigma:g}"), f"sigma={sigma:g}")
            )
            conditions.append(_condition("noise", sigma, clean, emb, vb.issame, settings.n_folds))
        for dist in displacements:
            offsets = np.zeros((n, num_kp, 2))
            offsets[np.arange(n), which] = dist * direction
            emb = embed(perturbed_source(source, offsets, f"displace{dist:g}"), f"one moved {dist:g}px")
            conditions.append(_condition("displace", dist, clean, emb, vb.issame, settings.n_folds))
        sets[vb.name] = dict(
            num_faces=n, num_pairs=int(vb.issame.size), keypoint_source=kind, conditions=conditions
        )
    return dict(
        protocol="keypoint-noise study",
        weights=str(handle.weights),
        flip=settings.flip,
        keypoint_source=kinds.pop() if len(kinds) == 1 else sorted(kinds),
        seed=seed,
        displaced_landmark="random per face" if displace_index is None else int(displace_index),
        units="pixels of the aligned crop (112 px for the standard face crop)",
        sets=sets,
    )


def markdown_keypoint_noise(results: dict) -> str:
    lines = [
        f"# Keypoint-noise study — {Path(str(results['weights'])).name}",
        "",
        f"Keypoints: {results['keypoint_source']}; perturbations in {results['units']}; "
        f"flip: {results['flip']}; seed {results['seed']}; displaced landmark: "
        f"{results['displaced_landmark']}.",
        "",
    ]
    for name, r in results["sets"].items():
        lines += [
            f"## {name} ({r['num_pairs']} pairs)",
            "",
            "| keypoints | cosine to clean (mean) | cosine (5th pct.) | accuracy (10-fold, %) | AUC |",
            "|---|---|---|---|---|",
        ]
        for c in r["conditions"]:
            what = (
                "clean"
                if c["kind"] == "noise" and c["level"] == 0
                else (
                    f"noise σ = {c['level']:g} px"
                    if c["kind"] == "noise"
                    else f"one landmark moved {c['level']:g} px"
                )
            )
            acc = (
                "n/a"
                if c["accuracy_mean"] is None
                else f"{100 * c['accuracy_mean']:.2f} ± {100 * c['accuracy_std']:.2f}"
            )
            lines.append(
                f"| {what} | {c['cosine_mean']:.4f} | {c['cosine_p05']:.4f} | {acc} | {c['auc']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_keypoint_noise(results: dict, path: str | os.PathLike) -> Path:
    """Cosine to the clean embedding and accuracy versus noise sigma (lines) and one displaced landmark
    (squares, at its displacement), one colour per set."""
    from .report import _pyplot, _save

    plt = _pyplot()
    fig, (ax_cos, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for k, (name, r) in enumerate(results["sets"].items()):
        color = plt.get_cmap("tab10")(k % 10)
        for kind, style in (("noise", "o-"), ("displace", "s:")):
            cs = [c for c in r["conditions"] if c["kind"] == kind]
            if kind == "displace":
                cs = [next(c for c in r["conditions"] if c["kind"] == "noise" and c["level"] == 0)] + cs
                cs = [dict(c, level=0.0) if c["kind"] == "noise" else c for c in cs]
            xs = [c["level"] for c in cs]
            label = f"{name}: {'noise σ' if kind == 'noise' else 'one landmark moved'}"
            ax_cos.plot(xs, [c["cosine_mean"] for c in cs], style, color=color, label=label, ms=4)
            if all(c["accuracy_mean"] is not None for c in cs):
                ax_acc.plot(xs, [100 * c["accuracy_mean"] for c in cs], style, color=color, label=label, ms=4)
    ax_cos.set_ylabel("cosine to the clean-keypoint embedding (mean)")
    ax_acc.set_ylabel("verification accuracy (%)")
    for ax in (ax_cos, ax_acc):
        ax.set_xlabel("pixels in the crop (σ of the noise / distance moved)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Keypoint noise — {Path(str(results['weights'])).name}", fontsize=10)
    return _save(fig, path)


def write_keypoint_noise_outputs(out: str | os.PathLike, results: dict) -> dict[str, Path]:
    from ..files import atomic_write_text, write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(
        json=write_json(out / "results.json", results),
        summary=atomic_write_text(out / "summary.md", markdown_keypoint_noise(results)),
        plot=plot_keypoint_noise(results, out / "keypoint_noise.png"),
    )
    return paths
