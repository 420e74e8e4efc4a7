"""Gait training (SwinGait, docs/gait.md): P x K batches of fixed-length ordered clips, batch-all
triplet + label-smoothed CE on the BNNeck's cosine logits, AdamW with SwinGait's parameter groups, one cosine
decay, exact resume, and the Gait3D protocol as validation.

``kprpe train CONFIG.yaml`` runs this loop when the config says ``task: gait`` (configs/gait_tiny.yaml,
configs/gait3d_swingait_kprpe.yaml). Checkpoints use :mod:`kprpe.train.checkpoint` (same layout, atomic, a
``latest`` pointer); batches and frame choices are drawn from ``(seed, step)`` so a resumed run sees exactly
the batches the uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..eval.gait_model import collate_sequences, evaluate_model
from ..files import check_not_input, write_json
from .checkpoint import CheckpointState, latest_checkpoint, restore_checkpoint, save_checkpoint
from .config import ConfigError, _build, read_config_values
from .distributed import init_distributed
from .schedule import lr_factor

__all__ = [
    "GaitTrainConfig",
    "load_gait_config",
    "is_gait_config",
    "batch_all_triplet",
    "part_cross_entropy",
    "parameter_groups",
    "cosine_factor",
    "GaitTrainer",
]


# ---------------------------------------------------------------------- config
@dataclass
class GaitModelSection:
    name: str = "swingait_2d_kprpe"
    overrides: dict = field(default_factory=dict)


@dataclass
class GaitDataSection:
    root: str = ""
    partition: str = ""
    frames: int = 30  # training clip length (fixed_ordered)
    skip: int = 4  # a run of frames + skip frames, frames kept in order
    ids_per_batch: int = 32  # P
    seqs_per_id: int = 4  # K
    flip_p: float = 0.2
    keypoints: str = "real"  # real | shuffled | noise | drawn (experiment controls)
    test_frames_limit: int = 720


@dataclass
class GaitLossSection:
    triplet_margin: float = 0.2
    triplet_weight: float = 1.0
    ce_weight: float = 1.0
    label_smoothing: float = 0.1
    scale: float = 16.0


@dataclass
class GaitOptimSection:
    lr: float = 3e-4
    weight_decay: float = 0.02
    stem_lr_scale: float = 0.1  # conv stem, FCs and BNNecks (OpenGait: pretrained from DeepGaitV2)
    grad_clip: float = 0.0


@dataclass
class GaitScheduleSection:
    t_max: int = 0  # cosine period in steps (0: train.max_steps); lr = min_lr from then on
    min_lr: float = 1e-6
    update_every: int = 1  # OpenGait updates the lr every 1000 iterations


@dataclass
class GaitRunSection:
    max_steps: int = 100
    seed: int = 0
    output_dir: str = "runs/gait"
    log_every: int = 10
    checkpoint_every: int = 50
    keep: int = 2
    cpu_threads: int = 0
    device: str = "auto"


@dataclass
class GaitValidationSection:
    every: int = 0  # steps between Gait3D evaluations of the test split (0: only at the end)
    batch_size: int = 4
    metric: str = "euc"


@dataclass
class GaitTrainConfig:
    task: str = "gait"
    model: GaitModelSection = field(default_factory=GaitModelSection)
    data: GaitDataSection = field(default_factory=GaitDataSection)
    loss: GaitLossSection = field(default_factory=GaitLossSection)
    optim: GaitOptimSection = field(default_factory=GaitOptimSection)
    schedule: GaitScheduleSection = field(default_factory=GaitScheduleSection)
    train: GaitRunSection = field(default_factory=GaitRunSection)
    validation: GaitValidationSection = field(default_factory=GaitValidationSection)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> GaitTrainConfig:
        from ..gait.augment import KEYPOINT_CONTROLS

        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{key}: {msg}")

        d, o, t = self.data, self.optim, self.train
        need(self.task == "gait", "task", f"must be 'gait', got {self.task!r}")
        need(bool(d.root), "data.root", "a packed gait data root is required")
        need(bool(d.partition), "data.partition", "a partition JSON is required")
        for key, value in (
            ("data.frames", d.frames),
            ("data.ids_per_batch", d.ids_per_batch),
            ("data.seqs_per_id", d.seqs_per_id),
            ("train.max_steps", t.max_steps),
            ("train.checkpoint_every", t.checkpoint_every),
            ("train.keep", t.keep),
            ("validation.batch_size", self.validation.batch_size),
            ("schedule.update_every", self.schedule.update_every),
        ):
            need(value > 0, key, f"must be positive, got {value}")
        need(d.ids_per_batch >= 2, "data.ids_per_batch", "the triplet loss needs at least 2 identities")
        need(d.skip >= 0, "data.skip", f"must be >= 0, got {d.skip}")
        need(0 <= d.flip_p <= 1, "data.flip_p", f"must be in [0, 1], got {d.flip_p}")
        need(d.keypoints in KEYPOINT_CONTROLS, "data.keypoints", f"must be one of {KEYPOINT_CONTROLS}")
        need(
            o.lr > 0 and o.weight_decay >= 0 and o.stem_lr_scale > 0,
            "optim",
            "lr > 0, weight_decay >= 0, stem_lr_scale > 0",
        )
        need(0 <= self.loss.label_smoothing < 1, "loss.label_smoothing", "must be in [0, 1)")
        need(self.validation.metric in ("euc", "cos"), "validation.metric", "must be euc or cos")
        return self


def is_gait_config(values: dict) -> bool:
    return isinstance(values, dict) and values.get("task") == "gait"


def load_gait_config(path: str | os.PathLike, overrides: list[str] | None = None) -> GaitTrainConfig:
    """Read a ``task: gait`` YAML config, apply ``section.key=value`` overrides, validate; relative data
    paths resolve against the config's folder when they exist there."""
    path = Path(path)
    values = read_config_values(path, overrides)
    cfg = _build(GaitTrainConfig, values, "")
    for name in ("root", "partition"):
        value = getattr(cfg.data, name)
        if (
            value
            and not Path(value).is_absolute()
            and not Path(value).exists()
            and (path.parent / value).exists()
        ):
            setattr(cfg.data, name, str(path.parent / value))
    return cfg.validate()


# ---------------------------------------------------------------------- losses, groups, schedule
def batch_all_triplet(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2):
    """Batch-all triplet loss per part: ``embeddings (n, c, p)``; every (anchor, positive, negative) term
    ``relu(d(a, p) - d(a, n) + margin)`` on Euclidean distances, averaged over the non-zero terms of each
    part, then over parts. Returns ``(loss, share of non-zero terms)``."""
    x = embeddings.permute(2, 0, 1).float()  # (p, n, c)
    sq = x.square().sum(-1)
    # floored above 0: sqrt'(0) is infinite, and 0 * inf poisons the masked (diagonal) terms' gradient
    dist = (sq[:, :, None] + sq[:, None, :] - 2 * x @ x.transpose(1, 2)).clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & ~eye, ~same
    terms = F.relu(dist[:, :, :, None] - dist[:, :, None, :] + margin)  # (p, a, pos, neg)
    valid = (positive[:, :, None] & negative[:, None, :])[None]
    terms = terms * valid
    nonzero = (terms > 0).sum(dim=(1, 2, 3))
    per_part = terms.sum(dim=(1, 2, 3)) / nonzero.clamp_min(1)
    share = nonzero.sum().float() / (valid.sum() * x.shape[0]).clamp_min(1)
    return per_part.mean(), share


def part_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, scale: float = 16.0, smoothing: float = 0.1
):
    """CE on ``logits (n, classes, p)`` times ``scale``, the label repeated over parts, label smoothing."""
    target = labels[:, None].expand(-1, logits.shape[-1])
    return F.cross_entropy(logits * scale, target, label_smoothing=smoothing)


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, stem_lr_scale: float = 0.1
) -> list[dict]:
    """SwinGait's AdamW groups: transformer norms, patch embedding and position terms (the blocks'
    CPB and logit scales, KP-RPE's tables) without weight decay; the other transformer weights with it; the
    conv stem, FCs and BNNeck at ``lr * stem_lr_scale``. Every parameter lands in exactly one group."""
    no_decay, decay, rest = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("transformer."):
            quiet = (
                any(k in name for k in ("patch_", "norm", "cpb_mlp", "logit_scale", "kprpe."))
                or param.ndim == 1
            )
            (no_decay if quiet else decay).append(param)
        else:
            rest.append(param)
    return [
        dict(params=no_decay, lr=lr, weight_decay=0.0, name="transformer_no_decay"),
        dict(params=decay, lr=lr, weight_decay=weight_decay, name="transformer"),
        dict(params=rest, lr=lr * stem_lr_scale, weight_decay=weight_decay, name="stem_and_heads"),
    ]


def cosine_factor(step: int, t_max: int, min_ratio: float, update_every: int = 1) -> float:
    """The shared cosine (:func:`kprpe.train.schedule.lr_factor`, no warm-up, no restarts) over ``t_max``
    steps, held for ``update_every`` steps as OpenGait updates it, at ``min_ratio`` from ``t_max`` on."""
    held = (step // update_every) * update_every
    return lr_factor(
        min(held, t_max), total_steps=t_max, warmup_steps=0, schedule="cosine", min_ratio=min_ratio
    )


# ---------------------------------------------------------------------- trainer
class _NoHead(nn.Module):
    """The classifier lives inside the model (BNNeck); the checkpoint helpers still ask for a head."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state) -> None:
        pass


class GaitTrainer:
    """Build model, data, loss, optimiser and schedule from a :class:`GaitTrainConfig`; :meth:`run` trains
    and returns the final model file. ``resume``: None, ``"latest"`` or a checkpoint folder."""

    def __init__(
        self, cfg: GaitTrainConfig, *, resume=None, step_callback: Callable[[int], None] | None = None
    ):
        from ..gait import FixedOrderedFrames, GaitDataset, read_partition
        from ..gait.augment import Compose, KeypointControl, RandomFlip
        from ..nn import create_model

        self.cfg = cfg
        self.dist = init_distributed(cfg.train.device)
        if self.dist.world_size > 1:
            raise ConfigError("gait training runs in one process for now (see docs/gait.md)")
        self.device = self.dist.device
        self.output_dir = Path(cfg.train.output_dir)
        # the one output rule (kprpe.files): checkpoints never go into the data (a scan would read them)
        check_not_input(self.output_dir, [cfg.data.root, cfg.data.partition], folder=True, error=ConfigError)
        self.step_callback = step_callback
        if cfg.train.cpu_threads:
            torch.set_num_threads(cfg.train.cpu_threads)
        torch.manual_seed(cfg.train.seed)
        d = cfg.data
        self.partition = read_partition(d.partition)
        transform = Compose(
            RandomFlip(d.flip_p) if d.flip_p else None,
            KeypointControl(d.keypoints) if d.keypoints != "real" else None,
        )
        self.dataset = GaitDataset(
            d.root, self.partition, "train", frames=FixedOrderedFrames(d.frames, d.skip), transform=transform
        )
        if d.ids_per_batch > len(self.dataset.identities):
            raise ConfigError(
                f"data.ids_per_batch: {d.ids_per_batch} ids per batch but the training split has "
                f"{len(self.dataset.identities)}"
            )
        overrides = dict(cfg.model.overrides, num_classes=len(self.dataset.identities))
        try:
            self.model = create_model(cfg.model.name, **overrides).to(self.device)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model: {exc}") from None
        if type(self.model).__name__ != "SwinGait":
            raise ConfigError(
                f"model.name: {cfg.model.name!r} is not a gait model (swingait_2d, swingait_2d_kprpe)"
            )
        self.model.config.frame_size = tuple(self.model.config.frame_size)
        o, s = cfg.optim, cfg.schedule
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, o.lr, o.weight_decay, o.stem_lr_scale)
        )
        t_max = s.t_max or cfg.train.max_steps
        min_ratio = s.min_lr / o.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_factor(step, t_max, min_ratio, s.update_every)
        )
        self.head = _NoHead(len(self.dataset.identities))
        self.step = 0
        self.history: list[dict] = []
        if resume is not None:
            restored = restore_checkpoint(
                resume,
                self.output_dir,
                model=self.model,
                head=self.head,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                dist_info=self.dist,
            )
            self.step = restored.step
            self.history = self._read_log(self.step)
        elif latest_checkpoint(self.output_dir) is not None:
            raise CheckpointState(
                f"{self.output_dir} already holds checkpoints; pass --resume to continue that "
                "run, or choose another train.output_dir"
            )

    def _read_log(self, upto: int) -> list[dict]:
        path = self.output_dir / "log.jsonl"
        if not path.is_file():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if r.get("step", 0) <= upto]

    def _log(self, row: dict) -> None:
        self.history.append(row)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r) + "\n" for r in self.history)
        from ..files import atomic_write_text

        atomic_write_text(self.output_dir / "log.jsonl", text)  # rewritten whole: a resume drops later rows

    def batch(self, step: int) -> dict:
        """Step ``step``'s batch: P ids x K sequences and their frames, drawn from ``(seed, step)``."""
        from ..gait import pk_batches

        d = self.cfg.data
        rng = np.random.default_rng([self.cfg.train.seed, step])
        indices = next(pk_batches(self.dataset.indices_by_label, d.ids_per_batch, d.seqs_per_id, rng))
        items = [self.dataset.sample(int(i), rng) for i in indices]
        return collate_sequences(items, tuple(self.model.config.frame_size))

    def train_step(self, batch: dict) -> dict:
        lc = self.cfg.loss
        self.model.train()
        dev = self.device
        labels = batch["labels"].to(dev)
        out = self.model(batch["sils"].to(dev), batch["keypoints"].to(dev), batch["lengths"].to(dev))
        triplet, share = batch_all_triplet(out["embeddings"], labels, lc.triplet_margin)
        ce = part_cross_entropy(out["logits"], labels, lc.scale, lc.label_smoothing)
        loss = lc.triplet_weight * triplet + lc.ce_weight * ce
        if not torch.isfinite(loss):
            from .loop import TrainingDiverged

            raise TrainingDiverged(f"gait training diverged at step {self.step + 1}: loss {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        accuracy = (out["logits"].mean(-1).argmax(1) == labels).float().mean()
        return dict(
            loss=loss.item(),
            triplet=triplet.item(),
            ce=ce.item(),
            nonzero=share.item(),
            accuracy=accuracy.item(),
            lr=self.optimizer.param_groups[1]["lr"],
        )

    def validate(self) -> dict:
        v, d = self.cfg.validation, self.cfg.data
        return evaluate_model(
            self.model,
            d.root,
            d.partition,
            batch_size=v.batch_size,
            metric=v.metric,
            frames_limit=d.test_frames_limit,
            keypoints=d.keypoints,
            device=self.device,
        )

    def save(self) -> Path:
        return save_checkpoint(
            self.output_dir,
            self.step,
            model=self.model,
            head=self.head,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            dist_info=self.dist,
            config=self.cfg.to_dict(),
            bad_samples=0,
            keep=self.cfg.train.keep,
        )

    def run(self) -> Path:
        from ..nn import save_model

        t = self.cfg.train
        v = self.cfg.validation
        start = time.perf_counter()
        while self.step < t.max_steps:
            stats = self.train_step(self.batch(self.step))
            self.step += 1
            row = None
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                row = dict(step=self.step, seconds=round(time.perf_counter() - start, 2), **stats)
            if v.every and self.step % v.every == 0 and self.step != t.max_steps:
                row = dict(
                    row or dict(step=self.step, **stats),
                    **{"val/" + k: m for k, m in self.validate().items()},
                )
            if row is not None:
                self._log(row)
            if self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                self.save()
            if self.step_callback is not None:
                self.step_callback(self.step)
        results = self.validate()
        write_json(self.output_dir / "results.json", dict(protocol="gait3d", step=self.step, **results))
        return save_model(
            self.model, self.output_dir / "model.safetensors", metadata={"kprpe_train_step": str(self.step)}
        )
