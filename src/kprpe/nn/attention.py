"""Transformer building blocks: multi-head attention that takes an additive logit bias, MLP, block."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .kprpe_attention import bucket_attention
from .position import BucketBias

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
    """Multi-head self-attention whose relative position terms come from modules passed in.

    Logits are ``(q * s) k^T + bias`` with ``s = head_dim ** -0.5``, where ``bias`` is the sum of an external
    additive bias (KP-RPE passes its ``(B, H, N, N)`` bias or a :class:`BucketBias` here) and the terms of the
    ``position`` modules (:mod:`kprpe.nn.position`: an RPE table, iRPE's contextual tables). Attention knows
    nothing of any encoding: each module says whether its term is a fixed bias (``static``: it can join the
    fused kernel's mask), a term that reads ``q``/``k`` (``logits``), or a term added to the output
    (``output``, which needs the probabilities). The modules keep their names in the state dict
    (``attn.rpe_bias.table``, ``attn.rpe_k.lookup_table_weight``: the official keys).

    ``attn_impl='math'`` runs an explicit softmax (matches the official code to the last bit);
    ``'sdpa'`` uses ``F.scaled_dot_product_attention`` with the bias as an additive mask (given a
    :class:`BucketBias` while training, KP-RPE's own backward: :mod:`kprpe.nn.kprpe_attention`);
    ``'flex'`` takes KP-RPE's bias as a per-bucket table (:class:`BucketBias`) and reads it inside a
    FlexAttention kernel. Terms that read ``q``/``k`` or the probabilities always use the explicit path.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        position: Mapping[str, nn.Module] | Callable[[], Mapping[str, nn.Module]] | None = None,
        attn_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; expected one of {ATTN_IMPLS}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # a factory is called here, after qkv/proj exist: seeded models draw their numbers in the same order
        terms = position() if callable(position) else position
        self.position_names: tuple[str, ...] = tuple(terms or {})
        for name, module in (terms or {}).items():
            self.add_module(name, module)

    def position_terms(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.position_names]

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x (B, N, D)``; ``bias`` broadcastable to ``(B, H, N, N)`` or a :class:`BucketBias`;
        ``ids (N, N)`` bucket index (read by the position modules)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, hd)
        terms = self.position_terms()
        if terms and ids is None:
            raise ValueError("this attention layer has relative position tables and needs the bucket ids")
        for term in terms:
            if term.static:  # a bias fixed by position only: joins the external bias
                bias = term.bias(ids) if bias is None else bias + term.bias(ids)
        dynamic = sorted((t for t in terms if not t.static), key=lambda t: t.order)

        if isinstance(bias, BucketBias):
            if self.attn_impl == "flex" and not dynamic:
                out = _flex_attention(q, k, v, bias.table.to(q.dtype), bias.ids, self.scale)
                return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))
            if self.attn_impl == "sdpa" and not dynamic and not (self.training and self.attn_drop.p > 0):
                # fused forward, own backward: no (B, H, N, N) probabilities or bias gradient kept
                out = bucket_attention(q, k, v, bias.table, bias.ids, self.scale, bias.form)
                return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))
            bias = bias.dense()
        if self.attn_impl in ("sdpa", "flex") and not dynamic:
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
            for term in dynamic:
                logits = term.logits(q, k * self.scale, ids)
                if logits is not None:
                    attn = attn + logits
            if bias is not None:
                attn = attn + bias
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            out = attn @ v
            for term in dynamic:
                extra = term.output(attn, ids)
                if extra is not None:
                    out = out + extra
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
