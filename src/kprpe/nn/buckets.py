"""iRPE's quantised relative-position buckets on a 2-D patch grid.

A bucket id ``d(i, j)`` says how far key patch ``j`` lies from query patch ``i``; nearby offsets keep their
own
bucket and far offsets share a few log-spaced ones (the *piecewise index*). Buckets depend only on the grid,
so they are computed once per (grid, method, ratio) and cached per device.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = [
    "METHODS",
    "piecewise_index",
    "piecewise_params",
    "num_buckets",
    "bucket_ids",
]

METHODS = ("product", "euclidean", "quantized", "cross_rows", "cross_cols")


def piecewise_params(ratio: float = 1.9) -> tuple[float, float, float]:
    """(alpha, beta, gamma) of the piecewise index for an iRPE ``ratio``: ``(r, 2r, 8r)``."""
    if not ratio > 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    return 1.0 * ratio, 2.0 * ratio, 8.0 * ratio


def piecewise_index(offset: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """Quantise signed offsets: exact for ``|x| <= alpha``, log-spaced beyond, capped at ``beta``.

    ``g(x) = round(x)`` if ``|x| <= alpha``, else
    ``sign(x) * min(beta, round(alpha + ln(|x|/alpha) / ln(gamma/alpha) * (beta - alpha)))``,
    truncated towards zero to int64 (so the cap 3.8 becomes 3).
    """
    x = offset.float()
    x_abs = x.abs()
    near = x_abs <= alpha
    # clamp keeps log() finite on the entries that take the "near" branch anyway
    far = alpha + torch.log(x_abs.clamp_min(alpha) / alpha) / math.log(gamma / alpha) * (beta - alpha)
    far = torch.sign(x) * far.round().clamp(max=beta)
    return torch.where(near, x.round(), far).to(torch.int64)


def num_buckets(method: str = "product", ratio: float = 1.9) -> int:
    """How many distinct bucket ids ``method`` produces (49 for product with ratio 1.9)."""
    _, beta, _ = piecewise_params(ratio)
    beta_int = int(beta)
    if method == "product":
        return (2 * beta_int + 1) ** 2
    if method in ("euclidean", "quantized"):
        return beta_int + 1
    if method in ("cross_rows", "cross_cols"):
        return 2 * beta_int + 1
    raise ValueError(f"unknown bucket method {method!r}; expected one of {METHODS}")


@lru_cache(maxsize=64)
def _bucket_ids_cpu(height: int, width: int, method: str, ratio: float) -> torch.Tensor:
    alpha, beta, gamma = piecewise_params(ratio)
    rows = torch.arange(height).repeat_interleave(width)  # token n = row * width + col
    cols = torch.arange(width).repeat(height)
    d_row = (rows[:, None] - rows[None, :]).float()  # query i minus key j
    d_col = (cols[:, None] - cols[None, :]).float()
    beta_int = int(beta)
    if method == "product":
        r = piecewise_index(d_row, alpha, beta, gamma) + beta_int
        c = piecewise_index(d_col, alpha, beta, gamma) + beta_int
        ids = r * (2 * beta_int + 1) + c
    elif method == "euclidean":
        dist = (d_row.square() + d_col.square()).sqrt().round()
        ids = piecewise_index(dist, alpha, beta, gamma)
    elif method == "quantized":
        ids = piecewise_index(d_row.square() + d_col.square(), alpha, beta, gamma)
    elif method == "cross_rows":
        ids = piecewise_index(d_row, alpha, beta, gamma) + beta_int
    elif method == "cross_cols":
        ids = piecewise_index(d_col, alpha, beta, gamma) + beta_int
    else:
        raise ValueError(f"unknown bucket method {method!r}; expected one of {METHODS}")
    ids = ids.contiguous()
    ids.requires_grad_(False)
    return ids


_DEVICE_CACHE: dict[tuple, torch.Tensor] = {}


def bucket_ids(
    height: int,
    width: int | None = None,
    *,
    method: str = "product",
    ratio: float = 1.9,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(N, N)`` int64 bucket id of (query token i, key token j) on a ``height x width`` grid.

    Tokens are row-major: ``n = row * width + col``. Cached per grid, method, ratio and device; callers
    must not modify the returned tensor.
    """
    width = height if width is None else width
    if height <= 0 or width <= 0:
        raise ValueError(f"grid must be positive, got {height}x{width}")
    key = (int(height), int(width), method, float(ratio), str(torch.device(device or "cpu")))
    ids = _DEVICE_CACHE.get(key)
    if ids is None:
        # built outside inference mode so that a cache filled during inference still serves training, and on
        # the CPU whatever default device a caller has set (a model built under torch.device("meta"))
        with torch.inference_mode(False), torch.device("cpu"):
            ids = _bucket_ids_cpu(int(height), int(width), method, float(ratio))
            if key[-1] != "cpu":
                ids = ids.to(key[-1])
        _DEVICE_CACHE[key] = ids
    return ids
