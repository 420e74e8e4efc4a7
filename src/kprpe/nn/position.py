"""Position encodings that act on attention logits: RPE bias tables and contextual iRPE, and the bias
formation KP-RPE (:mod:`kprpe.nn.keypoint_rpe`) shares with them.

Shapes used throughout: ``B`` batch, ``H`` heads, ``N`` tokens (row-major patch grid), ``nb`` buckets.
A *bias table* is ``(B, H, N, nb)``: for each query token, one value per bucket. Turning it into the
``(B, H, N, N)`` additive logit bias is a gather with the fixed ``(N, N)`` bucket index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BIAS_IMPLS",
    "BucketBias",
    "gather_bias",
    "form_bias",
    "RelativePositionBias",
    "ContextualRPE",
]

# How a (B, H, N, nb) table becomes the (B, H, N, N) bias (all give the same numbers; speed differs):
#   naive  - advanced indexing table[:, :, arange(N)[:, None], ids], as the official code does
#   gather - torch.gather with the (N, N) index broadcast over batch and heads
#   index  - one index_select over the flattened table with a precomputed flat index
#   onehot - einsum with a one-hot (N, N, nb) matrix (a matmul; can pay off on accelerators)
BIAS_IMPLS = ("naive", "gather", "index", "onehot")


class BucketBias(NamedTuple):
    """A logit bias kept as a per-bucket table: ``bias[b, h, i, j] = table[b, h, i, ids[i, j]]``.

    Attention kernels that can index the table themselves (FlexAttention) never build the dense bias; the
    fused kernel with KP-RPE's own backward (:mod:`kprpe.nn.kprpe_attention`) builds it with ``form`` (the
    model's chosen bias path) and takes the table's gradient directly."""

    table: torch.Tensor  # (B|1, H, N|1, nb)
    ids: torch.Tensor  # (N, N)
    # builds the dense bias of the samples in a batch slice (None: all) the model's way (default: a gather)
    form: Callable[[slice | None], torch.Tensor] | None = None

    def dense(self, impl: str | None = None, batch: slice | None = None) -> torch.Tensor:
        if impl is None and self.form is not None:
            return self.form(batch)
        table = self.table if batch is None or self.table.shape[0] == 1 else self.table[batch]
        return form_bias(table, self.ids, impl or "gather")


def gather_bias(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``bias[b, h, i, j] = table[b, h, i, ids[i, j]]``: ``(B, H, N or 1, nb)`` -> ``(B, H, N, N)``.

    ``ids`` is the ``(N, N)`` index or that index already expanded to ``(B, H, N, N)`` (a caller that forms
    many layers' biases expands it once: in an exported ONNX graph that is one Expand instead of one a layer).
    """
    n = ids.shape[-1]
    b, h = table.shape[:2]
    if table.shape[2] != n:
        table = table.expand(b, h, n, table.shape[-1])
    return torch.gather(table, 3, ids if ids.ndim == 4 else ids.expand(b, h, n, n))


def form_bias(
    table: torch.Tensor,
    ids: torch.Tensor,
    impl: str = "gather",
    *,
    flat_index: torch.Tensor | None = None,
    one_hot: torch.Tensor | None = None,
) -> torch.Tensor:
    """``bias[b, h, i, j] = table[b, h, i, ids[i, j]]`` by the chosen implementation (see BIAS_IMPLS).

    ``flat_index`` (``i * nb + ids[i, j]`` flattened) and ``one_hot`` (``(N, N, nb)``) are derived from
    ``ids``;
    callers that form many biases keep them (:class:`~kprpe.nn.keypoint_rpe.KeypointRPE` holds them as
    buffers), others let this function build them.
    """
    n = ids.shape[0]
    b, h, _, nb = table.shape
    if impl == "gather":
        return gather_bias(table, ids)
    if impl == "index":
        if flat_index is None:
            flat_index = (torch.arange(n, device=ids.device)[:, None] * nb + ids).flatten()
        flat = table.expand(b, h, n, nb).reshape(b, h, n * nb)
        return flat.index_select(2, flat_index).view(b, h, n, n)
    if impl == "naive":
        rows = torch.arange(n, device=ids.device)[:, None]
        return table.expand(b, h, n, nb)[:, :, rows, ids]
    if impl == "onehot":
        one_hot = F.one_hot(ids, nb) if one_hot is None else one_hot
        return torch.einsum("bhik,ijk->bhij", table.expand(b, h, n, nb), one_hot.to(table.dtype))
    raise ValueError(f"unknown bias implementation {impl!r}; expected one of {BIAS_IMPLS}")


class RelativePositionBias(nn.Module):
    """Plain RPE: a learned bias per head and bucket, ``B[h, i, j] = table[h, d(i, j)]``.

    A position term of :class:`~kprpe.nn.attention.Attention`: ``static`` (it depends on positions only),
    so it joins the additive mask of the fused kernel."""

    static = True
    order = 0

    def __init__(self, num_heads: int, num_buckets: int = 49) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(num_heads, num_buckets))
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``(1, H, N, N)`` bias for bucket index ``ids``."""
        n = ids.shape[0]
        return gather_bias(self.table[None, :, None, :], ids).reshape(1, -1, n, n)

    bias = forward


class ContextualRPE(nn.Module):
    """One iRPE contextual table (official name ``lookup_table_weight``), on the query, key or value side.

    ``kind='k'`` (the term read with the query): weight ``(T, head_dim, nb)``; adds
    ``(q s)[b, h, i] @ W [ids[i, j]]`` to the logits. ``kind='q'`` (read with the key): the same with the
    scaled key and the index transposed, ``(k s)[b, h, j] @ W [ids[j, i]]``. ``kind='v'``: weight
    ``(T, nb, head_dim)``; adds ``sum_j a[b, h, i, j] * W[ids[i, j]]`` to the output (it needs the
    probabilities ``a``). ``T`` is 1 when the table is shared by all heads, else the number of heads.
    ``forward(x, ids)`` is the table's own product: ``x`` is the scaled query/key (``'q'``/``'k'``, before the
    transpose) or the probabilities (``'v'``).
    """

    static = False  # reads q/k or the probabilities: always the explicit attention path

    def __init__(
        self, kind: str, head_dim: int, num_heads: int, shared_head: bool = True, num_buckets: int = 49
    ):
        super().__init__()
        if kind not in ("q", "k", "v"):
            raise ValueError(f"kind must be 'q', 'k' or 'v', got {kind!r}")
        self.kind = kind
        self.order = "kqv".index(kind)  # logits add the key-side term first (the official order)
        tables = 1 if shared_head else num_heads
        shape = (tables, head_dim, num_buckets) if kind != "v" else (tables, num_buckets, head_dim)
        self.lookup_table_weight = nn.Parameter(torch.zeros(shape))
        nn.init.trunc_normal_(self.lookup_table_weight, std=0.02)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        w = self.lookup_table_weight.to(x.dtype)[None]  # (1, T, ., .) broadcasts over batch (heads if T=1)
        if self.kind != "v":
            return gather_bias(torch.matmul(x, w), ids)
        b, h, n, _ = x.shape
        # sum attention probability per bucket, then one small matmul with the value table
        per_bucket = x.new_zeros(b, h, n, w.shape[-2]).scatter_add_(3, ids.expand(b, h, n, n), x)
        return torch.matmul(per_bucket, w)

    def logits(self, q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """This table's logit term given the scaled ``q`` and ``k`` (None for the value table)."""
        if self.kind == "k":
            return self(q, ids)
        if self.kind == "q":
            return self(k, ids).transpose(2, 3)
        return None

    def output(self, attn: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """The value table's output term from the probabilities (None for the query/key tables)."""
        return self(attn, ids) if self.kind == "v" else None
