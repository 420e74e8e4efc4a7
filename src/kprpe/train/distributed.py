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


class DistributedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the batch of all processes (works with gloo and NCCL),
    so W processes compute exactly what one process computes on the whole batch. Same state dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        stats = torch.cat([xf.sum(0), (xf * xf).sum(0), xf.new_tensor([float(x.shape[0])])])
        stats = all_reduce_sum(stats)
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c : 2 * c] / total - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * total / (total - 1).clamp_min(1))
        y = (xf - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def use_distributed_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every BatchNorm1d of ``module`` into :class:`DistributedBatchNorm1d`, in place (weights kept)."""
    for child in module.modules():
        if type(child) is nn.BatchNorm1d:
            child.__class__ = DistributedBatchNorm1d
    return module
