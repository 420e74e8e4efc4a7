"""The training loop: ``Trainer(config).run()`` — single process, or one process per GPU under torchrun —
for every task: face (the default, :class:`~kprpe.train.parts.FaceTask`) and gait (a ``task: gait`` config,
:class:`~kprpe.train.gait.GaitTask`). The task builds the model, data and loss; the loop is shared.

What a face step is: ``optim.accumulation_steps`` micro-batches of ``data.batch_size`` samples per process,
then one optimiser step. The global batch per step is ``batch_size x processes x accumulation_steps``. A gait
step is one P x K batch split over the processes. The data order, augmentation and partial-FC sampling are
functions of the seed and the step, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from ..errors import KprpeError
from ..files import atomic_write_text
from ..nn import save_model
from .checkpoint import CheckpointState, latest_checkpoint, restore_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import (
    DistInfo,
    DistributedBatchNorm1d,
    all_reduce_max_nograd,
    barrier,
    init_distributed,
    is_distributed,
    sum_allreduce_hook,
    use_distributed_batchnorm,
)
from .parts import FaceTask, Validator
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
    """Build everything from a config; :meth:`run` trains and returns the final model path.

    ``cfg``: a :class:`TrainConfig` (face) or a :class:`~kprpe.train.gait.GaitTrainConfig` (``task: gait``).
    ``resume``: None (fresh run; refuses an output directory that already has checkpoints), ``"latest"``
    (the newest checkpoint in ``train.output_dir``) or a checkpoint directory. ``step_callback(step)`` runs
    after every optimiser step (tests use it to simulate a crash).

    ``task`` (contract in train/parts.py) defaults to the config's: :class:`~kprpe.train.parts.FaceTask`,
    whose parts default to those the config describes: ``dataset`` (FaceDataset of ``data.*``), ``sampler``
    (ResumableSampler), ``head`` (PartialFC with the ``head.*`` margin over the dataset's ``num_classes``) and
    ``validator`` (verification accuracy on ``validation.pairs``); or the gait task of a gait config.
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
        task=None,
    ) -> None:
        self.cfg = cfg
        if task is None:
            task = default_task(cfg, dataset=dataset, sampler=sampler, head=head, validator=validator)
        self.task = task
        self.dist: DistInfo = init_distributed(cfg.train.device)
        self.device = self.dist.device
        self.output_dir = Path(cfg.train.output_dir)
        self.step_callback = step_callback
        if cfg.train.cpu_threads:
            torch.set_num_threads(cfg.train.cpu_threads)
        torch.manual_seed(cfg.train.seed)

        # in this order: the model's and the head's initialisation draw from one seeded RNG
        self.model = task.build_model()
        head = task.build_parts(self.model, self.dist)
        self.dataset, self.sampler = task.dataset, getattr(task, "sampler", None)
        self.steps_per_epoch, self.total_steps = task.steps_per_epoch, task.total_steps
        self.head = head.to(self.device)
        self.model.to(self.device)
        self.optimizer = task.make_optimizer(self.model, self.head)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, task.lr_lambda(self.total_steps))
        self.history: list[dict] = []  # logged rows and validations (log.jsonl), for curves
        self.last_validation: dict | None = None
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
        self.validator = task.validator(self.dist.is_main)  # validation runs on the main process only

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
        history = self.output_dir / "log.jsonl"
        if history.is_file():  # drop rows the interrupted run logged after its checkpoint
            rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
            self.history = [r for r in rows if r.get("step", 0) <= self.step]

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
                    "tensorboard)",
                    file=sys.stderr,
                )
        atomic_write_text(self.output_dir / "config.json", json.dumps(self.cfg.to_dict(), indent=1))

    def _record(self, row: dict) -> None:
        """Add ``row`` to the history (a validation at the step just logged joins that row) and rewrite
        log.jsonl whole, atomically (a resume drops the rows after its checkpoint)."""
        if self.history and self.history[-1].get("step") == row["step"]:
            self.history[-1].update(row)
        else:
            self.history.append(dict(row))
        text = "".join(json.dumps(r) + "\n" for r in self.history)
        atomic_write_text(self.output_dir / "log.jsonl", text)

    def _log(self, row: dict, extra: dict | None = None) -> None:
        self._csv.writerow(row)
        self._csv_file.flush()
        numbers = {k: float(row[k]) for k in ("lr", "loss", "grad_norm", "norm_mean", "samples_per_s")}
        self._record(dict(step=row["step"], seconds=float(row["elapsed_s"]), **numbers, **(extra or {})))
        if self._tb is not None:
            for k in ("lr", "loss", "grad_norm", "norm_mean", "samples_per_s"):
                self._tb.add_scalar(f"train/{k}", row[k], row["step"])

    def _validate(self) -> dict[str, float]:
        """Run the validator; append its metrics to validation.csv; return each set's first metric."""
        results = self.validator(self.model, self.device)
        self.last_validation = results
        path = self.output_dir / "validation.csv"
        headline = {}
        for name, metrics in results.items():
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step", "set", *metrics])
                # a metric may be None (Rank-5 with a gallery of 3)
                w.writerow([self.step, name, *("" if v is None else f"{v:.5f}" for v in metrics.values())])
            prefix = "val/" if len(results) == 1 else f"val/{name}/"
            self._record(dict(step=self.step, **{prefix + k: v for k, v in metrics.items()}))
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
        metrics: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            sync = contextlib.nullcontext() if (self.ddp is None or i == accum - 1) else self.ddp.no_sync()
            with sync:
                loss, info = self.task.loss(model, self.head, batch, self.device, amp)
                (loss / accum).backward()
            total_loss += float(info.pop("loss", loss).detach()) / accum
            norm_mean += float(info.pop("norm_mean")) / accum
            bad_index = info.pop("bad_index", [])
            bad += len(bad_index)
            if bad_index and self.dist.is_main:
                with open(self.output_dir / "bad_samples.txt", "a") as f:
                    f.write("".join(f"{i}\n" for i in bad_index))
            for key, value in info.items():
                if key in self.task.metrics:
                    metrics[key] = metrics.get(key, 0.0) + float(value) / accum
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
        return dict(
            loss=total_loss,
            grad_norm=grad_norm,
            lr=lr,
            norm_mean=norm_mean,
            bad=bad,
            finite=finite,
            metrics=metrics,
        )

    def _require_finite_weights(self, what: str) -> None:
        """Never write a model whose weights or statistics are NaN/inf (it would replace good checkpoints)."""
        for module in (self.model, self.head):
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise TrainingDiverged(
                        f"step {self.step}: {name} holds non-finite values; {what} not written, "
                        f"the last good checkpoint in {self.output_dir / 'checkpoints'} is kept"
                    )

    def run(self) -> Path:
        """Train to ``total_steps``; checkpoints every ``train.checkpoint_every`` steps and at the end; writes
        ``<output_dir>/model.safetensors`` (loadable by ``kprpe.load_official``) and returns its path."""
        cfg, main = self.cfg, self.dist.is_main
        if main:
            self._open_logs()
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
            every = cfg.validation.every  # 0: only at the end
            if self.step < self.total_steps:
                for pending in self.task.step_batches(self):
                    out = self.train_step(pending)
                    window.append(out)
                    if main:
                        bar.update(1)
                        bar.set_postfix(loss=f"{out['loss']:.3f}", lr=f"{out['lr']:.2e}")
                        if not out["finite"]:
                            bar.write(
                                f"step {self.step}: non-finite loss or gradient; update skipped "
                                f"({self.nonfinite_streak} in a row, "
                                f"patience {cfg.train.nonfinite_patience})",
                                file=sys.stderr,
                            )
                    if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                        if main:
                            elapsed = time.time() - window_start
                            n = len(window)
                            samples = n * self.task.samples_per_step
                            extra = {
                                k: sum(o["metrics"].get(k, 0.0) for o in window) / n for k in out["metrics"]
                            }
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
                                ),
                                extra,
                            )
                        window, window_start = [], time.time()
                    if self.validator is not None and every and self.step % every == 0 and main:
                        bar.write(
                            f"step {self.step}: "
                            + ", ".join(f"{k} {v:.4f}" for k, v in self._validate().items()),
                            file=sys.stderr,
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
            if self.validator is not None and (not every or self.step % every != 0) and main:
                bar.write(", ".join(f"{k} {v:.4f}" for k, v in self._validate().items()), file=sys.stderr)
            if main and self.last_validation is not None:
                self.task.write_results(self.output_dir, self.step, self.last_validation)
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


def default_task(cfg, **parts):
    """The task a config describes: gait for a ``task: gait`` config, else face with ``parts``."""
    if getattr(cfg, "task", "face") == "gait":
        from .gait import GaitTask

        if any(v is not None for v in parts.values()):
            raise TypeError(
                "dataset=, sampler=, head= and validator= are face parts; a gait config builds its own"
            )
        return GaitTask(cfg)
    return FaceTask(cfg, **parts)
