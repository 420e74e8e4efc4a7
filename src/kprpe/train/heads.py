"""Classification heads for face-recognition training: margins on cosine logits, and partial FC.

A *margin* turns the cosine logits ``cos (B, C)`` of a batch into the logits fed to softmax cross-entropy:

- :class:`CombinedMargin` ``s * (cos(m1 * theta + m2) - m3)`` on the target class, ``s * cos`` elsewhere
  (ArcFace: ``m2``; CosFace: ``m3``; SphereFace-style: ``m1``).
- :class:`AdaFaceMargin` — margins scaled by the feature norm relative to an EMA of the batch norm
  statistics (``batch_mean``, ``batch_std`` are buffers, so they are saved with the head and resumed).
- :class:`PlainLogits` — a plain fully connected classifier: raw ``x W^T`` logits, nothing normalised.

How the margin is differentiated (``gradient``, see :data:`MARGIN_GRADIENTS`):

- ``straight_through`` (default; what the official CVLface heads and insightface's arcface_torch do): the
  margin is written into the target logit without gradient, so ``d logit / d cos = s`` everywhere and the
  cosine receives the plain softmax cross-entropy gradient times ``s``, however easy the target.
- ``exact``: the textbook derivative of the margin formula, e.g. ``s * sin(theta + m) / sin(theta)`` for
  ArcFace, which grows without bound as a target gets easy (cosine -> 1); evaluated at a cosine clamped to
  ``[-1 + eps, 1 - eps]``. Kept for ablations; the logits are the same in both modes.

:class:`PartialFC` holds the class centres, sharded across processes (process ``r`` owns a contiguous range
of classes), gathers the embeddings of the whole global batch, optionally samples a fraction of the local
centres (always keeping the batch's positives), applies the margin and computes the exact softmax
cross-entropy over all processes' logits. With one process and ``sample_rate=1`` it is an ordinary FC layer.
Labels of ``-1`` in a margin's input mean "this row's target class is not among these columns".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_gather_nograd, all_reduce_max_nograd, all_reduce_sum_replicated, gather_with_grad
from .distributed import rank as dist_rank
from .distributed import world_size as dist_world_size

__all__ = [
    "CombinedMargin",
    "AdaFaceMargin",
    "PlainLogits",
    "PartialFC",
    "MARGIN_GRADIENTS",
    "build_margin",
    "class_shard",
    "init_class_centres",
    "distributed_cross_entropy",
]

MARGIN_GRADIENTS = ("straight_through", "exact")


def _check_gradient(gradient: str) -> str:
    if gradient not in MARGIN_GRADIENTS:
        raise ValueError(f"margin gradient must be one of {', '.join(MARGIN_GRADIENTS)}, got {gradient!r}")
    return gradient


def _apply_target_margin(
    cos: torch.Tensor,
    labels: torch.Tensor,
    margined: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    gradient: str,
    eps: float,
) -> torch.Tensor:
    """``cos`` with ``margined(target_cos, rows)`` written at ``[rows, labels[rows]]`` (rows: labels >= 0).

    Only the ``B`` target entries are transformed (the other ``B x C`` cosines pass through untouched).
    ``straight_through``: the change is added without gradient, so ``d out / d cos`` is 1 everywhere.
    ``exact``: the target's derivative is the formula's, taken at the cosine clamped to ``[-1+eps, 1-eps]``
    (acos has an infinite slope at +-1); its value is the formula at the unclamped cosine, as above.
    """
    if labels.shape != cos.shape[:1]:
        raise ValueError(
            f"labels must be ({cos.shape[0]},) for cosines of shape {tuple(cos.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if bool((labels >= cos.shape[1]).any()):
        raise ValueError(
            f"labels {labels[labels >= cos.shape[1]][:5].tolist()} are outside the {cos.shape[1]} columns"
        )
    rows = torch.nonzero(labels >= 0).squeeze(1)
    cols = labels[rows]
    target = cos[rows, cols]
    with torch.no_grad():
        value = margined(target.detach(), rows)
    if gradient == "straight_through":
        shift = torch.zeros_like(cos)
        shift[rows, cols] = (value - target.detach()).to(cos.dtype)
        return cos + shift
    safe = target + (target.clamp(-1 + eps, 1 - eps) - target).detach()  # clamped value, gradient kept
    with_grad = margined(safe, rows)
    with_grad = with_grad + (value - with_grad).detach()
    return cos.index_put((rows, cols), with_grad.to(cos.dtype))


class CombinedMargin(nn.Module):
    """``s * (cos(m1 * theta + m2) - m3)`` for the target, ``s * cos`` for other classes.

    The angle is not limited: with ``theta + m2 > pi`` the target logit is ``cos`` of that angle, as in the
    official heads. ``gradient``: ``straight_through`` (official) or ``exact`` (module docstring)."""

    normalized = True

    def __init__(
        self,
        scale: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        eps: float = 1e-7,
        gradient: str = "straight_through",
    ) -> None:
        super().__init__()
        self.scale, self.m1, self.m2, self.m3, self.eps = float(scale), float(m1), float(m2), float(m3), eps
        self.gradient = _check_gradient(gradient)

    def _margined(self, target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.m1 != 1.0 or self.m2 != 0.0:
            target = torch.cos(self.m1 * torch.acos(target.clamp(-1, 1)) + self.m2)
        return target - self.m3

    def forward(self, cos: torch.Tensor, labels: torch.Tensor, norms=None, valid=None) -> torch.Tensor:
        return self.scale * _apply_target_margin(cos, labels, self._margined, self.gradient, self.eps)

    def extra_repr(self) -> str:
        return f"s={self.scale}, m1={self.m1}, m2={self.m2}, m3={self.m3}, gradient={self.gradient}"


class AdaFaceMargin(nn.Module):
    """AdaFace (Kim et al., CVPR 2022): the margin adapts to image quality, proxied by the feature norm.

    In training mode the EMA statistics are first updated from this batch (``t_alpha``; norms clipped to
    ``[0.001, 100]``, mean and unbiased std over the rows marked ``valid``, which include rows labelled -1),
    then ``scaler = clip(h * (norm - mean) / (std + eps), -1, 1)``; the target logit is
    ``s * (cos(theta - m * scaler) - (m + m * scaler))``. The angle ``theta - m * scaler`` is not clipped
    (for an easy target with a high norm it is the cosine of a negative angle, as in the official code);
    other logits are ``s * cos``. ``gradient``: ``straight_through`` (official) or ``exact``.
    """

    normalized = True

    def __init__(
        self,
        scale: float = 64.0,
        margin: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        eps: float = 1e-3,
        gradient: str = "straight_through",
    ) -> None:
        super().__init__()
        self.scale, self.margin, self.h, self.t_alpha = float(scale), float(margin), float(h), float(t_alpha)
        self.eps = eps
        self.gradient = _check_gradient(gradient)
        self.register_buffer("batch_mean", torch.ones(1) * 20.0)
        self.register_buffer("batch_std", torch.ones(1) * 100.0)

    def forward(
        self,
        cos: torch.Tensor,
        labels: torch.Tensor,
        norms: torch.Tensor | None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if norms is None:
            raise ValueError("AdaFace needs the embedding norms")
        safe = norms.detach().float().reshape(-1).clamp(0.001, 100.0)
        if safe.shape[0] != cos.shape[0]:
            raise ValueError(f"AdaFace got {safe.shape[0]} norms for {cos.shape[0]} rows of cosines")
        stats = safe if valid is None else safe[valid]
        if self.training and stats.numel() > 1:
            with torch.no_grad():
                self.batch_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * stats.mean())
                self.batch_std.mul_(1 - self.t_alpha).add_(self.t_alpha * stats.std())
        scaler = ((safe - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1, 1)

        def margined(target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            row_scaler = scaler[rows].to(target.dtype)
            angle = torch.acos(target.clamp(-1, 1)) - self.margin * row_scaler
            return torch.cos(angle) - (self.margin + self.margin * row_scaler)

        return self.scale * _apply_target_margin(cos, labels, margined, self.gradient, self.eps)

    def extra_repr(self) -> str:
        return (
            f"s={self.scale}, m={self.margin}, h={self.h}, t_alpha={self.t_alpha}, gradient={self.gradient}"
        )


class PlainLogits(nn.Module):
    """A plain FC classifier: logits are ``x W^T`` unchanged (no normalisation, no margin)."""

    normalized = False

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, norms=None, valid=None) -> torch.Tensor:
        return logits


def build_margin(
    kind: str,
    *,
    scale: float = 64.0,
    margin: float | None = None,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    h: float = 0.333,
    t_alpha: float = 0.01,
    gradient: str = "straight_through",
) -> nn.Module:
    """``adaface`` (m 0.4), ``arcface`` (m2 = margin, 0.5), ``cosface`` (m3 = margin, 0.4), ``combined``
    (m1, m2, m3 as given) or ``softmax`` (plain FC). ``gradient``: ``straight_through`` (the official
    heads' backward) or ``exact`` (the textbook derivative); see the module docstring."""
    _check_gradient(gradient)
    if kind == "adaface":
        return AdaFaceMargin(scale, 0.4 if margin is None else margin, h, t_alpha, gradient=gradient)
    if kind == "arcface":
        return CombinedMargin(scale, 1.0, 0.5 if margin is None else margin, 0.0, gradient=gradient)
    if kind == "cosface":
        return CombinedMargin(scale, 1.0, 0.0, 0.4 if margin is None else margin, gradient=gradient)
    if kind == "combined":
        return CombinedMargin(scale, m1, m2, m3, gradient=gradient)
    if kind == "softmax":
        return PlainLogits()
    raise ValueError(f"unknown head type {kind!r}; expected adaface, arcface, cosface, combined or softmax")


def class_shard(num_classes: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, count)`` of the classes process ``rank`` owns: contiguous, sizes differing by at most one."""
    base, extra = divmod(num_classes, world)
    count = base + (1 if rank < extra else 0)
    start = rank * base + min(rank, extra)
    return start, count


class PartialFC(nn.Module):
    """Sharded class centres + margin + exact distributed softmax cross-entropy.

    ``forward(embeddings (b, D), labels (b,), valid (b,) bool or None) -> (loss, info)`` where ``b`` is this
    process's part of the batch. ``loss`` is the mean over valid samples of the *global* batch and is the
    same number on every process. With ``sample_rate < 1`` each process uses ``max(#positives,
    round(rate * local classes))`` of its centres: all positive classes of the global batch plus random others
    (from :attr:`generator`, seeded per process, saved in checkpoints via :meth:`extra_state`).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: nn.Module,
        *,
        sample_rate: float = 1.0,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.rank = dist_rank() if rank is None else rank
        self.world_size = dist_world_size() if world_size is None else world_size
        if num_classes < self.world_size:
            raise ValueError(f"{num_classes} classes cannot be sharded over {self.world_size} processes")
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.class_start, self.num_local = class_shard(num_classes, self.world_size, self.rank)
        self.sample_rate = float(sample_rate)
        self.margin = margin
        self.weight = nn.Parameter(init_class_centres(self.class_start, self.num_local, embedding_dim, seed))
        self.generator = torch.Generator().manual_seed(int(seed) * 1000 + self.rank)
        self.last_sampled: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"classes {self.class_start}..{self.class_start + self.num_local - 1} of {self.num_classes} "
            f"(rank {self.rank}/{self.world_size}), dim={self.embedding_dim}, sample_rate={self.sample_rate}"
        )

    def sample(self, local_labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Sorted indices of the local centres to use (None: all) and the labels remapped to them."""
        if self.sample_rate >= 1.0:
            return None, local_labels
        num_sample = max(1, int(round(self.sample_rate * self.num_local)))
        positives = torch.unique(local_labels[local_labels >= 0]).cpu()
        if positives.numel() >= num_sample:
            index = positives
        else:
            scores = torch.rand(self.num_local, generator=self.generator)
            scores[positives] = 2.0
            index = torch.topk(scores, num_sample).indices.sort().values
        index = index.to(local_labels.device)
        remapped = torch.where(
            local_labels >= 0, torch.searchsorted(index, local_labels.clamp(min=0)), local_labels
        )
        return index, remapped

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None):
        # Always float32, even inside a caller's bf16 autocast: bf16 cosines are quantised to ~4e-3 near 1
        # (s * cos to 0.25 at s = 64). The norms are those of the embeddings as given (bf16-rounded under
        # amp).
        with torch.autocast(embeddings.device.type, enabled=False):
            return self._forward(embeddings, labels, valid)

    def _forward(self, embeddings: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None):
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must be (B, {self.embedding_dim}), got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels must be ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        if valid is None:
            valid = torch.ones_like(labels, dtype=torch.bool)
        embeddings = embeddings.float()
        all_emb = gather_with_grad(embeddings)
        all_labels = all_gather_nograd(labels)
        all_valid = all_gather_nograd(valid)
        if ((all_labels < 0) | (all_labels >= self.num_classes))[all_valid].any():
            bad = all_labels[all_valid & ((all_labels < 0) | (all_labels >= self.num_classes))][:5].tolist()
            raise ValueError(f"labels {bad} are outside 0..{self.num_classes - 1}")
        in_shard = (
            (all_labels >= self.class_start) & (all_labels < self.class_start + self.num_local) & all_valid
        )
        local_labels = torch.where(in_shard, all_labels - self.class_start, torch.full_like(all_labels, -1))
        index, local_labels = self.sample(local_labels)
        weight = self.weight if index is None else self.weight[index]
        self.last_sampled = index
        norms = all_emb.norm(dim=1, keepdim=True)
        if self.margin.normalized:
            cos = F.normalize(all_emb, dim=1) @ F.normalize(weight, dim=1).t()
            logits = self.margin(cos.clamp(-1, 1), local_labels, norms, all_valid)
        else:
            logits = self.margin(all_emb @ weight.t(), local_labels, norms, all_valid)
        loss = distributed_cross_entropy(logits, local_labels, all_valid)
        return loss, {"norm_mean": norms.detach()[all_valid].mean()}

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def init_class_centres(start: int, count: int, dim: int, seed: int, chunk: int = 1024) -> torch.Tensor:
    """N(0, 0.01) centres for classes ``start .. start + count - 1``; class ``c`` gets the same values however
    the classes are sharded (chunks of ``chunk`` classes each have their own seeded generator), so W processes
    start from exactly the single-process head."""
    out = torch.empty(count, dim)
    first, last = start // chunk, (start + count - 1) // chunk
    for block in range(first, last + 1):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + block)
        values = torch.empty(chunk, dim).normal_(0, 0.01, generator=g)
        lo, hi = max(start, block * chunk), min(start + count, (block + 1) * chunk)
        out[lo - start : hi - start] = values[lo - block * chunk : hi - block * chunk]
    return out


def distributed_cross_entropy(
    logits: torch.Tensor, local_labels: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Softmax cross-entropy where each process holds some columns of ``logits`` (the global batch's rows);
    ``local_labels[i]`` is the target column here or -1 if another process holds it. Mean over valid rows."""
    row_max = all_reduce_max_nograd(logits.detach().max(dim=1).values)
    sum_exp = all_reduce_sum_replicated(torch.exp(logits - row_max[:, None]).sum(dim=1))
    has_target = local_labels >= 0
    target = logits.gather(1, local_labels.clamp(min=0)[:, None]).squeeze(1)
    target = all_reduce_sum_replicated(torch.where(has_target, target, torch.zeros_like(target)))
    per_sample = torch.log(sum_exp) + row_max - target
    weights = valid.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp(min=1.0)
