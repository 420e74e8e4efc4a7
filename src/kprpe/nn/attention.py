"""Transformer building blocks: multi-head attention that takes an additive logit bias, MLP, block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kprpe_attention import bucket_attention
from .position import BucketBias, ContextualRPE, RelativePositionBias

__all__ = ["ATTN_IMPLS", "Attention", "Mlp", "Block", "DropPath"]

ATTN_IMPLS = ("math", "sdpa", "flex")

_COMPILED_FLEX = None


def _flex_attention(q, k, v, table: torch.Tensor, ids: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention whose logit bias is read from the per-bucket ``table (B, H, N, nb)`` inside the kernel
    (FlexAttention ``score_mod``): no ``(B, H, N, N)`` bias is ever materialised. Compiled on CUDA; on CPU it
    runs PyTorch's eager reference (slow; for checking numbers)."""
    global _COMPILED_FLEX
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    b, h, n, nb = table.shape[0], q.shape[1], q.shape[2], table.shape[-1]
    table = table.expand(b, h, n, nb)

    def score_mod(score, bi, hi, qi, ki):
        return score + table[bi, hi, qi, ids[qi, ki]]

    if q.is_cuda:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        return _COMPILED_FLEX(q, k, v, score_mod=score_mod, scale=scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eager fallback warns that it is not compiled
        return flex_attention(q, k, v, score_mod=score_mod, scale=scale)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention with optional relative position terms.

    Logits are ``(q * s) k^T + bias`` with ``s = head_dim ** -0.5``, where ``bias`` is the sum of an external
    additive bias (KP-RPE passes its ``(B, H, N, N)`` bias here), this layer's own RPE table, and the iRPE
    contextual terms ``rpe_k(q * s)[i, d(i, j)] + rpe_q(k * s)[j, d(j, i)]``; iRPE's value term adds
    ``sum_j a[i, j] rpe_v[d(i, j)]`` to the output.

    ``attn_impl='math'`` runs an explicit softmax (matches the official code to the last bit);
    ``'sdpa'`` uses ``F.scaled_dot_product_attention`` with the bias as an additive mask (given a
    :class:`BucketBias` while training, KP-RPE's own backward: :mod:`kprpe.nn.kprpe_attention`);
    ``'flex'`` takes KP-RPE's bias as a per-bucket table (:class:`BucketBias`) and reads it inside a
    FlexAttention kernel.
    iRPE's value term needs the probabilities, so iRPE always uses the explicit path.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rpe: bool = False,
        irpe_on: str = "",
        irpe_shared_head: bool = True,
        num_buckets: int = 49,
        attn_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; expected one of {ATTN_IMPLS}")
        if set(irpe_on) - set("qkv"):
            raise ValueError(f"irpe_on must be a combination of 'q', 'k', 'v', got {irpe_on!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpe_bias = RelativePositionBias(num_heads, num_buckets) if rpe else None

        def table(kind: str) -> ContextualRPE:
            return ContextualRPE(kind, self.head_dim, num_heads, irpe_shared_head, num_buckets)

        self.rpe_q = table("qk") if "q" in irpe_on else None
        self.rpe_k = table("qk") if "k" in irpe_on else None
        self.rpe_v = table("v") if "v" in irpe_on else None

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x (B, N, D)``; ``bias`` broadcastable to ``(B, H, N, N)`` or a :class:`BucketBias`;
        ``ids (N, N)`` bucket index."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, hd)
        needs_ids = self.rpe_bias is not None or self.rpe_q is not None or self.rpe_k is not None
        if (needs_ids or self.rpe_v is not None) and ids is None:
            raise ValueError("this attention layer has relative position tables and needs the bucket ids")
        if self.rpe_bias is not None:
            bias = self.rpe_bias(ids) if bias is None else bias + self.rpe_bias(ids)

        irpe = self.rpe_q is not None or self.rpe_k is not None or self.rpe_v is not None
        if isinstance(bias, BucketBias):
            if self.attn_impl == "flex" and not irpe:
                out = _flex_attention(q, k, v, bias.table.to(q.dtype), bias.ids, self.scale)
                return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))
            if self.attn_impl == "sdpa" and not irpe and not (self.training and self.attn_drop.p > 0):
                # fused forward, own backward: no (B, H, N, N) probabilities or bias gradient kept
                out = bucket_attention(q, k, v, bias.table, bias.ids, self.scale, bias.form)
                return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))
            bias = bias.dense()
        if self.attn_impl in ("sdpa", "flex") and not irpe:
            if bias is not None:
                bias = bias.to(q.dtype)
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=bias,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                scale=self.scale,
            )
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            if self.rpe_k is not None:
                attn = attn + self.rpe_k(q, ids)
            if self.rpe_q is not None:
                attn = attn + self.rpe_q(k * self.scale, ids).transpose(2, 3)
            if bias is not None:
                attn = attn + bias
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            out = attn @ v
            if self.rpe_v is not None:
                out = out + self.rpe_v(attn, ids)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``; the official face ViTs use ReLU6."""

    def __init__(
        self, dim: int, hidden: int, act_layer: type[nn.Module] = nn.ReLU6, drop: float = 0.0
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x += attn(LN(x))``, ``x += mlp(LN(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
        **attn_kwargs,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, proj_drop=drop, **attn_kwargs)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), bias, ids))
        return x + self.drop_path(self.mlp(self.norm2(x)))
