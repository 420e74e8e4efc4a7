"""KP-RPE as one module: f (keypoints -> per-bucket bias tables), the bucket index it reads, and every way of
turning its tables into the attention logit bias, with the caches those ways need.

Like timm's ``RelPosBias``, :class:`KeypointRPE` owns its parameters *and* its index tensors (non-persistent
buffers that move with ``.to(device)`` and never enter a checkpoint); the transformer asks it for one bias per
layer and passes that to attention as an opaque additive mask. The method is in docs/models.md
("KP-RPE"); shapes: ``B`` batch, ``H`` heads, ``N`` tokens (row-major patch grid), ``nb`` buckets, ``K``
keypoints.

Parameter names follow the official checkpoints through :attr:`KeypointRPE.official_names`
(``kprpe.linear`` is saved as ``keypoint_linear``; the official MLP as ``keypoint_linear.0/.2/.3``), so files
written by kprpe load in the official code and vice versa.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .buckets import bucket_ids, num_buckets
from .position import BIAS_IMPLS, BucketBias, form_bias, gather_bias
from .windows import window_index

__all__ = [
    "KP_INPUTS",
    "KP_SHARINGS",
    "KP_MLPS",
    "KP_BIAS_IMPLS",
    "WINDOW_BIAS_IMPLS",
    "OFFICIAL_NAMES",
    "patch_centres",
    "relative_keypoints",
    "keypoint_features",
    "resolve_bias_impl",
    "KeypointRPE",
]

KP_INPUTS = ("relative", "absolute", "query_position")
# Which tables f produces: one per (layer, head) (the paper's), one per layer shared by its heads, one per
# head shared by the layers, or one for everything. Feature layout: (layer * H + head) * nb + bucket, with the
# dimensions a mode shares left out (docs/models.md, "KP-RPE variants").
KP_SHARINGS = ("layer_head", "layer", "head", "shared")
_PER_LAYER = ("layer_head", "layer")  # a table per layer: f's output holds depth slices
_PER_HEAD = ("layer_head", "head")  # a table per head; otherwise one table broadcast over the heads
# Hidden layer of a non-linear f: kprpe's control (Linear -> GELU) or the official one of the "_v2" context
# types (Linear -> ReLU -> LayerNorm), whose parameters are saved as keypoint_linear.0 / .2 / .3.
KP_MLPS = ("gelu", "relu_layernorm")
# How the bias is formed (same numbers, different speed): one of BIAS_IMPLS, or "decomposed" (the linear-f
# identity: a cached position term plus a per-sample bucket shift), or "auto" (chosen from the grid size).
KP_BIAS_IMPLS = ("auto", "decomposed", *BIAS_IMPLS)
# Windowed (Swin) bias paths: one gather for all windows, or the official per-window loop (for benchmarks).
WINDOW_BIAS_IMPLS = ("auto", "gather", "loop")
# Sub-module name inside KeypointRPE -> the official checkpoint's name (linear f, and kprpe's GELU MLP).
OFFICIAL_NAMES = {"mlp": "keypoint_mlp", "linear": "keypoint_linear"}
# The official MLP is one nn.Sequential, keypoint_linear: Linear (0), ReLU (1), LayerNorm (2), Linear (3).
OFFICIAL_MLP_NAMES = {
    "mlp.0": "keypoint_linear.0",
    "mlp.2": "keypoint_linear.2",
    "linear": "keypoint_linear.3",
}


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


def resolve_bias_impl(requested: str, num_tokens: int, kp_input: str = "relative", kp_hidden: int = 0) -> str:
    """The bias path a model uses: ``decomposed`` only where its identity holds; ``auto`` stays ``auto``
    (timed on first use per device, dtype and shape: :meth:`KeypointRPE.layer_biases`)."""
    if requested not in KP_BIAS_IMPLS:
        raise ValueError(f"unknown kp_bias_impl {requested!r}; expected one of {KP_BIAS_IMPLS}")
    if requested == "decomposed" and (kp_input != "relative" or kp_hidden):
        return "gather"  # the identity needs a linear f of relative offsets
    return requested


# ``auto``'s choice per (device, dtype, batch, heads, grid, f's form): the bias paths timed once in this
# process (docs/performance.md: which path wins depends on the device and dtype, e.g. gather for float32 and
# the one-hot matmul for bfloat16 on an AVX-512 CPU). Values: (chosen path, {path: seconds}).
AUTO_CHOICES: dict[tuple, tuple[str, dict[str, float]]] = {}
# a path replaces the gather only when it is faster by more than this: near-ties are noise
AUTO_MARGIN = 0.05


def choose_bias_path(seconds: dict[str, float]) -> str:
    """``auto``'s rule on measured times (path -> seconds): the fastest, unless it beats the gather by less
    than :data:`AUTO_MARGIN` (a near-tie is noise; the gather is the simplest path and the exported one)."""
    fastest = min(seconds, key=seconds.get)
    return fastest if seconds[fastest] < (1 - AUTO_MARGIN) * seconds["gather"] else "gather"


class KeypointRPE(nn.Module):
    """KP-RPE: ``f`` maps each query's keypoint offsets to one bias per (head, bucket); the logit bias of
    query ``i`` and key ``j`` is that table at bucket ``d(i, j)``.

    ``f`` is ``linear`` (the paper), optionally after an MLP of width ``hidden`` (``mlp``: kprpe's GELU
    control or the official ReLU + LayerNorm one). Its output features are laid out
    ``(layer * H + head) * nb + bucket`` for ``layer_head`` sharing, ``layer * nb + bucket`` for ``layer``,
    ``head * nb + bucket`` for ``head``, ``bucket`` for ``shared`` (the official layouts). Only the running
    layer's slice is computed, so no ``(B, N, depth * H * nb)`` tensor lives through the forward pass.

    ``bucket_tables=True`` (FlexAttention) hands attention a :class:`BucketBias` instead of a dense bias.

    Any token grid: ``grid`` is the side of a square map or ``(height, width)``. With ``window=(wh, ww)``
    attention runs inside windows of that map (Swin): the buckets are those of one window, f still runs once
    over the whole map, and :meth:`window_biases` gathers each window's rows with an index tensor (padding and
    cyclic shifts included, :mod:`kprpe.nn.windows`) — no loop over windows.
    """

    def __init__(
        self,
        *,
        grid: int | tuple[int, int],
        num_heads: int,
        depth: int,
        num_keypoints: int = 5,
        kp_input: str = "relative",
        sharing: str = "layer_head",
        hidden: int = 0,
        mlp: str = "gelu",
        method: str = "product",
        ratio: float = 1.9,
        bias_impl: str = "auto",
        bucket_tables: bool = False,
        window: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if kp_input not in KP_INPUTS:
            raise ValueError(f"unknown kp_input {kp_input!r}; expected one of {KP_INPUTS}")
        if sharing not in KP_SHARINGS:
            raise ValueError(f"unknown kp_sharing {sharing!r}; expected one of {KP_SHARINGS}")
        if mlp not in KP_MLPS:
            raise ValueError(f"unknown kp_mlp {mlp!r}; expected one of {KP_MLPS}")
        self.grid = grid
        self.grid_size = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
        self.window = None if window is None else (int(window[0]), int(window[1]))
        if self.window is not None and bias_impl not in WINDOW_BIAS_IMPLS:
            raise ValueError(
                f"windowed KP-RPE bias_impl must be one of {WINDOW_BIAS_IMPLS}, got {bias_impl!r}"
            )
        self.num_heads = num_heads
        self.depth = depth
        self.num_keypoints = num_keypoints
        self.kp_input = kp_input
        self.sharing = sharing
        self.mlp_kind = mlp
        self.num_buckets = num_buckets(method, ratio)
        self.bucket_tables = bucket_tables
        attended = self.window if self.window is not None else self.grid_size  # the grid buckets live on
        self.impl = (
            ("loop" if bias_impl == "loop" else "gather")
            if self.window is not None
            else resolve_bias_impl(bias_impl, attended[0] * attended[1], kp_input, hidden)
        )

        f_in = 2 if kp_input == "query_position" else 2 * num_keypoints
        self.mlp = None
        if hidden:
            if mlp == "gelu":
                self.mlp = nn.Sequential(nn.Linear(f_in, hidden), nn.GELU())
            else:
                self.mlp = nn.Sequential(nn.Linear(f_in, hidden), nn.ReLU(), nn.LayerNorm(hidden))
            f_in = hidden
        self.linear = nn.Linear(f_in, self.out_features)

        ids = bucket_ids(*attended, method=method, ratio=ratio).clone()
        n, nb = ids.shape[0], self.num_buckets
        self.register_buffer("bucket_ids", ids, persistent=False)
        # position of bias value (i, j) in a flattened (N, nb) table: i * nb + ids[i, j]
        flat_index = (torch.arange(n, device=ids.device)[:, None] * nb + ids).flatten()
        self.register_buffer("flat_index", flat_index, persistent=False)
        one_hot = F.one_hot(ids, nb).float() if self.impl == "onehot" else None  # (N, N, nb): only where used
        self.register_buffer("one_hot", one_hot, persistent=False)
        self._one_hot_cast: torch.Tensor | None = None  # one_hot in the table's dtype when that differs
        self.last_impl = self.impl  # the path the latest layer_biases call used (auto: the timed choice)
        # decomposed path at inference: each layer's batch-independent position term, valid while f's weights
        # are unchanged (keyed by their version counters and storage, so in-place updates invalidate it)
        self._position_terms: dict[int, torch.Tensor] = {}
        self._position_terms_key: tuple | None = None
        self._window_flat: dict[tuple[int, int], torch.Tensor] = {}  # shift -> flat gather index

    def reset_parameters(self) -> None:
        """f's output layer starts at zero, so a new KP-RPE model begins as a plain ViT (as in the paper)."""
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @property
    def table_width(self) -> int:
        """Features of f that make one layer's table: ``H * nb`` with a table per head, else ``nb``."""
        return self.num_buckets * (self.num_heads if self.sharing in _PER_HEAD else 1)

    @property
    def out_features(self) -> int:
        return self.table_width * (self.depth if self.sharing in _PER_LAYER else 1)

    @property
    def official_names(self) -> dict[str, str]:
        """Sub-module name -> the official checkpoint's name for this f."""
        official_mlp = self.mlp is not None and self.mlp_kind == "relu_layernorm"
        return OFFICIAL_MLP_NAMES if official_mlp else OFFICIAL_NAMES

    @property
    def uses_keypoints(self) -> bool:
        """False for the keypoint-free ``query_position`` control."""
        return self.kp_input != "query_position"

    # ------------------------------------------------------------------ f
    def hidden(self, keypoints: torch.Tensor | None) -> torch.Tensor:
        """Input of f's final linear layer for each query token: ``(B|1, N|1, F)``."""
        x = keypoint_features(keypoints, *self.grid_size, self.kp_input)
        return self.mlp(x) if self.mlp is not None else x

    def table(self, hidden: torch.Tensor, layer: int, *, with_bias: bool = True) -> torch.Tensor:
        """``(B, H, N|1, nb)`` bias table of ``layer`` from f's last hidden activations ``(B, N|1, F)``."""
        width = self.table_width
        weight, bias = self.linear.weight, self.linear.bias if with_bias else None
        if self.sharing in _PER_LAYER:
            sl = slice(layer * width, (layer + 1) * width)
            weight, bias = weight[sl], None if bias is None else bias[sl]
        return self.split(F.linear(hidden, weight, bias))

    def split(self, out: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """View f's output ``(B, N, F)`` as one layer's ``(B, H, N, nb)`` table; ``layer`` selects the slice
        of a full all-layer output (``None``: ``out`` is already one layer's)."""
        width = self.table_width
        if layer is not None and out.shape[-1] != width:
            out = out[..., layer * width : (layer + 1) * width]
        b, n = out.shape[:2]
        if self.sharing not in _PER_HEAD:  # one table broadcast over the heads
            return out[:, None, :, :].expand(b, self.num_heads, n, self.num_buckets)
        return out.reshape(b, n, self.num_heads, self.num_buckets).permute(0, 2, 1, 3)

    # ------------------------------------------------------------------ bias
    def dense(self, table: torch.Tensor, impl: str | None = None) -> torch.Tensor:
        """``(B, H, N, N)`` bias ``table[b, h, i, ids[i, j]]`` by ``impl`` (default: this module's path)."""
        impl = impl or ("gather" if self.impl in ("decomposed", "auto") else self.impl)
        one_hot = self._one_hot(table.dtype) if impl == "onehot" else None
        return form_bias(table, self.bucket_ids, impl, flat_index=self.flat_index, one_hot=one_hot)

    def _one_hot(self, dtype: torch.dtype) -> torch.Tensor:
        """The ``(N, N, nb)`` one-hot matrix in ``dtype``, made once (``auto`` makes it on first use)."""
        if self.one_hot is None:
            self.one_hot = F.one_hot(self.bucket_ids, self.num_buckets).float()
        if self.one_hot.dtype == dtype:
            return self.one_hot
        cast = self._one_hot_cast
        if cast is None or cast.dtype != dtype or cast.device != self.one_hot.device:
            cast = self._one_hot_cast = self.one_hot.to(dtype)
        return cast

    def layer_bias(self, hidden: torch.Tensor, layer: int, impl: str = "gather") -> torch.Tensor:
        """The ``(B, H, N, N)`` logit bias of ``layer`` from :meth:`hidden`'s output."""
        return self.dense(self.table(hidden, layer), impl)

    def layer_biases(
        self, keypoints: torch.Tensor | None, *, buckets: bool = False
    ) -> Callable[[int], torch.Tensor | BucketBias]:
        """For one batch: a function ``layer -> bias`` that attention adds to its logits. Each layer's table
        is made when called, so only one layer's bias is alive at a time.

        The bias is the dense ``(B, H, N, N)`` tensor formed by this module's path, or with ``buckets``
        (what the ViT asks for) and whenever gradients are on, a :class:`BucketBias`: the table and that same
        path to densify it, for any slice of the batch. The fused attention then forms the bias a few
        samples at a time, while it is in cache, and takes the table's gradient directly
        (:mod:`kprpe.nn.kprpe_attention`)."""
        if self.bucket_tables:  # the kernel reads the table: never build the dense bias
            hidden = self.hidden(keypoints)
            return lambda layer: BucketBias(self.table(hidden, layer), self.bucket_ids)
        impl = self.impl
        if impl == "auto":
            impl = "gather" if torch.is_grad_enabled() else self._timed_choice(keypoints)
        self.last_impl = impl
        return self._biases_by(impl, keypoints, buckets or torch.is_grad_enabled())

    def _biases_by(
        self, impl: str, keypoints: torch.Tensor | None, buckets: bool = False
    ) -> Callable[[int], torch.Tensor | BucketBias]:
        if impl == "decomposed":
            return self._decomposed_biases(keypoints, buckets)
        hidden = self.hidden(keypoints)
        if impl == "naive":  # the official code's way: all layers' tables at once, advanced indexing
            full = self.linear(hidden)

            def table_of(layer: int) -> torch.Tensor:
                return self.split(full, layer)

            def dense_of(table: torch.Tensor) -> torch.Tensor:
                return self.dense(table, "naive")
        else:

            def table_of(layer: int) -> torch.Tensor:
                return self.table(hidden, layer)

            if impl == "gather":  # the index expanded once for every layer (one Expand in ONNX)
                wide_ids = self.bucket_ids.expand(hidden.shape[0], self.num_heads, *self.bucket_ids.shape)

                def dense_of(table: torch.Tensor) -> torch.Tensor:
                    ids = wide_ids if table.shape[0] == wide_ids.shape[0] else self.bucket_ids
                    return gather_bias(table, ids)
            else:

                def dense_of(table: torch.Tensor) -> torch.Tensor:
                    return self.dense(table, impl)

        if buckets:
            return lambda layer: self._bucket_bias(table_of(layer), dense_of)
        return lambda layer: dense_of(table_of(layer))

    def _timed_choice(self, keypoints: torch.Tensor | None) -> str:
        """``auto`` at inference: the fastest bias path for this device, dtype and shape, timed once per
        process (each candidate forms layer 0's bias, 1 untimed + 3 timed runs, interleaved; the minimum
        counts). Tracing and compiling use the gather without timing."""
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            return "gather"
        ids = self.bucket_ids
        dtype = (
            torch.get_autocast_dtype(ids.device.type) if torch.is_autocast_enabled(ids.device.type) else None
        )
        batch = keypoints.shape[0] if keypoints is not None else 1
        key = (
            str(ids.device),
            dtype,
            batch,
            self.num_heads,
            self.grid,
            self.num_buckets,
            self.kp_input,
            self.sharing,
            self.mlp is not None,
        )
        if key not in AUTO_CHOICES:
            AUTO_CHOICES[key] = self._time_paths(keypoints)
        return AUTO_CHOICES[key][0]

    def _time_paths(self, keypoints: torch.Tensor | None) -> tuple[str, dict[str, float]]:
        import time

        candidates = ["gather", "index", "onehot"]
        if self.kp_input == "relative" and self.mlp is None:
            candidates.append("decomposed")
        device = self.bucket_ids.device

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        best: dict[str, float] = {}
        for rep in range(4):
            for impl in candidates:
                sync()
                start = time.perf_counter()
                self._biases_by(impl, keypoints)(0)
                sync()
                if rep:  # the first round warms up (and fills the decomposed cache)
                    best[impl] = min(best.get(impl, float("inf")), time.perf_counter() - start)
        return choose_bias_path(best), best

    def _bucket_bias(
        self, table: torch.Tensor, dense_of: Callable[[torch.Tensor], torch.Tensor]
    ) -> BucketBias:
        def form(batch: slice | None = None) -> torch.Tensor:
            return dense_of(table if batch is None or table.shape[0] == 1 else table[batch])

        return BucketBias(table, self.bucket_ids, form)

    def _decomposed_biases(
        self, keypoints: torch.Tensor, buckets: bool = False
    ) -> Callable[[int], torch.Tensor | BucketBias]:
        # f(c_i - p_b) = (W c_i + w0) - W p_b: a batch-independent (1, H, N, N) position term, cached while
        # weights are frozen (inference), plus a per-sample shift of each bucket's value.
        ids = self.bucket_ids
        centres = patch_centres(*self.grid_size, device=ids.device).repeat(1, self.num_keypoints)[None]
        points = keypoints.detach().float().flatten(1)[:, None, :]  # (B, 1, 2K)
        weight, bias = self.linear.weight, self.linear.bias
        frozen = not (torch.is_grad_enabled() and weight.requires_grad)
        if frozen:
            key = (weight._version, bias._version, weight.data_ptr(), bias.data_ptr(), ids.device)
            if key != self._position_terms_key:
                self._position_terms, self._position_terms_key = {}, key

        def position_term(layer: int) -> torch.Tensor:
            if layer in self._position_terms:
                return self._position_terms[layer]
            term = self.dense(self.table(centres, layer), "index")
            self._position_terms[layer] = term
            return term

        def layer_bias(layer: int) -> torch.Tensor | BucketBias:
            shift = self.table(points, layer, with_bias=False)  # (B, H, 1, nb)
            if not frozen:  # training: the per-bucket table (position minus shift), gradient by the table
                return self._bucket_bias(self.table(centres, layer) - shift, self.dense)
            # inference: look each sample's N*N values up from a tiny table, then add the cached term in place
            table = self.table(centres, layer) - shift if buckets else None  # (B, H, N, nb), for the record
            shift = -shift  # (B, H, 1, nb): small; may be a view expanded over heads
            term = position_term(layer)

            def form(batch: slice | None = None) -> torch.Tensor:
                part = shift if batch is None else shift[batch]
                b, h, _, nb = part.shape
                per_sample = part.reshape(b * h, nb).index_select(1, ids.flatten()).view(b, h, *ids.shape)
                return per_sample.add_(term)

            if buckets:
                return BucketBias(table, ids, form)
            return form()

        return layer_bias

    # ------------------------------------------------------------------ windows
    def window_flat_index(self, shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """``(nW * H * ws * ws,)`` index into one layer's f output ``(N + 1, width)`` flattened per sample
        (``width`` = :attr:`table_width`): entry ``(w, h, i, j)`` is ``token(w, i) * width + h * nb +
        bucket(i, j)`` (``h * nb`` only with a table per head). Padded query rows read row ``N``, which
        :meth:`window_bias` fills with zeros (the official code gives padded queries no bias). Entries come
        out batch-major, window, head, query, key: the attention's layout, with no transpose."""
        shift = (int(shift[0]), int(shift[1]))
        device = self.bucket_ids.device
        cached = self._window_flat.get(shift)
        if cached is None or cached.device != device:
            h, w = self.grid_size
            nb, width = self.num_buckets, self.table_width
            per_head = self.sharing in _PER_HEAD
            # made outside inference mode: a cache filled while evaluating must still serve training
            with torch.inference_mode(False):
                index = window_index(h, w, self.window, shift, device=device)
                rows = torch.where(index < 0, h * w, index)  # padding -> the zero row
                heads = torch.arange(self.num_heads, device=device) * (nb if per_head else 0)
                cached = rows[:, None, :, None] * width + heads[None, :, None, None] + self.bucket_ids
                cached = cached.flatten()
            self._window_flat[shift] = cached
        return cached

    def window_bias(self, out: torch.Tensor, shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """One layer's windowed bias ``(B * nW, H, ws, ws)`` from its f output ``(B, N|1, width)``
        (:meth:`layer_output`): ``bias[b * nW + w, h, i, j] = table[b, h, token(w, i), bucket(i, j)]``, 0 for
        padded query rows. One ``index_select`` per layer, whatever the number of windows."""
        if self.window is None:
            raise ValueError("window_bias needs a KeypointRPE built with window=(height, width)")
        if self.impl == "loop":
            return self._window_bias_loop(self.split(out), shift)
        h, w = self.grid_size
        ws = self.bucket_ids.shape[0]
        out = out.expand(-1, h * w, -1)  # sizes from the tensors, so a traced batch stays free
        flat = torch.cat([out, torch.zeros_like(out[:, :1])], dim=1).flatten(1)
        return flat.index_select(1, self.window_flat_index(shift)).view(-1, self.num_heads, ws, ws)

    def layer_output(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """``(B, N|1, width)``: f's output features of ``layer`` (:meth:`table` before its head split)."""
        width = self.table_width
        weight, bias = self.linear.weight, self.linear.bias
        if self.sharing in _PER_LAYER:
            sl = slice(layer * width, (layer + 1) * width)
            weight, bias = weight[sl], bias[sl]
        return F.linear(hidden, weight, bias)

    def _window_bias_loop(self, table: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
        """The official code's way (a benchmark reference, same numbers): pad, roll and cut the table map like
        the tokens, then one advanced-indexing call per window in a Python loop."""
        from .windows import partition

        b, heads, _, nb = table.shape
        h, w = self.grid_size
        grid = table.expand(-1, -1, h * w, -1).permute(0, 2, 1, 3).reshape(b, h, w, heads * nb)
        ws = self.bucket_ids.shape[0]
        windows = partition(grid, self.window, shift).view(b, -1, ws, heads, nb).transpose(2, 3)
        rows = torch.arange(ws, device=table.device)[:, None]
        per_window = [windows[:, i][:, :, rows, self.bucket_ids] for i in range(windows.shape[1])]
        return torch.stack(per_window, dim=1).reshape(-1, heads, ws, ws)

    def window_biases(self, keypoints: torch.Tensor | None) -> Callable[[int, tuple[int, int]], torch.Tensor]:
        """For one batch: ``(layer, shift) -> (B * nW, H, ws, ws)`` windowed bias. f runs once over the map
        (its input is shared by all layers); each layer's table is made when called."""
        hidden = self.hidden(keypoints)
        return lambda layer, shift=(0, 0): self.window_bias(self.layer_output(hidden, layer), shift)

    def extra_repr(self) -> str:
        h, w = self.grid_size
        window = f", window={self.window[0]}x{self.window[1]}" if self.window is not None else ""
        return (
            f"grid={h}x{w}{window}, buckets={self.num_buckets}, kp_input={self.kp_input}, "
            f"sharing={self.sharing}, impl={self.impl}"
        )


def official_state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` post-hook for a model holding a :class:`KeypointRPE` as ``kprpe``: official key
    names."""
    names = module.kprpe.official_names
    _rename(state_dict, {f"{prefix}kprpe.{ours}.": f"{prefix}{theirs}." for ours, theirs in names.items()})


def module_load_state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: official key names (and our own) load into ``kprpe``."""
    names = module.kprpe.official_names
    _rename(state_dict, {f"{prefix}{theirs}.": f"{prefix}kprpe.{ours}." for ours, theirs in names.items()})


def _rename(state_dict: dict, prefixes: dict[str, str]) -> None:
    """Rename keys by prefix in place, keeping their order."""
    if not any(k.startswith(p) for k in state_dict for p in prefixes):
        return
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        for old, new in prefixes.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        state_dict[key] = value
