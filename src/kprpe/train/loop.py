"""The training loop: ``Trainer(config).run()`` — single process, or one process per GPU under torchrun.

What a step is: ``optim.accumulation_steps`` micro-batches of ``data.batch_size`` samples per process, then
one optimiser step. The global batch per step is ``batch_size x processes x accumulation_steps``. The data
order, augmentation and partial-FC sampling are functions of the seed and the step, so a resumed run repeats
an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from ..errors import KprpeError
from ..files import atomic_write_text
from ..nn import create_model, load_official, save_model
from .checkpoint import CheckpointState, latest_checkpoint, restore_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .distributed import (
    DistInfo,
    DistributedBatchNorm1d,
    all_gather_nograd,
    all_reduce_max_nograd,
    barrier,
    init_distributed,
    is_distributed,
    sum_allreduce_hook,
    use_distributed_batchnorm,
)
from .parts import Validator, face_dataset, face_sampler, partial_fc_head, verification_validator
from .schedule import lr_factor

__all__ = [
    "Trainer",
    "DistributedBatchNorm1d",
    "use_distributed_batchnorm",
    "lr_factor",
    "clip_global_grad_norm",
    "build_optimizer",
]


def build_optimizer(cfg: TrainConfig, model: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    """Weight decay on matrices (and the class centres); none on biases, norms and position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("pos_embed") else decay).append(p)
    decay += [p for p in head.parameters() if p.requires_grad]
    groups = [
        dict(params=decay, weight_decay=cfg.optim.weight_decay),
        dict(params=no_decay, weight_decay=0.0),
    ]
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)


def clip_global_grad_norm(
    model_params: list[nn.Parameter], head_params: list[nn.Parameter], max_norm: float
) -> float:
    """Clip by the norm of *all* gradients: the backbone's (identical on every process after DDP) plus every
    process's class-centre shard. Returns the norm before clipping."""

    def sq(params):
        grads = [p.grad.float().pow(2).sum() for p in params if p.grad is not None]
        return torch.stack(grads).sum() if grads else torch.zeros(())

    backbone = sq(model_params)
    head = sq(head_params).to(backbone.device)
    if is_distributed():
        dist.all_reduce(head)
    total = torch.sqrt(backbone + head)
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in list(model_params) + list(head_params):
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
    return float(total)


class TrainingDiverged(KprpeError, RuntimeError):
    """The loss stayed non-finite longer than ``train.nonfinite_patience`` steps, or the weights became
    NaN/inf."""


class Trainer:
    """Build everything from a :class:`TrainConfig`; :meth:`run` trains and returns the final model path.

    ``resume``: None (fresh run; refuses an output directory that already has checkpoints), ``"latest"``
    (the newest checkpoint in ``train.output_dir``) or a checkpoint directory. ``step_callback(step)`` runs
    after every optimiser step (tests use it to simulate a crash).

    The parts (contracts in train/parts.py) default to the face parts the config describes: ``dataset``
    (FaceDataset of ``data.*``), ``sampler`` (ResumableSampler), ``head`` (PartialFC with the ``head.*``
    margin over the dataset's ``num_classes``) and ``validator`` (verification accuracy on
    ``validation.pairs``). Another task passes its own.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: str | os.PathLike | None = None,
        step_callback: Callable[[int], None] | None = None,
        dataset: Dataset | None = None,
        sampler: Sampler | None = None,
        head: nn.Module | None = None,
        validator: Validator | None = None,
    ) -> None:
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.train.device)
        self.device = self.dist.device
        self.output_dir = Path(cfg.train.output_dir)
        self.step_callback = step_callback
        if cfg.train.cpu_threads:
            torch.set_num_threads(cfg.train.cpu_threads)
        torch.manual_seed(cfg.train.seed)

        self.model = self._build_model()
        self.image_size = self.model.config.img_size
        # the parts, built in this order (the model's and the head's initialisation draw from one seeded RNG)
        self.dataset = dataset if dataset is not None else face_dataset(cfg, self.model)
        self.sampler = sampler if sampler is not None else face_sampler(cfg, len(self.dataset), self.dist)
        accum = cfg.optim.accumulation_steps
        self.steps_per_epoch = self.sampler.micro_batches_per_epoch // accum
        self.total_steps = cfg.train.max_steps or max(1, int(round(cfg.train.epochs * self.steps_per_epoch)))
        s = cfg.schedule
        self.warmup_steps = (
            s.warmup_steps
            if s.warmup_steps is not None
            else int(round(s.warmup_epochs * self.steps_per_epoch))
        )
        milestones = [int(round(m * self.steps_per_epoch)) for m in s.milestones]

        if head is None:
            if not hasattr(self.dataset, "num_classes"):
                raise ConfigError(
                    "the default partial-FC head needs the dataset's num_classes: give the dataset a "
                    "num_classes attribute or pass head= as well"
                )
            head = partial_fc_head(cfg, self.model, self.dataset.num_classes, self.dist)
        self.head = head.to(self.device)
        self.model.to(self.device)
        self.optimizer = build_optimizer(cfg, self.model, self.head)
        min_ratio = s.min_lr / cfg.optim.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(
                step,
                total_steps=self.total_steps,
                warmup_steps=self.warmup_steps,
                schedule=s.name,
                min_ratio=min_ratio,
                milestones=milestones,
                gamma=s.gamma,
            ),
        )
        self.step = 0
        self.bad_samples = 0
        self.nonfinite_steps = 0  # updates skipped because the loss or gradient was NaN/inf
        self.nonfinite_streak = 0
        if resume is not None:
            self._resume(resume)
        elif latest_checkpoint(self.output_dir) is not None:
            raise CheckpointState(
                f"{self.output_dir} already holds checkpoints; pass --resume to continue that run, or choose "
                "another "
                f"train.output_dir"
            )
        self.ddp = None
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
            self.ddp.register_comm_hook(None, sum_allreduce_hook)
        self.validator = None  # validation runs on the main process only
        if self.dist.is_main:
            self.validator = (
                validator if validator is not None else verification_validator(cfg, self.image_size)
            )

    # ------------------------------------------------------------------ construction
    def _build_model(self) -> nn.Module:
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
        return model

    # ------------------------------------------------------------------ checkpoints (train/checkpoint.py)
    def _save_checkpoint(self) -> Path:
        return save_checkpoint(
            self.output_dir,
            self.step,
            model=self.model,
            head=self.head,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            dist_info=self.dist,
            config=self.cfg.to_dict(),
            bad_samples=self.bad_samples,
            keep=self.cfg.train.keep_checkpoints,
        )

    def _resume(self, resume) -> None:
        restored = restore_checkpoint(
            resume,
            self.output_dir,
            model=self.model,
            head=self.head,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            dist_info=self.dist,
        )
        self.step, self.bad_samples, self.resumed_from = restored.step, restored.bad_samples, restored.path

    # ------------------------------------------------------------------ logging
    def _open_logs(self):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        csv_path = self.output_dir / "train_log.csv"
        fields = [
            "step",
            "epoch",
            "lr",
            "loss",
            "grad_norm",
            "norm_mean",
            "samples_per_s",
            "bad_samples",
            "nonfinite_steps",
            "elapsed_s",
        ]
        kept = []
        if self.step > 0 and csv_path.is_file():  # drop rows the interrupted run logged after its checkpoint
            with open(csv_path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= self.step]
        self._csv_file = open(csv_path, "w", newline="")  # noqa: SIM115
        self._csv = csv.DictWriter(self._csv_file, fieldnames=fields)
        self._csv.writeheader()
        self._csv.writerows(kept)
        self._csv_file.flush()
        self._tb = None
        if self.cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(
                    str(self.output_dir / "tensorboard"), purge_step=self.step + 1 if self.step else None
                )
            except ImportError:
                print(
                    "kprpe train: tensorboard is not installed; logging to train_log.csv only (pip install "
                    "tensorboard)"
                )
        atomic_write_text(self.output_dir / "config.json", json.dumps(self.cfg.to_dict(), indent=1))

    def _log(self, row: dict) -> None:
        self._csv.writerow(row)
        self._csv_file.flush()
        if self._tb is not None:
            for k in ("lr", "loss", "grad_norm", "norm_mean", "samples_per_s"):
                self._tb.add_scalar(f"train/{k}", row[k], row["step"])

    def _validate(self) -> dict[str, float]:
        """Run the validator; append its metrics to validation.csv; return each set's first metric."""
        results = self.validator(self.model, self.device)
        path = self.output_dir / "validation.csv"
        headline = {}
        for name, metrics in results.items():
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step", "set", *metrics])
                w.writerow([self.step, name, *(f"{v:.5f}" for v in metrics.values())])
            first = next(iter(metrics.values()))
            headline[name] = first
            if self._tb is not None:
                self._tb.add_scalar(f"val/{name}", first, self.step)
        return headline

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimiser step over ``micro_batches`` (this process's part of the global batch)."""
        model = self.ddp or self.model
        # buffers (batch-norm and AdaFace statistics, batch counts) are restored if this step turns out
        # non-finite
        saved_buffers = [(b, b.detach().clone()) for m in (self.model, self.head) for b in m.buffers()]
        amp = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.cfg.train.amp == "bf16"
            else contextlib.nullcontext()
        )
        accum = len(micro_batches)
        total_loss, norm_mean, bad = 0.0, 0.0, 0
        for i, batch in enumerate(micro_batches):
            images = batch["image"].to(self.device, non_blocking=True)
            keypoints = batch["keypoints"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True)
            valid = batch["valid"].to(self.device, non_blocking=True)
            sync = contextlib.nullcontext() if (self.ddp is None or i == accum - 1) else self.ddp.no_sync()
            with sync:
                with amp:
                    emb = model(images, keypoints)
                loss, info = self.head(emb.float(), labels, valid)
                (loss / accum).backward()
            total_loss += float(loss.detach()) / accum
            # a head that does not report the embedding norm: the mean over this micro-batch's valid samples
            batch_norm = (
                info["norm_mean"] if "norm_mean" in info else emb.detach().float()[valid].norm(dim=1).mean()
            )
            norm_mean += float(batch_norm) / accum
            if not bool(valid.all()) or self.dist.world_size > 1:
                all_valid = all_gather_nograd(valid)
                all_index = all_gather_nograd(batch["index"].to(self.device))
                bad_index = all_index[~all_valid].tolist()
                bad += len(bad_index)
                if bad_index and self.dist.is_main:
                    with open(self.output_dir / "bad_samples.txt", "a") as f:
                        f.write("".join(f"{i}\n" for i in bad_index))
        grad_norm = clip_global_grad_norm(
            list(self.model.parameters()), list(self.head.parameters()), self.cfg.optim.grad_clip
        )
        lr = self.optimizer.param_groups[0]["lr"]
        local_bad = torch.tensor(
            0.0 if math.isfinite(total_loss) and math.isfinite(grad_norm) else 1.0, device=self.device
        )
        finite = not bool(all_reduce_max_nograd(local_bad) > 0)  # every process takes the same decision
        if finite:
            self.optimizer.step()
            self.nonfinite_streak = 0
        else:  # skip the update: the weights and statistics stay those of the last finite step
            for buffer, value in saved_buffers:
                buffer.copy_(value)
            self.nonfinite_steps += 1
            self.nonfinite_streak += 1
        with warnings.catch_warnings():  # torch warns when a skipped first update precedes the schedule step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.bad_samples += bad
        if self.nonfinite_streak > self.cfg.train.nonfinite_patience:
            raise TrainingDiverged(
                f"step {self.step}: the loss or gradient has been non-finite for {self.nonfinite_streak} "
                "steps in a row "
                f"(train.nonfinite_patience={self.cfg.train.nonfinite_patience}; last loss {total_loss}, "
                "gradient norm "
                f"{grad_norm}); training stopped — lower optim.lr or enable optim.grad_clip. Checkpoints "
                "already in "
                f"{self.output_dir / 'checkpoints'} are kept; nothing non-finite was saved"
            )
        return dict(loss=total_loss, grad_norm=grad_norm, lr=lr, norm_mean=norm_mean, bad=bad, finite=finite)

    def _require_finite_weights(self, what: str) -> None:
        """Never write a model whose weights or statistics are NaN/inf (it would replace good checkpoints)."""
        for module in (self.model, self.head):
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise TrainingDiverged(
                        f"step {self.step}: {name} holds non-finite values; {what} not written, "
                        f"the last good checkpoint in {self.output_dir / 'checkpoints'} is kept"
                    )

    def _loader(self) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.data.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            # its own generator: creating a loader must not consume the global RNG (exact resume)
            generator=torch.Generator().manual_seed(self.cfg.train.seed),
            multiprocessing_context="fork" if workers > 0 and os.name != "nt" else None,
        )

    def run(self) -> Path:
        """Train to ``total_steps``; checkpoints every ``train.checkpoint_every`` steps and at the end; writes
        ``<output_dir>/model.safetensors`` (loadable by ``kprpe.load_official``) and returns its path."""
        cfg, main = self.cfg, self.dist.is_main
        if main:
            self._open_logs()
        accum = cfg.optim.accumulation_steps
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (main and cfg.train.progress),
            dynamic_ncols=True,
        )
        start_time = time.time()
        window: list[dict] = []
        window_start = time.time()
        try:
            while self.step < self.total_steps:
                epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_epoch(epoch, in_epoch * accum)
                pending: list[dict] = []
                for batch in self._loader():
                    pending.append(batch)
                    if len(pending) < accum:
                        continue
                    out = self.train_step(pending)
                    pending = []
                    window.append(out)
                    if main:
                        bar.update(1)
                        bar.set_postfix(loss=f"{out['loss']:.3f}", lr=f"{out['lr']:.2e}")
                        if not out["finite"]:
                            bar.write(
                                f"step {self.step}: non-finite loss or gradient; update skipped "
                                f"({self.nonfinite_streak} in a row, patience {cfg.train.nonfinite_patience})"
                            )
                    if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                        if main:
                            elapsed = time.time() - window_start
                            n = len(window)
                            samples = n * accum * cfg.data.batch_size * self.dist.world_size
                            self._log(
                                dict(
                                    step=self.step,
                                    epoch=f"{self.step / self.steps_per_epoch:.3f}",
                                    lr=f"{out['lr']:.6g}",
                                    loss=f"{sum(o['loss'] for o in window) / n:.5f}",
                                    grad_norm=f"{sum(o['grad_norm'] for o in window) / n:.4f}",
                                    norm_mean=f"{sum(o['norm_mean'] for o in window) / n:.4f}",
                                    samples_per_s=f"{samples / max(elapsed, 1e-9):.1f}",
                                    bad_samples=self.bad_samples,
                                    nonfinite_steps=self.nonfinite_steps,
                                    elapsed_s=f"{time.time() - start_time:.1f}",
                                )
                            )
                        window, window_start = [], time.time()
                    if self.validator is not None and self.step % cfg.validation.every == 0 and main:
                        bar.write(
                            f"step {self.step}: "
                            + ", ".join(f"{k} {v:.4f}" for k, v in self._validate().items())
                        )
                    if (
                        cfg.train.checkpoint_every
                        and self.step % cfg.train.checkpoint_every == 0
                        and self.step < self.total_steps
                    ):
                        self._require_finite_weights("checkpoint")
                        self._save_checkpoint()
                    if self.step_callback is not None:
                        self.step_callback(self.step)
                    if self.step >= self.total_steps:
                        break
            if self.validator is not None and self.step % cfg.validation.every != 0 and main:
                bar.write(", ".join(f"{k} {v:.4f}" for k, v in self._validate().items()))
            self._require_finite_weights("final checkpoint")
            self._save_checkpoint()
            final = self.output_dir / "model.safetensors"
            if main:
                save_model(self.model, final, metadata={"kprpe_train_step": str(self.step)})
            barrier()
            return final
        finally:
            bar.close()
            if main and hasattr(self, "_csv_file"):
                self._csv_file.close()
                if self._tb is not None:
                    self._tb.close()
