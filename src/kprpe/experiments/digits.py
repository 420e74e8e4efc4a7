"""Paper Fig. 1 on real handwriting: train a shallow ViT on centred digits, test under unseen affines.

:func:`run_digits` trains every (regime, head, model, seed) job, evaluates each on the same fixed test
sets and returns the raw results; :mod:`kprpe.experiments.report` turns them into a table, JSON and plots.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .digits_data import (
    AFFNIST_MIX,
    SWEEPS,
    TRAIN_AUGMENTATION,
    DigitsCanvas,
    TestSet,
    build_test_sets,
    keypoint_marks,
    load_canvas_digits,
    sample_affines,
    split_indices,
    transform_keypoints,
    warp_images,
)
from .digits_models import (
    DEFAULT_MODELS,
    MODEL_SPECS,
    QUICK_MODELS,
    ModelSpec,
    build_classifier,
    resolve_models,
)

__all__ = ["REGIMES", "DigitsConfig", "quick_config", "Protocol", "build_protocol", "run_job", "run_digits"]

REGIMES = ("none", "mild")  # training augmentation: none, or TRAIN_AUGMENTATION for every model alike
HEADS = ("flatten", "mean")


@dataclass
class DigitsConfig:
    """Everything that defines a run (saved in the results JSON)."""

    canvas: int = 32
    digit: int = 16
    keypoint_box: str = "ink"  # ink: tight box of the ink; frame: the fixed box the digit was pasted into
    patch: int = 4
    width: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    grad_clip: float = 5.0
    seeds: tuple[int, ...] = (0, 1, 2)
    regimes: tuple[str, ...] = REGIMES
    models: tuple[str, ...] = DEFAULT_MODELS  # all trained with the official flatten-all-tokens head
    # the ablation/control models (group != main) are trained only in these regimes (CPU budget)
    ablation_regimes: tuple[str, ...] = ("mild",)
    # also trained with a mean-pooling head (which makes a relative-only encoding translation-invariant)
    mean_head_models: tuple[str, ...] = ("abs", "kprpe", "kprpe_noabs")
    mean_head_regimes: tuple[str, ...] = ("mild",)
    test_fraction: float = 0.22
    split_seed: int = 0
    test_seed: int = 1234
    test_draws: int = 1  # random transforms per test digit for each sweep level
    affnist_draws: int = 3  # ... and for the AffNIST-style mix (the headline number)
    train_limit: int = 0  # > 0: use only this many training digits (tests, smoke runs)
    test_limit: int = 0  # > 0: use only this many test digits
    sweeps: dict = field(default_factory=lambda: dict(SWEEPS))
    workers: int = 2
    threads: int = 1  # torch threads per worker

    def validate(self) -> DigitsConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid digits config: {msg}")

        need(self.canvas % self.patch == 0, f"canvas {self.canvas} is not a multiple of patch {self.patch}")
        need(8 <= self.digit <= self.canvas, f"digit size {self.digit} must be in [8, canvas={self.canvas}]")
        need(
            self.keypoint_box in ("ink", "frame"),
            f"keypoint_box must be ink or frame, got {self.keypoint_box!r}",
        )
        need(self.width % self.heads == 0, f"width {self.width} is not divisible by heads {self.heads}")
        for name in (
            "epochs",
            "batch_size",
            "depth",
            "heads",
            "width",
            "test_draws",
            "affnist_draws",
            "workers",
            "threads",
        ):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(len(self.seeds) > 0, "at least one seed is needed")
        need(
            all(r in REGIMES for r in self.regimes) and self.regimes,
            f"regimes must be a non-empty subset of {REGIMES}, got {self.regimes}",
        )
        resolve_models(self.models)
        for name in ("mean_head_regimes", "ablation_regimes"):
            need(
                all(r in REGIMES for r in getattr(self, name)),
                f"{name} must be a subset of {REGIMES}, got {getattr(self, name)}",
            )
        if self.mean_head_models:
            resolve_models(self.mean_head_models)
        need(self.warmup_epochs >= 0, "warmup_epochs must be >= 0")
        return self

    @property
    def model_heads(self) -> tuple[str, ...]:
        has_mean = self.mean_head_models and set(self.mean_head_regimes) & set(self.regimes)
        return ("flatten", "mean") if has_mean else ("flatten",)

    def jobs(self) -> list[tuple[str, str, str, int]]:
        """(model, regime, head, seed) for every training run, slowest models first (packs workers better)."""

        def wanted(model: str, regime: str) -> bool:
            return MODEL_SPECS[model].group == "main" or regime in self.ablation_regimes

        runs = [
            (m, r, "flatten", s)
            for r in self.regimes
            for s in self.seeds
            for m in self.models
            if wanted(m, r)
        ]
        mean_regimes = [r for r in self.regimes if r in self.mean_head_regimes]
        runs += [(m, r, "mean", s) for r in mean_regimes for s in self.seeds for m in self.mean_head_models]
        slow_first = {"irpe": 0, "kprpe_mlp": 1}
        return sorted(runs, key=lambda j: slow_first.get(j[0], 2))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sweeps"] = {k: list(v) for k, v in self.sweeps.items()}
        d["model_heads"] = list(self.model_heads)
        return d


def quick_config(**overrides) -> DigitsConfig:
    """The ``--quick`` run: one seed, the main models, fewer epochs (CI and the README demo)."""
    values = dict(seeds=(0,), epochs=5, models=QUICK_MODELS, mean_head_models=(), affnist_draws=2)
    values.update(overrides)
    return DigitsConfig(**values)


# ---------------------------------------------------------------------------------------------- protocol
@dataclass
class Protocol:
    """Data shared by every job: the centred digits, the fixed split, and the fixed test sets."""

    data: DigitsCanvas
    train_idx: np.ndarray
    test_idx: np.ndarray
    test_sets: list[TestSet]


def build_protocol(cfg: DigitsConfig) -> Protocol:
    """Deterministic in the config's seeds: every worker that builds it gets the same arrays."""
    data = load_canvas_digits(cfg.canvas, cfg.digit, cfg.keypoint_box)
    train_idx, test_idx = split_indices(data.labels, cfg.test_fraction, cfg.split_seed)
    if cfg.train_limit:
        train_idx = train_idx[
            np.random.default_rng(cfg.split_seed).permutation(len(train_idx))[: cfg.train_limit]
        ]
    if cfg.test_limit:
        test_idx = test_idx[
            np.random.default_rng(cfg.split_seed + 1).permutation(len(test_idx))[: cfg.test_limit]
        ]
    test_sets = build_test_sets(
        data,
        test_idx,
        seed=cfg.test_seed,
        draws=cfg.test_draws,
        affnist_draws=cfg.affnist_draws,
        sweeps=cfg.sweeps,
    )
    return Protocol(data, train_idx, test_idx, test_sets)


def to_tensors(
    images: np.ndarray, keypoints: np.ndarray, canvas: int, marks: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs: images ``(N, C, S, S)`` in [-1, 1] (C = 2 with Abs-PE*'s marks) and keypoints
    ``(N, 5, 2)`` normalised by the canvas size."""
    x = images[:, None]
    if marks:
        x = np.concatenate([x, keypoint_marks(keypoints, canvas)[:, None]], axis=1)
    return torch.from_numpy(x * 2.0 - 1.0).float(), torch.from_numpy(keypoints / canvas).float()


# ---------------------------------------------------------------------------------------------- one job
def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, spec: ModelSpec, test_sets: list[TestSet], canvas: int, batch: int = 64
) -> dict[str, float]:
    """Accuracy (%) on every test set (small batches: KP-RPE's bias gather slows down sharply with large
    ones)."""
    model.eval()
    out = {}
    for ts in test_sets:
        x, kp = to_tensors(ts.images, ts.keypoints, canvas, spec.marks)
        correct = 0
        for i in range(0, len(x), batch):
            pred = model(x[i : i + batch], kp[i : i + batch]).argmax(-1)
            correct += int((pred == torch.from_numpy(ts.labels[i : i + batch])).sum())
        out[ts.name] = 100.0 * correct / len(x)
    return out


def run_job(cfg: DigitsConfig, proto: Protocol, model_name: str, regime: str, head: str, seed: int) -> dict:
    """Train one model with one seed in one regime, then test it on every test set."""
    spec = MODEL_SPECS[model_name]
    torch.manual_seed(seed)
    model = build_classifier(
        spec,
        canvas=cfg.canvas,
        patch=cfg.patch,
        width=cfg.width,
        depth=cfg.depth,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        head=head,
    )
    # The data stream (order and augmentation draws) depends on the seed only: identical for every model.
    rng = np.random.default_rng(10_000 + seed)
    images = proto.data.images[proto.train_idx]
    labels = torch.from_numpy(proto.data.labels[proto.train_idx])
    keypoints = proto.data.keypoints[proto.train_idx]
    ink_boxes = proto.data.ink_boxes[proto.train_idx]
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = time.perf_counter()
    step, loss_sum, correct, seen = 0, 0.0, 0, 0
    model.train()
    for epoch in range(cfg.epochs):
        if regime == "mild":
            mats = sample_affines(ink_boxes, cfg.canvas, TRAIN_AUGMENTATION, rng)
            ep_images, ep_kp = (
                warp_images(images, mats),
                transform_keypoints(keypoints, mats).astype(np.float32),
            )
        else:
            ep_images, ep_kp = images, keypoints
        x_all, kp_all = to_tensors(ep_images, ep_kp, cfg.canvas, spec.marks)
        order = torch.from_numpy(rng.permutation(len(images)))
        last = epoch == cfg.epochs - 1
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm in the head needs two samples
                continue
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, cfg.warmup_epochs * steps_per_epoch, cfg.lr)
            logits = model(x_all[idx], kp_all[idx])
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            if last:
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(-1) == labels[idx]).sum())
                seen += len(idx)
    train_seconds = time.perf_counter() - start
    acc = evaluate(model, spec, proto.test_sets, cfg.canvas)
    return dict(
        model=model_name,
        regime=regime,
        head=head,
        seed=seed,
        parameters=sum(p.numel() for p in model.parameters()),
        train_seconds=round(train_seconds, 2),
        eval_seconds=round(time.perf_counter() - start - train_seconds, 2),
        final_train_loss=loss_sum / max(seen, 1),
        final_train_accuracy=100.0 * correct / max(seen, 1),
        accuracy=acc,
    )


# ---------------------------------------------------------------------------------------------- all jobs
_WORKER: dict = {}


def _worker_init(cfg_dict: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    cfg_dict = dict(cfg_dict)
    cfg_dict.pop("model_heads", None)  # derived, not a field
    cfg_dict["sweeps"] = {k: tuple(v) for k, v in cfg_dict["sweeps"].items()}
    for key in ("seeds", "regimes", "models", "mean_head_models", "mean_head_regimes", "ablation_regimes"):
        cfg_dict[key] = tuple(cfg_dict[key])
    cfg = DigitsConfig(**cfg_dict)
    _WORKER["cfg"], _WORKER["proto"] = cfg, build_protocol(cfg)


def _worker_job(job: tuple[str, str, str, int]) -> dict:
    return run_job(_WORKER["cfg"], _WORKER["proto"], *job)


def run_digits(cfg: DigitsConfig, progress: bool = True) -> dict:
    """Run every job (in ``cfg.workers`` processes with ``cfg.threads`` torch threads each) and return
    ``{"config", "protocol", "jobs", "elapsed_seconds"}``."""
    from tqdm.auto import tqdm

    cfg.validate()
    start = time.perf_counter()
    jobs = cfg.jobs()
    results: list[dict] = []
    bar = tqdm(total=len(jobs), desc="digits: training", unit="model", disable=not progress)
    if cfg.workers == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            proto = build_protocol(cfg)
            for job in jobs:
                bar.set_postfix_str(f"{job[0]} {job[1]} seed {job[3]}")
                results.append(run_job(cfg, proto, *job))
                bar.update()
        finally:
            torch.set_num_threads(previous)
    else:
        import multiprocessing as mp

        proto = None
        # spawn: a fresh interpreter per worker (forking a process with torch threads is unsafe)
        with ProcessPoolExecutor(
            cfg.workers,
            mp_context=mp.get_context("spawn"),
            initializer=_worker_init,
            initargs=(cfg.to_dict(), cfg.threads),
        ) as pool:
            futures = {pool.submit(_worker_job, job): job for job in jobs}
            for fut in as_completed(futures):
                results.append(fut.result())
                job = futures[fut]
                bar.set_postfix_str(f"done {job[0]} {job[1]} seed {job[3]}")
                bar.update()
    bar.close()
    if proto is None:
        proto = build_protocol(cfg)
    return dict(
        config=cfg.to_dict(),
        protocol=describe_protocol(cfg, proto),
        jobs=sorted(
            results, key=lambda r: (r["head"], r["regime"], list(MODEL_SPECS).index(r["model"]), r["seed"])
        ),
        elapsed_seconds=round(time.perf_counter() - start, 1),
        cpu_count=os.cpu_count(),
    )


def describe_protocol(cfg: DigitsConfig, proto: Protocol) -> dict:
    """What was trained and tested, in words and sizes (kept in the JSON next to the numbers)."""
    return dict(
        data="scikit-learn load_digits (the test part of the UCI ML hand-written digits: 1,797 8x8 images by "
             "13 writers)",
        canvas=f"{cfg.digit}x{cfg.digit} digit (bicubic upsampling) centred on a {cfg.canvas}x{cfg.canvas} "
               "canvas",
        keypoints="4 corners + centre of the digit's "
                  f"{'ink bounding box' if cfg.keypoint_box == 'ink' else 'paste frame'} in the "
                  "untransformed image, mapped through the image's affine",
        train_digits=int(len(proto.train_idx)),
        test_digits=int(len(proto.test_idx)),
        draws_per_test_digit=dict(affnist=cfg.affnist_draws, sweeps=cfg.test_draws),
        train_augmentation={"none": "none", "mild": TRAIN_AUGMENTATION.describe()},
        affnist_mix=AFFNIST_MIX.describe(),
        sweeps={k: list(v) for k, v in cfg.sweeps.items()},
        test_sets={ts.name: int(len(ts.labels)) for ts in proto.test_sets},
    )
