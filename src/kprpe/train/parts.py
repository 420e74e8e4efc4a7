"""The parts a :class:`~kprpe.train.loop.Trainer` trains with, and today's face parts built from the config.

The loop knows only these contracts, so another task (gait: a P x K sampler, triplet + CE losses, a
rank-based validator) passes its own parts to ``Trainer(cfg, dataset=..., sampler=..., head=...,
validator=...)``:

- ``dataset``: ``dataset[i]`` is a dict with ``image`` (C, H, W float), ``keypoints`` (K, 2), ``label``
  (int), ``valid`` (bool: False for a sample that could not be read and was replaced) and ``index`` (i).
- ``sampler``: a ``torch.utils.data.Sampler`` of this process's indices, read in micro-batches of
  ``data.batch_size``; it has ``micro_batches_per_epoch`` and ``set_epoch(epoch, start_micro_batch)``, and
  its order is a function of the seed, the epoch and the position, so a resumed run continues exactly.
- ``head``: an ``nn.Module`` called ``head(embeddings, labels, valid) -> (loss, info)`` (``info`` may hold
  ``norm_mean``); checkpoints save its ``state_dict`` per process and ``extra_state()`` /
  ``load_extra_state()``, and check its ``num_classes`` on resume.
- ``validator``: called ``validator(model, device) -> {set name: {metric: value}}`` on the main process
  every ``validation.every`` steps; the first metric is the one printed and sent to TensorBoard.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from .config import ConfigError, TrainConfig
from .distributed import DistInfo

__all__ = [
    "Validator",
    "face_dataset",
    "face_sampler",
    "partial_fc_head",
    "verification_validator",
]

Validator = Callable[[nn.Module, torch.device], Mapping[str, Mapping[str, float]]]


def model_keypoints(model: nn.Module) -> int:
    """Keypoints the model reads (a family without keypoint input, e.g. IResNet, gets the 5 face points)."""
    return getattr(model.config, "num_keypoints", 5)


def face_dataset(cfg: TrainConfig, model: nn.Module) -> Dataset:
    """The face training set of ``data.*`` (a record file or an image folder), at the model's input size."""
    from ..data.dataset import FaceDataset

    return FaceDataset(
        cfg.data.train,
        image_size=model.config.img_size,
        landmarks=cfg.data.landmarks,
        augment=cfg.data.augmentation,
        num_classes=cfg.data.num_classes,
        num_keypoints=model_keypoints(model),
        missing_landmarks=cfg.data.missing_landmarks,
        on_error=cfg.data.on_bad_sample,
    )


def face_sampler(cfg: TrainConfig, num_samples: int, dist_info: DistInfo) -> Sampler:
    """Shuffled, rank-aware, resumable micro-batches whose count per epoch is a multiple of the accumulation
    steps."""
    from ..data.sampler import ResumableSampler

    return ResumableSampler(
        num_samples,
        cfg.data.batch_size,
        world_size=dist_info.world_size,
        rank=dist_info.rank,
        seed=cfg.train.seed,
        micro_batches_multiple=cfg.optim.accumulation_steps,
    )


def partial_fc_head(cfg: TrainConfig, model: nn.Module, num_classes: int, dist_info: DistInfo) -> nn.Module:
    """The margin head of ``head.*`` over partial-FC class centres (sharded over the processes)."""
    from .heads import PartialFC, build_margin

    h = cfg.head
    margin = build_margin(
        h.type,
        scale=h.scale,
        margin=h.margin,
        m1=h.m1,
        m2=h.m2,
        m3=h.m3,
        h=h.h,
        t_alpha=h.t_alpha,
        gradient=h.margin_gradient,
    )
    return PartialFC(
        model.config.output_dim,
        num_classes,
        margin,
        sample_rate=h.sample_rate,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        seed=cfg.train.seed,
    )


def verification_validator(cfg: TrainConfig, image_size: int) -> Validator | None:
    """10-fold verification accuracy on each ``validation.pairs`` file (None when there are none)."""
    if not cfg.validation.pairs:
        return None
    from .validation import load_verification_bin, validation_accuracy

    try:
        sets = [load_verification_bin(p) for p in cfg.validation.pairs]
    except FileNotFoundError as exc:
        raise ConfigError(f"validation.pairs: {exc}") from None

    def validate(model: nn.Module, device: torch.device) -> dict[str, dict[str, float]]:
        results = {}
        for vset in sets:
            acc, std = validation_accuracy(
                model,
                vset,
                image_size=image_size,
                batch_size=cfg.validation.batch_size,
                flip=cfg.validation.flip,
                device=device,
            )
            results[vset.name] = {"accuracy": acc, "std": std}
        return results

    return validate
