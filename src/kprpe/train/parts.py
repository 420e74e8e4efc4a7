"""What a :class:`~kprpe.train.loop.Trainer` trains: a *task*, and the face task built from the config.

The Trainer owns what every job shares: processes (torchrun/DDP), seeding, the optimiser step with gradient
clipping and non-finite skips, the schedule's stepping, logging, validation, checkpoints and exact resume. A
task owns what differs between jobs (face: :class:`FaceTask`; gait: :class:`kprpe.train.gait.GaitTask`):

- ``build_model()`` -> the model (in training mode); ``build_parts(model, dist)`` -> the head (an
  ``nn.Module``, parameterless when the classifier lives in the model), building the data on the way; called
  in this order after the global seed, so initialisation draws the same random numbers every time;
- ``total_steps`` and ``steps_per_epoch`` (set by ``build_parts``), ``samples_per_step`` (for the log);
- ``make_optimizer(model, head)`` and ``lr_lambda(total_steps)`` (a ``LambdaLR`` factor of the step);
- ``step_batches(trainer)``: an iterator of each optimiser step's micro-batches (on this process), from
  ``trainer.step`` on, a function of the seed and the step so a resumed run continues exactly;
- ``loss(model, head, batch, device, amp)`` -> ``(loss, info)``: the loss to back-propagate for one
  micro-batch (``model`` may be the DDP wrapper). ``info`` may hold ``loss`` (the value to log when the
  back-propagated loss is a per-process share), ``norm_mean``, ``bad_index`` (samples that could not be read)
  and task metrics (floats, averaged into ``log.jsonl``);
- ``validator(is_main)`` -> ``validator(model, device) -> {set: {metric: value}}`` or None, and
  ``write_results(output_dir, step, results)`` for the final validation.

The face parts themselves are the seams of the face task (another face-like job passes its own):

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

import os
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import ConfigError, TrainConfig
from .distributed import DistInfo, all_gather_nograd, use_distributed_batchnorm
from .schedule import lr_factor

__all__ = [
    "FaceTask",
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


class FaceTask:
    """Face recognition: images + keypoints -> the model's embedding -> a margin head (partial FC),
    micro-batches of ``data.batch_size`` from the face dataset, the schedule of ``schedule.*`` with epochs and
    warm-up.
    ``dataset``, ``sampler``, ``head`` and ``validator`` default to the parts the config describes."""

    name = "face"
    metrics: tuple[str, ...] = ()  # no per-step metrics beyond the loop's own

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        dataset: Dataset | None = None,
        sampler: Sampler | None = None,
        head: nn.Module | None = None,
        validator: Validator | None = None,
    ) -> None:
        self.cfg = cfg
        self.dataset, self.sampler, self._head, self._validator = dataset, sampler, head, validator

    def build_model(self) -> nn.Module:
        from ..nn import create_model, load_official
        from .checkpoint import CheckpointState

        m = self.cfg.model
        if m.pretrained:
            runtime = {
                k: v
                for k, v in m.overrides.items()
                if k in ("attn_impl", "drop_path_rate", "drop_rate", "attn_drop_rate")
            }
            model = load_official(m.pretrained, **runtime)
        else:
            try:
                model = create_model(m.name, **m.overrides)
            except (TypeError, ValueError) as exc:
                raise CheckpointState(
                    f"model: cannot build {m.name!r} with overrides {m.overrides}: {exc}"
                ) from exc
        model.train()
        if m.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if self.cfg.train.sync_batchnorm:
            use_distributed_batchnorm(model)
        self.image_size = model.config.img_size
        return model

    def build_parts(self, model: nn.Module, dist_info: DistInfo) -> nn.Module:
        cfg = self.cfg
        self.dist = dist_info
        # in this order (the model's and the head's initialisation draw from one seeded RNG)
        if self.dataset is None:
            self.dataset = face_dataset(cfg, model)
        if self.sampler is None:
            self.sampler = face_sampler(cfg, len(self.dataset), dist_info)
        accum = cfg.optim.accumulation_steps
        self.steps_per_epoch = self.sampler.micro_batches_per_epoch // accum
        self.total_steps = cfg.train.max_steps or max(1, int(round(cfg.train.epochs * self.steps_per_epoch)))
        self.samples_per_step = accum * cfg.data.batch_size * dist_info.world_size
        head = self._head
        if head is None:
            if not hasattr(self.dataset, "num_classes"):
                raise ConfigError(
                    "the default partial-FC head needs the dataset's num_classes: give the dataset a "
                    "num_classes attribute or pass head= as well"
                )
            head = partial_fc_head(cfg, model, self.dataset.num_classes, dist_info)
        return head

    def make_optimizer(self, model: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
        from .loop import build_optimizer

        return build_optimizer(self.cfg, model, head)

    def lr_lambda(self, total_steps: int) -> Callable[[int], float]:
        s = self.cfg.schedule
        warmup = (
            s.warmup_steps
            if s.warmup_steps is not None
            else int(round(s.warmup_epochs * self.steps_per_epoch))
        )
        milestones = [int(round(m * self.steps_per_epoch)) for m in s.milestones]
        min_ratio = s.min_lr / self.cfg.optim.lr
        return lambda step: lr_factor(
            step,
            total_steps=total_steps,
            warmup_steps=warmup,
            schedule=s.name,
            min_ratio=min_ratio,
            milestones=milestones,
            gamma=s.gamma,
        )

    def _loader(self, device: torch.device) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.data.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
            # its own generator: creating a loader must not consume the global RNG (exact resume)
            generator=torch.Generator().manual_seed(self.cfg.train.seed),
            multiprocessing_context="fork" if workers > 0 and os.name != "nt" else None,
        )

    def step_batches(self, trainer) -> Iterator[list[dict]]:
        accum = self.cfg.optim.accumulation_steps
        while trainer.step < trainer.total_steps:
            epoch, in_epoch = divmod(trainer.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, in_epoch * accum)
            pending: list[dict] = []
            for batch in self._loader(trainer.device):
                pending.append(batch)
                if len(pending) < accum:
                    continue
                yield pending
                pending = []
                if trainer.step >= trainer.total_steps:
                    return

    def loss(self, model, head, batch: dict, device: torch.device, amp) -> tuple[torch.Tensor, dict]:
        images = batch["image"].to(device, non_blocking=True)
        keypoints = batch["keypoints"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        valid = batch["valid"].to(device, non_blocking=True)
        with amp:
            emb = model(images, keypoints)
        loss, info = head(emb.float(), labels, valid)
        info = dict(info)
        # a head that does not report the embedding norm: the mean over this micro-batch's valid samples
        if "norm_mean" not in info:
            info["norm_mean"] = emb.detach().float()[valid].norm(dim=1).mean()
        if not bool(valid.all()) or self.dist.world_size > 1:
            all_valid = all_gather_nograd(valid)
            all_index = all_gather_nograd(batch["index"].to(device))
            info["bad_index"] = all_index[~all_valid].tolist()
        return loss, info

    def validator(self, is_main: bool) -> Validator | None:
        if not is_main:
            return None
        return self._validator if self._validator is not None else verification_validator(
            self.cfg, self.image_size
        )

    def write_results(self, output_dir, step: int, results: Mapping) -> None:
        """Face runs keep their validation in validation.csv."""
