"""One SwinGait training step (forward + backward + AdamW), baseline vs KP-RPE: time and peak memory.

Each variant runs in its own process (peak RSS is per process). Usage:
    PYTHONPATH=src python docs/results/gait/bench_step.py --ids 4 --seqs 2 --frames 30 [--size paper]
Prints one JSON line per variant. The paper's batch is 32 ids x 4 sequences x 30 frames (3840 frames).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SIZES = {
    "small": dict(
        stem_channels=(16, 32), embed_dim=32, depths=(2, 2), num_heads=(2, 4), part_dim=32, cpb_hidden=64
    ),
    "paper": {},
}


def one(args) -> dict:
    import torch

    from kprpe.nn import create_model
    from kprpe.train.gait import batch_all_triplet, parameter_groups, part_cross_entropy

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = create_model(args.model, **SIZES[args.size], num_classes=args.ids * 2)
    opt = torch.optim.AdamW(parameter_groups(model, 3e-4, 0.02))
    n = args.ids * args.seqs
    sils = (torch.rand(n, args.frames, 64, 44) > 0.5).float()
    kp = torch.rand(n, args.frames, 17, 3)
    labels = torch.arange(args.ids).repeat_interleave(args.seqs)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        out = model(sils, kp, naive_kprpe=bool(args.naive))
        loss = batch_all_triplet(out["embeddings"], labels)[0] + part_cross_entropy(out["logits"], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(
        model=args.model,
        naive=bool(args.naive),
        size=args.size,
        batch=[args.ids, args.seqs, args.frames],
        step_s=min(times[1:]),
        peak_rss_mb=peak / 1024,
        rss_growth_mb=(peak - before) / 1024,
    )


def bias_only(args) -> dict:
    """One stage's KP-RPE biases at the paper's layout (stage 1: 4 blocks x 16 heads, 49 buckets, 15 x 10
    tokens, 3 x 5 windows) for ``frames`` frames, forward + backward into f: separable vs per-token table."""
    import torch

    from kprpe.nn.swingait import GaitKeypointRPE, SwinGaitConfig

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    stage = GaitKeypointRPE(SwinGaitConfig(embed_dim=256, depths=(4, 2), num_heads=(16, 32)), 0)
    for p in stage.parameters():
        torch.nn.init.normal_(p, std=0.1)
    kp = torch.rand(args.frames, 17, 3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        biases = stage.naive_window_biases(kp) if args.naive else stage.window_biases(kp)
        total = sum((biases(j, (0, 0) if j % 2 == 0 else (1, 2)) * (j + 1)).sum() for j in range(4))
        total.backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_layer_table = args.frames * 150 * 49 * 16
    return dict(
        bias_only=True,
        naive=bool(args.naive),
        frames=args.frames,
        seconds=min(times[1:]),
        rss_growth_mb=(peak - before) / 1024,
        per_token_table_values_per_layer=per_layer_table,
        per_token_table_values_per_stage=per_layer_table * 4,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ids", type=int, default=4)
    p.add_argument("--seqs", type=int, default=2)
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default=None)
    p.add_argument("--naive", type=int, default=None)
    p.add_argument("--bias-only", action="store_true", help="time one stage's KP-RPE biases only")
    args = p.parse_args()
    if args.bias_only and args.naive is not None:
        print(json.dumps(bias_only(args)))
        return
    if args.bias_only:
        for naive in (0, 1):
            cmd = [
                sys.executable,
                __file__,
                "--bias-only",
                "--naive",
                str(naive),
                "--frames",
                str(args.frames),
                "--threads",
                str(args.threads),
                "--repeats",
                str(args.repeats),
            ]
            print(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip(), flush=True)
        return
    if args.model is not None:
        print(json.dumps(one(args)))
        return
    for model, naive in (("swingait_2d", 0), ("swingait_2d_kprpe", 0), ("swingait_2d_kprpe", 1)):
        cmd = [sys.executable, __file__, "--model", model, "--naive", str(naive)]
        for name in ("ids", "seqs", "frames", "size", "threads", "repeats"):
            cmd += [f"--{name}", str(getattr(args, name))]
        print(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
