"""Float32 comparisons whose tolerance comes from the computation, not from one machine.

Float32 kernels round differently on different CPUs (AVX2 vs AVX-512, BLAS code paths, thread counts), so a
fixed ``atol=1e-5`` read off one machine fails on another. Two ways keep a comparison both portable and tight:

- compare algorithms in float64 (``FLOAT64_REL``): rounding is ~1e-16 per operation, so a tolerance of
  1e-10 of the tensor's scale has six orders of margin on any CPU and still catches any wrong formula;
- where float32 itself is the subject, measure what float32 costs the *reference* on this CPU (its distance
  to the same computation in float64) and allow a few times that (:func:`assert_float32_close`).
"""

from __future__ import annotations

import torch

F32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7: one ulp at 1.0
# float64 rounding is eps64 = 2.2e-16 per operation; a few thousand operations in a chain still stay under
# 1e-12 relative, so 1e-10 of the tensor's scale is CPU-independent and far below any real error (O(1e-3)+).
FLOAT64_REL = 1e-10


def scale_of(t: torch.Tensor) -> float:
    """The tensor's scale: its largest magnitude (rounding errors are relative to this, not per element)."""
    return float(t.detach().abs().max()) if t.numel() else 0.0


def assert_float64_close(
    got: torch.Tensor,
    ref: torch.Tensor,
    *,
    rel: float = FLOAT64_REL,
    scale: float | None = None,
    msg: str = "",
) -> None:
    """Two float64 computations of the same quantity agree to ``rel`` of ``scale`` (default: the
    reference's own scale; pass a common one for tensors that are zero in theory, rounding in practice)."""
    assert got.dtype == ref.dtype == torch.float64, (got.dtype, ref.dtype)
    scale = scale_of(ref) if scale is None else float(scale)
    diff = scale_of(got - ref)
    allowed = rel * scale
    assert diff <= allowed, f"{msg}: |got - ref| = {diff:.3g} > {allowed:.3g} ({rel:g} of scale {scale:.3g})"


def assert_float32_close(
    got: torch.Tensor,
    ref32: torch.Tensor,
    ref64: torch.Tensor,
    *,
    factor: float = 4.0,
    ulps: float = 16.0,
    msg: str = "",
) -> float:
    """``got`` (float32, another algorithm or runtime) against the float64 value ``ref64`` of the computation.

    Allowed: ``factor`` times the reference's own float32 error ``max|ref32 - ref64|`` (what float32 costs
    this computation on this CPU, measured, so it follows the CPU's kernels), floored at ``ulps`` float32 ulps
    of the scale (a computation that happens to round well must not make the bound vanish). A wrong result
    is off by a large fraction of the scale; float32 rounding is off by a few ulps of it per operation,
    growing with the depth of the computation, which is what ``ref32 - ref64`` measures. Returns the bound."""
    got64, ref32_64 = got.detach().double(), ref32.detach().double()
    ref64 = ref64.detach().double()
    own = scale_of(ref32_64 - ref64)
    allowed = factor * max(own, ulps * F32_EPS * scale_of(ref64))
    diff = scale_of(got64 - ref64)
    assert diff <= allowed, (
        f"{msg}: |got - ref64| = {diff:.3g} > {allowed:.3g} = {factor:g} x max(reference's own float32 error "
        f"{own:.3g}, {ulps:g} ulps of scale {scale_of(ref64):.3g})"
    )
    return allowed
