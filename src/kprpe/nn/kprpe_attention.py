"""Attention with a per-bucket logit bias and its own backward pass (KP-RPE training on CPU).

The bias is ``bias[b, h, i, j] = table[b, h, i, ids[i, j]]`` with a ``(B, H, N, nb)`` table. Both passes form
the dense bias a few samples at a time (:data:`FORWARD_CHUNK_BYTES`), so it is written and read while in cache
instead of making a round trip through memory (at ViT-Base, batch 32, one layer's full bias is 79 MB).

Autograd through
``scaled_dot_product_attention(attn_mask=bias)`` would need the gradient of the dense ``(B, H, N, N)`` bias,
which PyTorch's fused CPU kernel cannot return: it falls back to the explicit kernel, which keeps every
layer's ``(B, H, N, N)`` probabilities until the backward pass. :class:`BucketAttention` instead

- runs the fused kernel forward (the dense bias is formed, read and freed; nothing ``N x N`` is saved),
- saves only ``q, k, v``, the table, the output and the log-sum-exp of each query row,
- recomputes the probabilities in the backward pass in chunks of (batch, head) pairs, small enough to stay in
  cache, and returns the table's gradient directly: ``d table[b, h, i, c] = sum_{j: ids[i, j] = c} dS[b, h,
  i, j]`` (a scatter-add over buckets) instead of a ``(B, H, N, N)`` bias gradient.

The math is the standard attention backward: with ``P = softmax(S)``, ``dP = dO V^T``,
``dS = P * (dP - rowsum(dO * O))``, ``dQ = s dS K``, ``dK = s dS^T Q``, ``dV = P^T dO``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["bucket_attention", "BucketAttention", "supports_bucket_autograd", "bucket_autograd"]

_ENABLED = True

# samples per forward chunk: their dense bias at most this many bytes (at least one sample). Measured on CPU
# (docs/performance.md): ViT-Base batch 32, one layer, 2 threads: 65 ms unchunked, 41-42 ms in chunks of 1-4
# samples (2.4-9.6 MB), plain ViT attention 27 ms.
FORWARD_CHUNK_BYTES = 4 << 20
# (batch, head) pairs per backward chunk: each chunk holds ~3 (chunk, N, N) temporaries. 8 pairs at N = 196
# is 1.2 MB each, which stays in cache; measured on CPU (docs/performance.md) against 16-128 pairs and
# query-row blocks.
BACKWARD_CHUNK = 8


def _form(table: torch.Tensor, ids: torch.Tensor, form_bias, batch: slice | None) -> torch.Tensor:
    """The dense bias of the samples in ``batch`` (None: all of them, with no slicing op)."""
    if form_bias is not None:
        return form_bias(batch)
    part = table if batch is None or table.shape[0] == 1 else table[batch]
    h, n = part.shape[1], ids.shape[0]
    return torch.gather(
        part.expand(part.shape[0], h, n, part.shape[-1]), 3, ids.expand(part.shape[0], h, n, n)
    )


def _chunk_samples(q: torch.Tensor) -> int:
    b, h, n, _ = q.shape
    if q.device.type != "cpu" or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return b  # a traced graph must not bake in the batch size; GPUs do not need it
    if torch.compiler.is_compiling():
        return b
    return max(1, min(b, FORWARD_CHUNK_BYTES // (h * n * n * q.element_size())))


def _fused_forward(q, k, v, table, ids, scale, form_bias, with_lse: bool):
    """Output ``(B, H, N, d)`` (laid out ``(B, N, H, d)``, so the caller's merge of heads is a view) and, with
    ``with_lse``, the ``(B, H, N)`` log-sum-exp, computed chunk by chunk of samples."""
    import torch.nn.functional as F

    b, h, n, d = q.shape
    step = _chunk_samples(q)
    if step >= b:
        bias = _form(table, ids, form_bias, None).to(q.dtype)
        if with_lse:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, attn_mask=bias, scale=scale
            )
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale), None
    out = q.new_empty(b, n, h, d).transpose(1, 2)
    lse = q.new_empty(b, h, n) if with_lse else None
    for start in range(0, b, step):
        rows = slice(start, min(start + step, b))
        bias = _form(table, ids, form_bias, rows).to(q.dtype)
        if with_lse:
            out[rows], lse[rows] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[rows], k[rows], v[rows], attn_mask=bias, scale=scale
            )
        else:
            out[rows] = F.scaled_dot_product_attention(q[rows], k[rows], v[rows], attn_mask=bias, scale=scale)
    return out, lse


@contextmanager
def bucket_autograd(enabled: bool) -> Iterator[None]:
    """Switch :class:`BucketAttention` off (``False``: autograd through the dense bias, the reference the
    tests and the benchmark compare against) or on, within a ``with`` block."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    try:
        yield
    finally:
        _ENABLED = previous


def supports_bucket_autograd(q: torch.Tensor) -> bool:
    """The custom backward runs where PyTorch's fused CPU kernel returns the log-sum-exp it needs (CPU) and
    not while tracing or compiling (exported graphs use the plain fused kernel)."""
    return (
        _ENABLED
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64)
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
    )


class BucketAttention(torch.autograd.Function):
    """``softmax(s q k^T + table[..., ids]) v`` for ``q, k, v (B, H, N, d)``, ``table (B|1, H, N|1, nb)``.

    ``form_bias(batch)`` (optional) builds the dense bias of a slice of the batch in the forward pass the
    caller's way (e.g. KP-RPE's cached position term); the backward pass recomputes bias rows with a gather
    (the same values: every path copies table entries)."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        table: torch.Tensor,
        ids: torch.Tensor,
        scale: float,
        form_bias: Callable[[slice | None], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        out, lse = _fused_forward(q, k, v, table, ids, scale, form_bias, with_lse=True)
        ctx.save_for_backward(q, k, v, table, ids, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, table, ids, out, lse = ctx.saved_tensors
        scale = ctx.scale
        b, h, n, d = q.shape
        nb = table.shape[-1]
        bh = b * h
        qf, kf, vf, gf = (t.reshape(bh, n, d) for t in (q, k, v, grad_out))
        tf = table.expand(b, h, n, nb).reshape(bh, n, nb)
        lse_rows = lse.reshape(bh, n, 1)
        # rowsum(dO * O): the softmax backward's per-row term, from the saved output instead of P
        delta = (grad_out * out).sum(-1).reshape(bh, n, 1)
        dq, dk, dv = (torch.empty(bh, n, d, dtype=q.dtype) for _ in range(3))
        dtable = torch.empty(bh, n, nb, dtype=q.dtype) if ctx.needs_input_grad[3] else None
        for start in range(0, bh, BACKWARD_CHUNK):
            end = min(start + BACKWARD_CHUNK, bh)
            index = ids.expand(end - start, n, n)
            rows = slice(start, end)
            # P = exp(s q k^T + bias - lse), recomputed for this chunk only
            probs = torch.baddbmm(
                torch.gather(tf[rows], 2, index).to(q.dtype), qf[rows], kf[rows].transpose(1, 2), alpha=scale
            )
            probs.sub_(lse_rows[rows]).exp_()
            torch.bmm(probs.transpose(1, 2), gf[rows], out=dv[rows])
            grad_logits = torch.bmm(gf[rows], vf[rows].transpose(1, 2)).sub_(delta[rows]).mul_(probs)
            del probs
            torch.bmm(grad_logits, kf[rows], out=dq[rows])
            torch.bmm(grad_logits.transpose(1, 2), qf[rows], out=dk[rows])
            if dtable is not None:
                dtable[rows].zero_().scatter_add_(2, index, grad_logits)
        dq.mul_(scale)
        dk.mul_(scale)
        if dtable is not None:
            dtable = dtable.view(b, h, n, nb).sum_to_size(table.shape).to(table.dtype)
        shape = (b, h, n, d)
        return dq.view(shape), dk.view(shape), dv.view(shape), dtable, None, None, None


def bucket_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    ids: torch.Tensor,
    scale: float,
    form_bias: Callable[[slice | None], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention with the bias ``table[b, h, i, ids[i, j]]``: :class:`BucketAttention` when a gradient is
    needed on CPU, otherwise the fused kernel with the dense bias formed chunk by chunk of samples."""
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or table.requires_grad
    )
    if needs_grad and supports_bucket_autograd(q):
        return BucketAttention.apply(q, k, v, table, ids, scale, form_bias)
    if needs_grad:  # autograd through the dense bias (CUDA, bfloat16 autocast)
        bias = _form(table, ids, form_bias, None).to(q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return _fused_forward(q, k, v, table, ids, scale, form_bias, with_lse=False)[0]
