"""``kprpe experiment gait`` (the command; the experiment is :mod:`kprpe.experiments.gait`)."""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import CommandError
from .options import add_json_option, add_output_option, add_quiet_option, emit, json_safe, wants_json

__all__ = ["register_gait"]


def register_gait(sub) -> None:
    g = sub.add_parser(
        "gait",
        help="SwinGait-2D vs + KP-RPE on synthetic walkers, aligned and misaligned tests, keypoint controls",
        description="Train SwinGait-2D and SwinGait-2D + KP-RPE (and the controls: shuffled keypoints, noise "
        "keypoints, keypoints drawn into the silhouettes) under one rule on synthetic walkers; test with the "
        "Gait3D protocol on aligned and --misalign walks. Writes gait_table.md, gait_results.json and "
        "gait_curves.png to -o/--output. Finished runs in OUTPUT/runs are reused. See docs/gait.md.",
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help="a short smoke run: 1 seed, baseline vs KP-RPE, 16 walkers, 30 steps (a few minutes on 2 "
        "cores); says it is short",
    )
    g.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; 1 with --quick)")
    g.add_argument("--steps", type=int, default=None, help="training steps per run (default 100; 30 quick)")
    g.add_argument("--ids", type=int, default=None, help="walkers (default 32; 16 quick)")
    g.add_argument("--sequences", type=int, default=None, help="walks per walker (default 4)")
    g.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset of baseline,kprpe,kprpe_mask,kprpe_shuffled,kprpe_noise,"
        "baseline_drawn",
    )
    g.add_argument(
        "--ids-per-batch", type=int, default=None, help="P of the P x K batches (default 6; 4 quick)"
    )
    g.add_argument(
        "--clip-frames", type=int, default=None, help="training clip length (default 8)"
    )
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    g.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between validations for the learning curves (default: half the steps); training does "
        "not depend on it",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        help="run only this seed index (0..seeds-1), to split the experiment over processes",
    )
    g.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: tabulate the runs finished in OUTPUT/runs and list the missing ones",
    )
    add_output_option(g, help="output folder")
    add_quiet_option(g, help="no progress lines (which run is training)")
    add_json_option(g)
    g.set_defaults(func=_cmd_gait)


def _cmd_gait(args: argparse.Namespace) -> int:
    from ..experiments.gait import VARIANTS, GaitExperimentConfig, quick_gait_config, run_gait_experiment

    overrides = {
        k: getattr(args, k)
        for k in ("seeds", "steps", "ids", "sequences", "ids_per_batch", "clip_frames", "eval_every")
        if getattr(args, k) is not None
    }
    for key, value in overrides.items():
        least = 2 if key in ("ids", "sequences", "ids_per_batch") else 1
        if value < least:
            raise CommandError(f"--{key.replace('_', '-')} must be at least {least}, got {value}")
    if args.variants:
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown or not variants:
            raise CommandError(
                f"--variants: unknown {unknown or variants}; choose from {', '.join(VARIANTS)}"
            )
        overrides["variants"] = variants
    overrides["threads"] = args.threads
    if args.quick:
        overrides.setdefault("eval_every", max(1, overrides.get("steps", 30) // 2))
    else:
        overrides.setdefault("eval_every", max(1, overrides.get("steps", 100) // 2))
    cfg = quick_gait_config(**overrides) if args.quick else GaitExperimentConfig(**overrides)
    if args.seed is not None and not 0 <= args.seed < cfg.seeds:
        raise CommandError(f"--seed must be in 0..{cfg.seeds - 1} (--seeds {cfg.seeds}), got {args.seed}")
    start = time.perf_counter()
    results = run_gait_experiment(
        args.output,
        cfg,
        log=(lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)),
        seeds=None if args.seed is None else [args.seed],
        train=not args.collect,
    )
    from pathlib import Path

    out = Path(args.output)
    text = (out / "gait_table.md").read_text().rstrip("\n")
    if args.quick:  # on a pipe the warning goes to stderr: the JSON says "quick" too
        notice = (
            f"--quick finished in {time.perf_counter() - start:.0f} s: one seed, {cfg.steps} steps on "
            f"{cfg.ids} walkers. A smoke test of the pipeline, NOT a result: run without --quick "
            "(>= 3 seeds and all controls; docs/gait.md)."
        )
        if wants_json(args):
            print(notice, file=sys.stderr)
        else:
            text += "\n" + notice
    files = [out / name for name in ("gait_results.json", "gait_table.md", "gait_curves.png")]
    payload = {
        "output": str(out),
        "files": [str(f) for f in files if f.is_file()],
        "results": str(out / "gait_results.json"),
        "quick": args.quick,
        "runs": len(results["runs"]),
        "missing": results["missing"],
        "seconds": results["seconds"],
        "summary": results["summary"],  # variant -> aligned/misaligned -> metric -> mean, std, n
    }
    emit(args, json_safe(payload), text)
    return 0 if results["runs"] else 1
