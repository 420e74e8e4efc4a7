"""The little of ``torch.distributed`` training needs: process info and autograd-aware collectives.

Everything degrades to a no-op when no process group is initialised, so single-process code is the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_distributed",
    "world_size",
    "rank",
    "gather_with_grad",
    "all_gather_nograd",
    "all_reduce_sum_replicated",
    "all_reduce_max_nograd",
    "all_reduce_sum",
    "sum_allreduce_hook",
    "barrier",
    "DistributedBatchNorm1d",
    "DistributedBatchNorm2d",
    "DistributedBatchNorm3d",
    "use_distributed_batchnorm",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment), NCCL on GPUs and
    gloo on CPU; otherwise a single process. ``device``: auto | cpu | cuda."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if env_world > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank(), world_size(), local_rank, dev)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums every process's gradient and returns this process's slice.

    Right when each process computes a *different part* of one replicated loss from the gathered tensor
    (partial FC: each process holds a shard of the class centres)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ws = dist.get_world_size()
        ctx.rank, ctx.batch = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(ws)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def _summed_copy(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _SumReplicated(torch.autograd.Function):
    """All-reduce (sum) whose result feeds a loss replicated on every process: d(sum)/d(part) = identity."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return _summed_copy(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _AllReduceSum(torch.autograd.Function):
    """All-reduce (sum) of per-process *partial* terms; backward sums the gradients as well (each process
    back-propagates only through its own use of the result)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return _summed_copy(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _summed_copy(grad)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over processes (for statistics such as distributed batch norm)."""
    return _AllReduceSum.apply(tensor) if is_distributed() else tensor


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``tensor`` (equal shapes) along dim 0, differentiably."""
    return _GatherWithGrad.apply(tensor) if is_distributed() else tensor


def all_gather_nograd(tensor: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum_replicated(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, for terms of a loss every process computes identically."""
    return _SumReplicated.apply(tensor) if is_distributed() else tensor


def all_reduce_max_nograd(tensor: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def sum_allreduce_hook(process_group, bucket):
    """DDP communication hook that *sums* gradients instead of averaging them.

    With partial FC each process back-propagates the full replicated loss restricted to its own samples, so
    the true gradient is the sum over processes (DDP's default mean would divide it by the world size)."""
    group = process_group if process_group is not None else dist.group.WORLD
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class _GlobalBatchStatistics:
    """The training forward of :class:`DistributedBatchNorm1d` / ``2d`` / ``3d``: statistics per channel
    (dim 1) over every other dim of the batches of all processes, so W processes compute exactly what one
    process computes on the whole batch, forward and backward. Works with gloo and NCCL; hand-written
    because ``nn.SyncBatchNorm`` refuses CPU tensors (torch 2.13: "expected input tensor to be on GPU"),
    so gloo runs could not use it.

    Each process computes its share's count, mean and centred sum of squares (torch's two-pass kernel, no
    E[x^2] - E[x]^2 cancellation); one differentiable all-gather brings every share's row to every process,
    where they combine exactly (Chan et al.). The gather's backward sums every process's gradient of the
    rows, which makes the input gradient the one-process gradient. Uneven shares are fine (the counts weigh
    them); an empty share contributes nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = x.numel() // c if c else 0
        if count:
            var, mean = torch.var_mean(xf, dim=dims, correction=0)
        else:  # zeros that still belong to the graph
            mean = var = xf.sum(dims)
        row = torch.cat([xf.new_tensor([float(count)]), mean, var * count])
        rows = gather_with_grad(row[None])  # (processes, 1 + 2C)
        counts, means, sums_sq = rows[:, :1], rows[:, 1 : 1 + c], rows[:, 1 + c :]
        total = counts.sum().clamp_min(1)
        mean = (counts * means).sum(0) / total
        sum_sq = sums_sq.sum(0) + (counts * (means - mean) ** 2).sum(0)
        var = sum_sq / total  # biased: what normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                # unbiased, with the count of all processes (as nn.BatchNorm on the whole batch)
                self.running_var.mul_(1 - m).add_(m * sum_sq.detach() / (total - 1).clamp_min(1))
        # torch's CPU kernel's form: y = x * alpha + beta (saves x, not a normalised copy)
        alpha = torch.rsqrt(var + self.eps)
        beta = -mean * alpha
        if self.affine:
            alpha = alpha * self.weight
            beta = self.bias + beta * self.weight
        shape = (1, c) + (1,) * (x.dim() - 2)
        return (xf * alpha.view(shape) + beta.view(shape)).to(x.dtype)


class DistributedBatchNorm1d(_GlobalBatchStatistics, nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the batch of all processes (works with gloo and NCCL),
    so W processes compute exactly what one process computes on the whole batch. Same state dict keys."""


class DistributedBatchNorm2d(_GlobalBatchStatistics, nn.BatchNorm2d):
    """BatchNorm2d over the batch of all processes (N x H x W values per channel). Same state dict keys."""


class DistributedBatchNorm3d(_GlobalBatchStatistics, nn.BatchNorm3d):
    """BatchNorm3d over the batch of all processes (N x D x H x W values per channel). Same keys."""


_DISTRIBUTED = {
    nn.BatchNorm1d: DistributedBatchNorm1d,
    nn.BatchNorm2d: DistributedBatchNorm2d,
    nn.BatchNorm3d: DistributedBatchNorm3d,
}


def use_distributed_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every BatchNorm1d / 2d / 3d of ``module`` into its ``Distributed`` twin, in place (weights,
    buffers and state dict keys kept). Subclasses of the torch classes are left alone (their own forward)."""
    for child in module.modules():
        twin = _DISTRIBUTED.get(type(child))
        if twin is not None:
            child.__class__ = twin
    return module
