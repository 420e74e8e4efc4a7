"""``kprpe eval gait`` (the protocol is :mod:`kprpe.eval.gait_model` and :mod:`kprpe.eval.gait`)."""

from __future__ import annotations

__all__ = ["register_gait"]


# ---------------------------------------------------------------------- kprpe eval gait
def _run_gait(args) -> int:
    from pathlib import Path

    from ..errors import CommandError
    from ..eval.gait import GaitEvalError
    from ..eval.gait_model import evaluate_model
    from ..files import check_not_input, write_json
    from ..gait import GaitFormatError
    from ..nn.checkpoint import CheckpointError
    from ..nn.swingait import load_swingait
    from .options import emit, json_safe

    out = Path(args.output)
    # the one output rule (kprpe.files): the output folder never holds an input
    check_not_input(out, [args.data, args.partition, args.weights], folder=True, error=CommandError)
    if out.exists() and not out.is_dir():
        raise CommandError(f"-o/--output {out} is an existing file; the output is a folder (results.json)")
    if args.batch_size <= 0 or args.frames_limit <= 0:
        raise CommandError("--batch-size and --frames-limit must be positive")
    try:
        model = load_swingait(args.weights)
    except CheckpointError as exc:
        raise CommandError(str(exc)) from None
    try:
        model = model.to(args.device)
    except (RuntimeError, AssertionError) as exc:  # torch: unknown device, CUDA not available
        raise CommandError(f"cannot use device {args.device!r} for weights {args.weights}: {exc}") from None
    try:
        metrics = evaluate_model(
            model,
            args.data,
            args.partition,
            batch_size=args.batch_size,
            metric=args.metric,
            frames_limit=args.frames_limit,
            keypoints=args.keypoints,
            device=args.device,
            progress=not args.quiet,
        )
    except (GaitFormatError, GaitEvalError) as exc:
        raise CommandError(str(exc)) from None
    probes, gallery = metrics.pop("probes"), metrics.pop("gallery")
    results = dict(
        protocol="gait3d",
        weights=str(args.weights),
        data=str(args.data),
        partition=str(args.partition),
        metric=args.metric,
        keypoints=args.keypoints,
        probes=probes,
        gallery=gallery,
        metrics=metrics,
    )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if v is not None)
    # the shape of the other eval protocols' output (kprpe.cli.eval): the output, its files, the results
    payload = {"output": str(out), "files": [str(out / "results.json")], "results": results}
    summary = f"gait3d ({probes} probes, {gallery} gallery): {shown}; wrote {out / 'results.json'}"
    emit(args, json_safe(payload), summary)
    return 0


def register_gait(sub) -> None:
    """``kprpe eval gait --data ROOT --partition P.json --weights W -o OUT``."""
    from pathlib import Path

    from .options import add_device_option, add_json_option, add_output_option, add_quiet_option

    p = sub.add_parser(
        "gait",
        help="Gait3D protocol: embed the test sequences of a packed gait root with a SwinGait checkpoint",
        description="Probe = PROBE_SET, gallery = every other test sequence; per-part distance averaged "
        "over parts; Rank-1/5/10, mAP, mINP in percent (docs/gait.md).",
    )
    p.add_argument("--data", required=True, type=Path, help="packed OpenGait-layout root (kprpe gait pack)")
    p.add_argument("--partition", required=True, type=Path, help="partition JSON with a PROBE_SET")
    p.add_argument("--weights", required=True, type=Path, help="SwinGait .safetensors written by kprpe train")
    p.add_argument("--metric", choices=("euc", "cos"), default="euc")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default 4)")
    p.add_argument("--frames-limit", type=int, default=720, help="at most this many frames per sequence")
    add_device_option(p)
    p.add_argument(
        "--keypoints",
        choices=("real", "shuffled", "noise", "drawn"),
        default="real",
        help="keypoint control used in training (default real)",
    )
    add_output_option(p, type=Path, help="output folder (results.json)")
    add_quiet_option(p, help="no progress bar")
    add_json_option(p)
    p.set_defaults(func=_run_gait)
