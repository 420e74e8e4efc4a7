"""Position encodings that act on attention logits: RPE bias tables, contextual iRPE, and KP-RPE.

Shapes used throughout: ``B`` batch, ``H`` heads, ``N`` tokens (row-major patch grid), ``nb`` buckets.
A *bias table* is ``(B, H, N, nb)``: for each query token, one value per bucket. Turning it into the
``(B, H, N, N)`` additive logit bias is a gather with the fixed ``(N, N)`` bucket index.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "KP_INPUTS",
    "KP_SHARINGS",
    "patch_centres",
    "relative_keypoints",
    "keypoint_features",
    "BIAS_IMPLS",
    "BucketBias",
    "gather_bias",
    "form_bias",
    "RelativePositionBias",
    "ContextualRPE",
    "KeypointBiasFunction",
]

KP_INPUTS = ("relative", "absolute", "query_position")
KP_SHARINGS = ("layer_head", "head", "shared")
# How a (B, H, N, nb) table becomes the (B, H, N, N) bias (all give the same numbers; speed differs):
#   naive  - advanced indexing table[:, :, arange(N)[:, None], ids], as the official code does
#   gather - torch.gather with the (N, N) index broadcast over batch and heads
#   index  - one index_select over the flattened table with a precomputed flat index
#   onehot - einsum with a one-hot (N, N, nb) matrix (a matmul; can pay off on accelerators)
BIAS_IMPLS = ("naive", "gather", "index", "onehot")


def patch_centres(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(N, 2)`` normalised (x, y) centre of every patch, token ``n = row * width + col``.

    Centres are midpoints of ``linspace(0, 1, S + 1)`` computed in float32 — the official code's values,
    which differ from ``(i + 0.5) / S`` by one ulp for some ``i``.
    """

    def mids(size: int) -> torch.Tensor:
        edges = torch.linspace(0, 1, size + 1, dtype=torch.float32)
        return (edges[:-1] + edges[1:]) / 2

    cx = mids(width).repeat(height)
    cy = mids(height).repeat_interleave(width)
    return torch.stack([cx, cy], dim=-1).to(device=device, dtype=dtype)


def relative_keypoints(keypoints: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, N, 2K)`` offsets *patch centre minus keypoint*, interleaved ``(dx_0, dy_0, dx_1, ...)``.

    ``keypoints`` is ``(B, K, 2)`` with (x, y) normalised to [0, 1] by the input image's width/height.
    No gradient flows back into the keypoints.
    """
    kp = keypoints.detach().float()
    centres = patch_centres(height, width, device=kp.device)  # (N, 2)
    rel = centres[None, :, None, :] - kp[:, None, :, :]  # (B, N, K, 2)
    return rel.flatten(2)


def keypoint_features(keypoints: torch.Tensor | None, height: int, width: int, kp_input: str) -> torch.Tensor:
    """Input of f for each query token: ``(B, N, F)``, or ``(B, 1, F)`` / ``(1, N, F)`` when it is constant.

    - ``relative``: patch centre minus each keypoint (the paper's KP-RPE), F = 2K.
    - ``absolute``: the flattened keypoints themselves, the same for every query, F = 2K.
    - ``query_position``: the query patch centre only, no keypoints (a keypoint-free control), F = 2.
    """
    if kp_input == "relative":
        return relative_keypoints(keypoints, height, width)
    if kp_input == "absolute":
        return keypoints.detach().float().flatten(1)[:, None, :]
    if kp_input == "query_position":
        device = keypoints.device if keypoints is not None else None
        return patch_centres(height, width, device=device)[None]
    raise ValueError(f"unknown kp_input {kp_input!r}; expected one of {KP_INPUTS}")


class BucketBias(NamedTuple):
    """A logit bias kept as a per-bucket table: ``bias[b, h, i, j] = table[b, h, i, ids[i, j]]``.

    Attention kernels that can index the table themselves (FlexAttention) never build the dense bias."""

    table: torch.Tensor  # (B, H, N or 1, nb)
    ids: torch.Tensor  # (N, N)

    def dense(self, impl: str = "gather") -> torch.Tensor:
        return form_bias(self.table, self.ids, impl)


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


_FLAT_INDEX: dict[tuple, torch.Tensor] = {}
_ONE_HOT: dict[tuple, torch.Tensor] = {}


def _flat_index(ids: torch.Tensor, nb: int) -> torch.Tensor:
    """``i * nb + ids[i, j]`` flattened: positions of the bias values in a flattened ``(N, nb)`` table."""
    key = (id(ids), nb)
    entry = _FLAT_INDEX.get(key)
    if entry is None or entry[0] is not ids:  # the entry holds its ids, so the id cannot be reused meanwhile
        n = ids.shape[0]
        with torch.inference_mode(False):  # cached: must stay usable by later autograd passes
            entry = (ids, (torch.arange(n, device=ids.device)[:, None] * nb + ids).flatten())
        _FLAT_INDEX[key] = entry
    return entry[1]


def _one_hot(ids: torch.Tensor, nb: int, dtype: torch.dtype) -> torch.Tensor:
    key = (id(ids), nb, dtype)
    entry = _ONE_HOT.get(key)
    if entry is None or entry[0] is not ids:
        with torch.inference_mode(False):
            entry = (ids, F.one_hot(ids, nb).to(dtype))
        _ONE_HOT[key] = entry
    return entry[1]


def form_bias(table: torch.Tensor, ids: torch.Tensor, impl: str = "gather") -> torch.Tensor:
    """``bias[b, h, i, j] = table[b, h, i, ids[i, j]]`` by the chosen implementation (see BIAS_IMPLS)."""
    n = ids.shape[0]
    b, h, _, nb = table.shape
    if impl == "gather":
        return gather_bias(table, ids)
    if impl == "index":
        flat = table.expand(b, h, n, nb).reshape(b, h, n * nb)
        return flat.index_select(2, _flat_index(ids, nb)).view(b, h, n, n)
    if impl == "naive":
        rows = torch.arange(n, device=ids.device)[:, None]
        return table.expand(b, h, n, nb)[:, :, rows, ids]
    if impl == "onehot":
        return torch.einsum("bhik,ijk->bhij", table.expand(b, h, n, nb), _one_hot(ids, nb, table.dtype))
    raise ValueError(f"unknown bias implementation {impl!r}; expected one of {BIAS_IMPLS}")


class RelativePositionBias(nn.Module):
    """Plain RPE: a learned bias per head and bucket, ``B[h, i, j] = table[h, d(i, j)]``."""

    def __init__(self, num_heads: int, num_buckets: int = 49) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(num_heads, num_buckets))
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``(1, H, N, N)`` bias for bucket index ``ids``."""
        n = ids.shape[0]
        return gather_bias(self.table[None, :, None, :], ids).reshape(1, -1, n, n)


class ContextualRPE(nn.Module):
    """One iRPE contextual table (official name ``lookup_table_weight``).

    ``kind='qk'`` (used for the query and key sides): weight ``(T, head_dim, nb)``; given ``x (B, H, N, hd)``
    returns ``bias[b, h, i, j] = (x[b, h, i] @ W)[ids[i, j]]``. ``kind='v'``: weight ``(T, nb, head_dim)``;
    given attention probabilities ``a (B, H, N, N)`` returns ``sum_j a[b, h, i, j] * W[ids[i, j]]``.
    ``T`` is 1 when the table is shared by all heads, else the number of heads.
    """

    def __init__(self, kind: str, head_dim: int, num_heads: int, shared_head: bool = True, num_buckets: int = 49):
        super().__init__()
        if kind not in ("qk", "v"):
            raise ValueError(f"kind must be 'qk' or 'v', got {kind!r}")
        self.kind = kind
        tables = 1 if shared_head else num_heads
        shape = (tables, head_dim, num_buckets) if kind == "qk" else (tables, num_buckets, head_dim)
        self.lookup_table_weight = nn.Parameter(torch.zeros(shape))
        nn.init.trunc_normal_(self.lookup_table_weight, std=0.02)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        w = self.lookup_table_weight.to(x.dtype)[None]  # (1, T, ., .) broadcasts over batch (and heads if T=1)
        if self.kind == "qk":
            return gather_bias(torch.matmul(x, w), ids)
        b, h, n, _ = x.shape
        # sum attention probability per bucket, then one small matmul with the value table
        per_bucket = x.new_zeros(b, h, n, w.shape[-2]).scatter_add_(3, ids.expand(b, h, n, n), x)
        return torch.matmul(per_bucket, w)


class KeypointBiasFunction:
    """Slices f(P)'s output into each layer's ``(B, H, N, nb)`` table, one layer at a time.

    Output feature layout of the final linear map (official): ``(layer * H + head) * nb + bucket`` for
    ``layer_head`` sharing; ``head * nb + bucket`` for ``head``; ``bucket`` for ``shared``. Computing only the
    running layer's slice keeps no ``(B, N, depth * H * nb)`` tensor alive through the forward pass.
    """

    def __init__(self, sharing: str, num_heads: int, num_buckets: int) -> None:
        if sharing not in KP_SHARINGS:
            raise ValueError(f"unknown kp_sharing {sharing!r}; expected one of {KP_SHARINGS}")
        self.sharing = sharing
        self.num_heads = num_heads
        self.num_buckets = num_buckets

    def out_features(self, depth: int) -> int:
        per_layer = self.num_heads * self.num_buckets
        return {"layer_head": depth * per_layer, "head": per_layer, "shared": self.num_buckets}[self.sharing]

    def layer_table(self, hidden: torch.Tensor, linear: nn.Linear, layer: int, with_bias: bool = True) -> torch.Tensor:
        """``(B, H, N, nb)`` table of ``layer`` from f's last hidden activations ``(B, N, F)``."""
        width = self.num_heads * self.num_buckets
        weight, bias = linear.weight, linear.bias if with_bias else None
        if self.sharing == "layer_head":
            sl = slice(layer * width, (layer + 1) * width)
            weight, bias = weight[sl], None if bias is None else bias[sl]
        return self.split(F.linear(hidden, weight, bias), layer if self.sharing == "layer_head" else None)

    def split(self, out: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """View f's output ``(B, N, F)`` as one layer's ``(B, H, N, nb)`` table; ``layer`` selects the slice of
        a full all-layer output (``None``: ``out`` is already one layer's)."""
        if layer is not None and out.shape[-1] != self.num_heads * self.num_buckets:
            width = self.num_heads * self.num_buckets
            out = out[..., layer * width : (layer + 1) * width]
        b, n = out.shape[:2]
        if self.sharing == "shared":
            return out[:, None, :, :].expand(b, self.num_heads, n, self.num_buckets)
        return out.reshape(b, n, self.num_heads, self.num_buckets).permute(0, 2, 1, 3)
