"""The gait task (SwinGait, docs/gait.md): P x K batches of fixed-length ordered clips, batch-all
triplet + label-smoothed CE on the BNNeck's cosine logits, AdamW with SwinGait's parameter groups, one cosine
decay, and the Gait3D protocol as validation.

``kprpe train CONFIG.yaml`` trains it with the one :class:`~kprpe.train.loop.Trainer` when the config says
``task: gait`` (configs/gait_tiny.yaml, configs/gait3d_swingait_kprpe.yaml): the same checkpoints, exact
resume, logging, non-finite handling and torchrun/DDP path as face training. Batches and frame choices are
drawn from ``(seed, step)``, so a resumed run sees exactly the batches the uninterrupted run would have, and
under torchrun every process draws the whole P x K batch and keeps its share of it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..eval.gait_model import collate_sequences, evaluate_model
from ..files import check_not_input, write_json
from .config import ConfigError, RunConfig, _build, need, read_config_values
from .distributed import (
    DistInfo,
    all_gather_nograd,
    all_reduce_sum,
    gather_with_grad,
    use_distributed_batchnorm,
)
from .schedule import lr_factor

__all__ = [
    "GaitTrainConfig",
    "load_gait_config",
    "is_gait_config",
    "batch_all_triplet",
    "part_cross_entropy",
    "parameter_groups",
    "cosine_factor",
    "GaitTask",
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
    rotate_p: float = 0.0  # OpenGait's RandomRotate (+-10 degrees); the SwinGait recipe uses 0.2
    perspective_p: float = 0.0  # OpenGait's RandomPerspective; the SwinGait recipe uses 0.2
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
    accumulation_steps: int = 1  # batch-all triplets need the whole P x K batch at once: always 1


@dataclass
class GaitScheduleSection:
    t_max: int = 0  # cosine period in steps (0: train.max_steps); lr = min_lr from then on
    min_lr: float = 1e-6
    update_every: int = 1  # OpenGait updates the lr every 1000 iterations


@dataclass
class GaitRunSection(RunConfig):
    """The face run section (one vocabulary for both tasks), with gait's defaults; ``epochs`` is unused."""

    max_steps: int | None = 100
    output_dir: str = "runs/gait"
    checkpoint_every: int = 50
    tensorboard: bool = False
    progress: bool = False


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

        d, o, t = self.data, self.optim, self.train
        need(self.task == "gait", "task", f"must be 'gait', got {self.task!r}")
        need(bool(d.root), "data.root", "a packed gait data root is required")
        need(bool(d.partition), "data.partition", "a partition JSON is required")
        for key, value in (
            ("data.frames", d.frames),
            ("data.ids_per_batch", d.ids_per_batch),
            ("data.seqs_per_id", d.seqs_per_id),
            ("train.max_steps", t.max_steps or 0),
            ("train.checkpoint_every", t.checkpoint_every),
            ("train.keep_checkpoints", t.keep_checkpoints),
            ("train.log_every", t.log_every),
            ("validation.batch_size", self.validation.batch_size),
            ("schedule.update_every", self.schedule.update_every),
        ):
            need(value > 0, key, f"must be positive, got {value}")
        need(d.ids_per_batch >= 2, "data.ids_per_batch", "the triplet loss needs at least 2 identities")
        need(d.skip >= 0, "data.skip", f"must be >= 0, got {d.skip}")
        for key in ("flip_p", "rotate_p", "perspective_p"):
            value = getattr(d, key)
            need(0 <= value <= 1, f"data.{key}", f"must be in [0, 1], got {value}")
        need(d.keypoints in KEYPOINT_CONTROLS, "data.keypoints", f"must be one of {KEYPOINT_CONTROLS}")
        need(
            o.lr > 0 and o.weight_decay >= 0 and o.stem_lr_scale > 0,
            "optim",
            "lr > 0, weight_decay >= 0, stem_lr_scale > 0",
        )
        need(o.accumulation_steps == 1, "optim.accumulation_steps", "gait trains on whole P x K batches: 1")
        need(self.validation.every >= 0, "validation.every", f"must be >= 0, got {self.validation.every}")
        need(t.amp in ("none", "bf16"), "train.amp", f"must be none or bf16, got {t.amp!r}")
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
    train = values.get("train")
    if isinstance(train, dict) and "keep" in train:
        # 0.3.0 spelled it `train.keep`; the one Trainer's name is `keep_checkpoints` (accepted until 0.5)
        if "keep_checkpoints" in train:
            raise ConfigError(f"{path}: give train.keep_checkpoints only (train.keep is its old spelling)")
        warnings.warn(
            f"{path}: train.keep is deprecated, use train.keep_checkpoints", FutureWarning, stacklevel=2
        )
        train["keep_checkpoints"] = train.pop("keep")
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


# ---------------------------------------------------------------------- the task
class _NoHead(nn.Module):
    """The classifier lives inside the model (BNNeck); the checkpoint helpers still ask for a head."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state) -> None:
        pass


class GaitTask:
    """SwinGait on P x K batches for :class:`~kprpe.train.loop.Trainer` (the contract: train/parts.py).

    Under torchrun each process draws the whole step's batch from ``(seed, step)`` and keeps its contiguous
    share; the batch-all triplet runs on every process's embeddings (gathered), and the CE on each share is
    weighted by its size. With ``train.sync_batchnorm`` every BatchNorm (the conv stem's BatchNorm2d and the
    BNNeck) normalises with the statistics of all processes' frames, so W processes take the step one process
    takes on the whole batch (to float32 rounding; tests/train/test_gait_train.py)."""

    name = "gait"
    metrics = ("triplet", "ce", "nonzero", "accuracy")

    def __init__(self, cfg: GaitTrainConfig) -> None:
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        from ..gait import FixedOrderedFrames, GaitDataset, read_partition
        from ..gait.augment import Compose, KeypointControl, RandomFlip, RandomPerspective, RandomRotate
        from ..nn import create_model

        cfg, d = self.cfg, self.cfg.data
        # the one output rule (kprpe.files): checkpoints never go into the data (a scan would read them)
        check_not_input(cfg.train.output_dir, [d.root, d.partition], folder=True, error=ConfigError)
        self.partition = read_partition(d.partition)
        # OpenGait's order (NOTES 1.4): perspective, flip, rotate; the keypoints move with each
        transform = Compose(
            RandomPerspective(d.perspective_p) if d.perspective_p else None,
            RandomFlip(d.flip_p) if d.flip_p else None,
            RandomRotate(d.rotate_p) if d.rotate_p else None,
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
            model = create_model(cfg.model.name, **overrides)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model: {exc}") from None
        if type(model).__name__ != "SwinGait":
            raise ConfigError(
                f"model.name: {cfg.model.name!r} is not a gait model (swingait_2d, swingait_2d_kprpe)"
            )
        model.config.frame_size = tuple(model.config.frame_size)
        model.train()
        if cfg.train.sync_batchnorm:  # the stem's BatchNorm2d and the BNNeck: statistics over all processes
            use_distributed_batchnorm(model)
        return model

    def build_parts(self, model: nn.Module, dist_info: DistInfo) -> nn.Module:
        d = self.cfg.data
        self.dist = dist_info
        self.batch_size = d.ids_per_batch * d.seqs_per_id
        if self.batch_size % dist_info.world_size:
            raise ConfigError(
                f"data.ids_per_batch x data.seqs_per_id = {self.batch_size} sequences do not split evenly "
                f"over {dist_info.world_size} processes"
            )
        self.frame_size = tuple(model.config.frame_size)
        self.total_steps = int(self.cfg.train.max_steps)
        self.steps_per_epoch = max(1, len(self.dataset) // self.batch_size)  # one epoch ~ one pass
        self.samples_per_step = self.batch_size
        return _NoHead(len(self.dataset.identities))

    def make_optimizer(self, model: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return torch.optim.AdamW(parameter_groups(model, o.lr, o.weight_decay, o.stem_lr_scale))

    def lr_lambda(self, total_steps: int):
        s = self.cfg.schedule
        t_max, min_ratio = s.t_max or total_steps, s.min_lr / self.cfg.optim.lr
        return lambda step: cosine_factor(step, t_max, min_ratio, s.update_every)

    def batch(self, step: int) -> dict:
        """Step ``step``'s batch on this process: P ids x K sequences and their frames, drawn from
        ``(seed, step)``; this process's contiguous share of them."""
        from ..gait import pk_batches

        d = self.cfg.data
        rng = np.random.default_rng([self.cfg.train.seed, step])
        indices = next(pk_batches(self.dataset.indices_by_label, d.ids_per_batch, d.seqs_per_id, rng))
        # every process draws every item, in order: the frames and flips of item i depend on items < i
        items = [self.dataset.sample(int(i), rng) for i in indices]
        share = len(items) // self.dist.world_size
        mine = items[self.dist.rank * share : (self.dist.rank + 1) * share]
        return collate_sequences(mine, self.frame_size)

    def step_batches(self, trainer):
        while trainer.step < trainer.total_steps:
            yield [self.batch(trainer.step)]

    def loss(self, model, head, batch: dict, device: torch.device, amp):
        lc = self.cfg.loss
        labels = batch["labels"].to(device)
        with amp:
            out = model(batch["sils"].to(device), batch["keypoints"].to(device), batch["lengths"].to(device))
        embeddings, logits = out["embeddings"].float(), out["logits"].float()
        world = self.dist.world_size
        all_labels = all_gather_nograd(labels)
        # every process computes the same triplet loss on the gathered batch, and the gather's backward sums
        # their gradients: each back-propagates 1/W of it. The CE of a share is weighted by its size.
        triplet, share = batch_all_triplet(gather_with_grad(embeddings), all_labels, lc.triplet_margin)
        ce = part_cross_entropy(logits, labels, lc.scale, lc.label_smoothing)
        weight = len(labels) / len(all_labels)
        loss = lc.triplet_weight * (triplet * (1 / world)) + lc.ce_weight * (ce * weight)
        accuracy = (logits.detach().mean(-1).argmax(1) == labels).float().mean() * weight
        with torch.no_grad():
            global_ce, accuracy = (all_reduce_sum(t.detach()) for t in (ce * weight, accuracy))
        return loss, dict(
            loss=lc.triplet_weight * triplet.detach() + lc.ce_weight * global_ce,
            norm_mean=embeddings.detach().norm(dim=1).mean(),
            triplet=triplet.detach(),
            ce=global_ce,
            nonzero=share.detach(),
            accuracy=accuracy,
        )

    def validator(self, is_main: bool):
        if not is_main:
            return None
        v, d = self.cfg.validation, self.cfg.data

        def validate(model: nn.Module, device: torch.device) -> dict:
            return {
                "gait3d": evaluate_model(
                    model,
                    d.root,
                    d.partition,
                    batch_size=v.batch_size,
                    metric=v.metric,
                    frames_limit=d.test_frames_limit,
                    keypoints=d.keypoints,
                    device=device,
                )
            }

        return validate

    def write_results(self, output_dir, step: int, results: dict) -> None:
        """``results.json``: the Gait3D protocol's numbers at the end of training."""
        write_json(Path(output_dir) / "results.json", dict(protocol="gait3d", step=step, **results["gait3d"]))
