"""Shifted windows on a channels-last token map ``(B, H, W, C)``: padding, cyclic shift, partition, the shift
mask, and the index of which token sits where — shared by the Swin backbone and windowed KP-RPE.

The order is torchvision's / the official Swin code's (checked against the official ``window_index`` and
``attn_mask`` tensors): pad the map with zeros at the bottom/right to a multiple of the window, drop the shift
on an axis where the padded map is not larger than the window, roll by ``-shift`` *after* padding, then cut
windows row-major (window ``w = wr * nWw + wc``, position ``p = pr * ww + pc``), batch-major (``b * nW + w``).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = [
    "SHIFT_MASK_VALUE",
    "padded_size",
    "effective_shift",
    "window_index",
    "shift_mask",
    "partition",
    "merge",
]

# The official mask value between positions of different regions (not -inf: a fully masked row stays finite)
SHIFT_MASK_VALUE = -100.0


def padded_size(height: int, width: int, window: tuple[int, int]) -> tuple[int, int]:
    """The map's size after zero padding at the bottom/right to a multiple of the window."""
    return -(-height // window[0]) * window[0], -(-width // window[1]) * window[1]


def effective_shift(
    height: int, width: int, window: tuple[int, int], shift: tuple[int, int]
) -> tuple[int, int]:
    """The shift a block really uses: 0 on an axis where the padded map is not larger than the window."""
    ph, pw = padded_size(height, width, window)
    return (0 if window[0] >= ph else shift[0], 0 if window[1] >= pw else shift[1])


@lru_cache(maxsize=128)
def _window_index_cpu(
    height: int, width: int, window: tuple[int, int], shift: tuple[int, int]
) -> torch.Tensor:
    ph, pw = padded_size(height, width, window)
    index = torch.full((ph, pw), -1, dtype=torch.int64)
    index[:height, :width] = torch.arange(height * width).view(height, width)
    sh, sw = effective_shift(height, width, window, shift)
    if sh or sw:
        index = torch.roll(index, shifts=(-sh, -sw), dims=(0, 1))
    wh, ww = window
    index = index.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    return index.contiguous()


def window_index(
    height: int, width: int, window: tuple[int, int], shift: tuple[int, int] = (0, 0), device=None
) -> torch.Tensor:
    """``(nW, wh * ww)`` int64: the flat token ``row * width + col`` at position ``p`` of window ``w``, or -1
    where that position is zero padding. Cached per shape on the CPU; do not modify the result."""
    with torch.inference_mode(False), torch.device("cpu"):
        index = _window_index_cpu(int(height), int(width), tuple(window), tuple(shift))
    return index if device is None else index.to(device)


@lru_cache(maxsize=128)
def _shift_mask_cpu(height: int, width: int, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    ph, pw = padded_size(height, width, window)
    sh, sw = effective_shift(height, width, window, shift)

    def labels(size: int, win: int, s: int) -> torch.Tensor:
        # regions of the rolled map along one axis: [0, size - win), [size - win, size - s), [size - s, size)
        coord = torch.arange(size)
        if s == 0:
            return torch.zeros(size, dtype=torch.int64)
        return (coord >= size - win).long() + (coord >= size - s).long()

    region = labels(ph, window[0], sh)[:, None] * 3 + labels(pw, window[1], sw)[None, :]
    wh, ww = window
    region = region.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    differ = region[:, None, :] != region[:, :, None]
    return torch.zeros(differ.shape).masked_fill_(differ, SHIFT_MASK_VALUE)


def shift_mask(
    height: int, width: int, window: tuple[int, int], shift: tuple[int, int], device=None, dtype=None
) -> torch.Tensor | None:
    """``(nW, ws, ws)`` additive mask (0, or -100 between positions from different regions of the rolled
    map), or None when the block does not shift."""
    if effective_shift(height, width, window, shift) == (0, 0):
        return None
    with torch.inference_mode(False), torch.device("cpu"):
        mask = _shift_mask_cpu(int(height), int(width), tuple(window), tuple(shift))
    return mask.to(device=device, dtype=dtype)


def partition(x: torch.Tensor, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * nW, wh * ww, C)``: zero pad, roll by ``-shift`` (the effective one), cut."""
    h, w, c = (int(v) for v in x.shape[1:])  # map sizes are constants of the model (batch stays free)
    ph, pw = padded_size(h, w, window)
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, 0, 0, pw - w, 0, ph - h))
    sh, sw = effective_shift(h, w, window, shift)
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    wh, ww = window
    x = x.view(-1, ph // wh, wh, pw // ww, ww, c).permute(0, 1, 3, 2, 4, 5)  # -1: traced batch stays free
    return x.reshape(-1, wh * ww, c)


def merge(windows: torch.Tensor, height: int, width: int, window: tuple[int, int], shift: tuple[int, int]):
    """Inverse of :func:`partition`: ``(B * nW, wh * ww, C)`` -> ``(B, H, W, C)`` (roll back, crop)."""
    ph, pw = padded_size(height, width, window)
    wh, ww = window
    c = int(windows.shape[-1])
    x = windows.view(-1, ph // wh, pw // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ph, pw, c)
    sh, sw = effective_shift(height, width, window, shift)
    if sh or sw:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    if (ph, pw) != (height, width):
        x = x[:, :height, :width, :]
    return x.contiguous()
