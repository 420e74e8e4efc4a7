"""A deterministic, resumable, rank-aware sampler.

Epoch ``e`` shuffles all samples with ``seed`` and ``e``; global micro-batch ``j`` is
``perm[j*B*W : (j+1)*B*W]`` (``B`` per-process batch, ``W`` processes) and process ``r`` takes its ``r``-th
slice — so ``W`` processes see exactly the batch one process with batch ``B*W`` would see. Each item is
``(sample index, augmentation seed)`` with the seed derived from ``(seed, epoch, position)``: augmentation
does not depend on DataLoader workers, and resuming at micro-batch ``j`` continues the same sequence.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from ..errors import KprpeError

__all__ = ["ResumableSampler", "TooFewSamplesError"]


class TooFewSamplesError(KprpeError, ValueError):
    """The data set holds less than one global batch (a small fine-tuning folder): no step could run."""


class ResumableSampler(Sampler):
    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        micro_batches_multiple: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = shuffle
        global_batch = self.batch_size * self.world_size
        micro = self.num_samples // global_batch
        self.micro_batches_per_epoch = (micro // micro_batches_multiple) * micro_batches_multiple
        if self.micro_batches_per_epoch == 0:
            raise TooFewSamplesError(
                f"{self.num_samples} samples are fewer than one global batch ({self.batch_size} x "
                f"{self.world_size} processes x {micro_batches_multiple} accumulation steps); lower "
                f"data.batch_size (per process, e.g. data.batch_size={max(1, self.num_samples // 2)}) or add "
                "data"
            )
        self.epoch = 0
        self.start_micro_batch = 0

    def set_epoch(self, epoch: int, start_micro_batch: int = 0) -> None:
        """Choose the epoch's order and skip its first ``start_micro_batch`` micro-batches (resume)."""
        if not 0 <= start_micro_batch <= self.micro_batches_per_epoch:
            raise ValueError(
                f"start_micro_batch {start_micro_batch} outside 0..{self.micro_batches_per_epoch}"
            )
        self.epoch = int(epoch)
        self.start_micro_batch = int(start_micro_batch)

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __len__(self) -> int:
        return (self.micro_batches_per_epoch - self.start_micro_batch) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, tuple[int, int, int]]]:
        perm = self.permutation(self.epoch)
        b, w = self.batch_size, self.world_size
        for j in range(self.start_micro_batch, self.micro_batches_per_epoch):
            base = j * b * w + self.rank * b
            for pos in range(base, base + b):
                yield int(perm[pos]), (self.seed, self.epoch, pos)
