"""One attention layer, every way of adding KP-RPE's bias: ``python -m kprpe.bench.kernels``.

The model-level benchmark (``kprpe bench``) says how much KP-RPE costs; this says where, and measures the
options that could remove the bias read (docs/performance.md, "Options measured"): the eager fused kernel
with each bias path, ``torch.compile`` (inductor) of the explicit attention with the lookup inside, compiled
FlexAttention, bfloat16, and the training step through the custom backward vs autograd of the dense bias.
Compile times are reported. With one thread, times are the thread's CPU time (robust to other jobs sharing
the machine); with more, wall-clock time. Each figure is the minimum over ``--rounds`` interleaved rounds of
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import sys
import time


def _clock():
    import torch

    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _best(fn, repeats: int) -> float:
    clock = _clock()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def build_cases(batch: int, heads: int, grid: int, dim: int, compile_: bool) -> tuple[dict, dict]:
    """name -> zero-argument callable, and name -> compile seconds (compiled cases only)."""
    import torch
    import torch.nn.functional as F

    from kprpe.nn.buckets import bucket_ids
    from kprpe.nn.kprpe_attention import BucketAttention

    torch.manual_seed(0)
    ids = bucket_ids(grid)
    n, nb, scale = ids.shape[0], 49, dim**-0.5
    q, k, v = (torch.randn(batch, heads, n, dim) for _ in range(3))
    # f's output viewed as (B, H, N, nb), as the model makes it
    table = torch.randn(batch, n, heads, nb).permute(0, 2, 1, 3)
    wide = ids.expand(batch, heads, n, n)
    one_hot = F.one_hot(ids, nb).float()
    position = torch.randn(1, heads, n, n)  # the decomposed path's cached per-layer term
    shift = torch.randn(batch * heads, nb)
    bf = torch.bfloat16
    qb, kb, vb, tb, ohb = q.to(bf), k.to(bf), v.to(bf), table.to(bf), one_hot.to(bf)

    def sdpa(q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def decomposed_bias():
        per_sample = shift.index_select(1, ids.flatten()).view(batch, heads, n, n)
        return per_sample.add_(position)

    def explicit(q, k, v, table):
        logits = (q * scale) @ k.transpose(-2, -1) + torch.gather(table, 3, wide)
        return logits.softmax(-1) @ v

    cases = {
        "fp32 plain ViT attention (no bias)": lambda: sdpa(q, k, v),
        "fp32 gather bias only": lambda: torch.gather(table, 3, wide),
        "fp32 fused + gather bias": lambda: sdpa(q, k, v, torch.gather(table, 3, wide)),
        "fp32 fused + decomposed bias (cached term)": lambda: sdpa(q, k, v, decomposed_bias()),
        "fp32 fused + one-hot bias": lambda: sdpa(q, k, v, torch.einsum("bhik,ijk->bhij", table, one_hot)),
        "fp32 explicit + gather bias (eager)": lambda: explicit(q, k, v, table),
        "bf16 plain ViT attention (no bias)": lambda: sdpa(qb, kb, vb),
        "bf16 fused + gather bias": lambda: sdpa(qb, kb, vb, torch.gather(tb, 3, wide)),
        "bf16 fused + one-hot bias": lambda: sdpa(qb, kb, vb, torch.einsum("bhik,ijk->bhij", tb, ohb)),
    }
    compile_s = {}
    if compile_:
        from torch.nn.attention.flex_attention import flex_attention

        compiled_explicit = torch.compile(explicit, dynamic=False)
        compiled_flex = torch.compile(flex_attention, dynamic=False)

        def score_mod(score, b, h, i, j):
            return score + table[b, h, i, ids[i, j]]

        for name, fn in (
            ("fp32 torch.compile explicit + lookup inside", lambda: compiled_explicit(q, k, v, table)),
            (
                "fp32 torch.compile FlexAttention (table read in-kernel)",
                lambda: compiled_flex(q, k, v, score_mod=score_mod, scale=scale),
            ),
        ):
            start = time.perf_counter()
            with torch.no_grad():
                fn()
            compile_s[name] = time.perf_counter() - start
            cases[name] = fn

    # training: forward + backward of one layer's attention
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    tg = table.clone().requires_grad_()
    grad = torch.randn_like(q)

    def train(fn, inputs):
        def step():
            with torch.enable_grad():
                torch.autograd.grad(fn(), inputs, grad)

        return step

    cases["train: plain ViT attention"] = train(lambda: sdpa(qg, kg, vg), (qg, kg, vg))
    cases["train: autograd through the dense bias"] = train(
        lambda: sdpa(qg, kg, vg, torch.gather(tg, 3, wide)), (qg, kg, vg, tg)
    )
    cases["train: custom backward (kprpe_attention)"] = train(
        lambda: BucketAttention.apply(qg, kg, vg, tg, ids, scale, None), (qg, kg, vg, tg)
    )
    return cases, compile_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kprpe.bench.kernels", description=__doc__, allow_abbrev=False
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16, help="ViT-Base: 16, ViT-Small: 8")
    parser.add_argument("--grid", type=int, default=14, help="patch grid side (112 px / 8 px patches: 14)")
    parser.add_argument("--dim", type=int, default=32, help="head dimension")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("-o", "--output", default=None, help="JSON file for the figures")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cases, compile_s = build_cases(args.batch, args.heads, args.grid, args.dim, args.compile)
    best = {name: float("inf") for name in cases}
    with torch.inference_mode(False), torch.no_grad():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in cases.items():
                best[name] = min(best[name], _best(fn, args.repeats))
    print(
        f"one attention layer: batch {args.batch}, {args.heads} heads, {args.grid}x{args.grid} tokens, "
        f"head dim {args.dim}, {args.threads} thread(s); min of {args.rounds}x{args.repeats} runs"
    )
    print("| case | ms | compile s |\n|---|---:|---:|")
    for name, seconds in best.items():
        comp = f"{compile_s[name]:.1f}" if name in compile_s else ""
        print(f"| {name} | {seconds * 1e3:.2f} | {comp} |")
    if args.output:
        from ..files import write_json

        write_json(
            args.output,
            {
                "settings": vars(args),
                "ms": {k: v * 1e3 for k, v in best.items()},
                "compile_s": compile_s,
                "torch": torch.__version__,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
