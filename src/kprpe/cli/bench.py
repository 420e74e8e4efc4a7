"""``kprpe bench``: the speed/memory benchmark (also ``python -m kprpe.bench``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..bench.runner import Case, format_engine_table, format_table, machine_info, run_suite
from ..errors import CommandError
from ..files import check_output_path, write_json
from .options import (
    add_device_option,
    add_json_option,
    add_output_option,
    add_overwrite_option,
    add_quiet_option,
    emit,
    json_safe,
)

BIAS_PATHS = ("naive", "gather", "index", "onehot", "decomposed")


def _csv(kind):
    def parse(text: str):
        return [kind(x) for x in text.split(",") if x]

    return parse


def _engine_cases(args: argparse.Namespace) -> list[Case]:
    """ViT and KP-RPE (default bias path), eager PyTorch and ONNX Runtime, inference only."""
    cases = []
    for size in args.sizes:
        size_name, overrides = ("tiny", dict(img_size=32, patch_size=8)) if size == "micro" else (size, {})
        for batch in args.batch_sizes:
            for engine in ("torch", "onnx"):
                for model in (f"vit_{size_name}", f"vit_{size_name}_kprpe"):
                    cases.append(
                        Case(model=model, mode="infer", batch_size=batch, engine=engine, overrides=overrides)
                    )
    return cases


def _swin_cases(args: argparse.Namespace) -> list[Case]:
    """Swin-V2 (its CPB) vs Swin-KP-RPE: the one-gather windowed bias and the official per-window loop."""
    cases = []
    for size in args.sizes:
        size_name, overrides = (size, {}) if size != "micro" else ("small", SWIN_MICRO)
        for mode in args.modes:
            for batch in (
                args.train_batch_sizes if mode == "train" and args.train_batch_sizes else args.batch_sizes
            ):
                if mode == "train" and batch < 2:
                    continue  # the head's BatchNorm cannot train on a single sample
                common = dict(mode=mode, batch_size=batch, device=args.device, dtype=args.dtype)
                cases.append(Case(model=f"swin_{size_name}", overrides=overrides, **common))
                for impl in ("gather", "loop"):
                    cases.append(
                        Case(model=f"swin_{size_name}_kprpe", bias_impl=impl, overrides=overrides, **common)
                    )
    return cases


# CI smoke size of the Swin rows: same code paths (padding, shifts, merges), seconds to run
SWIN_MICRO = dict(img_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=5)


def build_cases(args: argparse.Namespace) -> list[Case]:
    if getattr(args, "family", "vit") == "swin":
        return _swin_cases(args)
    if getattr(args, "engine", "torch") == "onnx":
        return _engine_cases(args)
    cases = []
    for size in args.sizes:
        for mode in args.modes:
            batches = (
                args.train_batch_sizes if mode == "train" and args.train_batch_sizes else args.batch_sizes
            )
            for batch in batches:
                if mode == "train" and batch < 2:
                    continue  # the official head's BatchNorm cannot train on a single sample
                common = dict(mode=mode, batch_size=batch, device=args.device, dtype=args.dtype)
                overrides = {}
                if size == "micro":  # CI smoke: a tiny config, same code paths
                    size_name, overrides = "tiny", dict(img_size=32, patch_size=8)
                else:
                    size_name = size
                cases.append(
                    Case(model=f"vit_{size_name}", attn_impl=args.attn_impl, overrides=overrides, **common)
                )
                kprpe_attns = args.kprpe_attn_impls or [args.attn_impl]
                for attn_impl in kprpe_attns:
                    # flex reads the table inside the kernel: the bias path does not matter there
                    impls = ["auto"] if attn_impl == "flex" else args.bias_impls
                    for impl in impls:
                        # the naive reference is the official code's way end to end, explicit softmax included
                        attn = "math" if impl == "naive" else attn_impl
                        cases.append(
                            Case(
                                model=f"vit_{size_name}_kprpe",
                                bias_impl=impl,
                                attn_impl=attn,
                                overrides=overrides,
                                **common,
                            )
                        )
                if args.dense_backward and mode == "train":
                    cases.append(
                        Case(
                            model=f"vit_{size_name}_kprpe",
                            attn_impl=args.attn_impl,
                            overrides=overrides,
                            bucket_backward=False,
                            **common,
                        )
                    )
                if args.irpe:
                    cases.append(
                        Case(model=f"vit_{size_name}_irpe", attn_impl="math", overrides=overrides, **common)
                    )
    return cases


BENCH_MARKER = "kprpe bench"  # written into every result file, so the next run may replace its own file


def _written_by_bench(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("written_by") == BENCH_MARKER
    except (OSError, ValueError, AttributeError):
        return False


def cmd_bench(args: argparse.Namespace) -> int:
    # the one output rule (kprpe.files.check_output_path), before any work; a previous bench result at the
    # same path is this command's own file and is replaced, anything else needs --overwrite
    check_output_path(args.output, overwrite=args.overwrite or _written_by_bench(Path(args.output)))
    if args.smoke:
        args.sizes, args.batch_sizes, args.repeats, args.warmup, args.rounds, args.in_process = (
            ["micro"],
            [2],
            1,
            1,
            1,
            True,
        )
    import torch

    if args.engine == "onnx" and (args.device != "cpu" or args.dtype != "float32"):
        raise CommandError("--engine onnx compares CPU float32 inference: use --device cpu --dtype float32")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(
            f"--device {args.device} requested but CUDA is not available on this machine "
            f"(torch {torch.__version__})"
        )
    unknown = sorted(set(args.kprpe_attn_impls or []) - {"sdpa", "math", "flex"})
    if unknown:
        raise CommandError(f"--kprpe-attn-impls: unknown attention {unknown}; expected sdpa, math or flex")
    if not args.device.startswith("cuda") and "flex" in (args.kprpe_attn_impls or [args.attn_impl]):
        raise CommandError(
            "attention 'flex' is compiled on CUDA only (on CPU it runs PyTorch's slow eager reference): "
            "benchmark it with --device cuda"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = build_cases(args)
    info = machine_info(args.device)
    results = run_suite(
        cases,
        warmup=args.warmup,
        repeats=args.repeats,
        rounds=args.rounds,
        threads=args.threads,
        isolated=not args.in_process,
        progress=not args.quiet,
    )
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "command_prog", "json", "quiet")}
    write_json(
        args.output, {"written_by": BENCH_MARKER, "machine": info, "settings": settings, "results": results}
    )
    lines = [
        f"machine: {info.get('cpu_model', info['processor'])}, {info['cpu_count']} CPUs, torch "
        f"{info['torch']}, threads {args.threads or info['threads']}, device "
        f"{args.device}{' (' + info['gpu'] + ')' if 'gpu' in info else ''}, dtype {args.dtype}",
        format_table(results),
    ]
    engines = format_engine_table(results)
    if engines:
        lines.append("\nONNX Runtime vs eager PyTorch (inference):\n" + engines)
    lines.append(f"wrote {args.output}")
    # the table on a terminal; on a pipe the rows themselves (the file adds the settings)
    emit(args, json_safe({"output": args.output, "machine": info, "results": results}), "\n".join(lines))
    return 1 if any("error" in r for r in results) else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sizes", type=_csv(str), default=["small", "base"], help="model sizes: small,base (micro: CI smoke)"
    )
    p.add_argument("--modes", type=_csv(str), default=["infer", "train"], help="infer,train")
    p.add_argument(
        "--batch-sizes",
        type=_csv(int),
        default=[1, 8, 32],
        help="default 1,8,32 (training skips batch 1: the BatchNorm head needs 2 or more samples)",
    )
    p.add_argument(
        "--bias-impls",
        type=_csv(str),
        default=list(BIAS_PATHS) + ["auto"],
        help=f"KP-RPE bias paths to compare (default: all of {','.join(BIAS_PATHS)},auto)",
    )
    p.add_argument(
        "--attn-impl",
        default="sdpa",
        choices=["sdpa", "math"],
        help="attention kernel for ViT and the KP-RPE paths (the naive reference always uses math)",
    )
    p.add_argument(
        "--kprpe-attn-impls",
        type=_csv(str),
        default=None,
        help="attention kernels for the KP-RPE rows, e.g. sdpa,flex (flex: CUDA only; default: --attn-impl)",
    )
    p.add_argument(
        "--dense-backward",
        action="store_true",
        help="also time KP-RPE training through autograd of the dense bias (the path before the custom "
        "backward), labelled {dense-bwd}",
    )
    p.add_argument("--no-irpe", dest="irpe", action="store_false", help="skip the iRPE baseline")
    add_device_option(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16 = autocast")
    p.add_argument(
        "--train-batch-sizes",
        type=_csv(int),
        default=None,
        help="batch sizes of the training rows when they differ from --batch-sizes (e.g. GPU: 256 / 128)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per round")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="passes over all cases in rotating order, each case in a fresh process (default 3)",
    )
    p.add_argument("--in-process", action="store_true", help="do not isolate cases in child processes")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run on a micro model (CI)")
    p.add_argument(
        "--family",
        default="vit",
        choices=["vit", "swin"],
        help="vit: ViT vs KP-RPE vs iRPE; swin: Swin-V2 (CPB) vs Swin-KP-RPE (gather; the official loop)",
    )
    p.add_argument(
        "--engine",
        choices=("torch", "onnx"),
        default="torch",
        help="onnx: ViT and KP-RPE inference, eager PyTorch vs ONNX Runtime in one run (needs kprpe[onnx])",
    )
    add_output_option(
        p, help="JSON output file", required=False, default="runs/bench/bench.json", metavar="JSON"
    )
    add_overwrite_option(p, help="replace an existing output file that an earlier kprpe bench did not write")
    add_quiet_option(p, help="no progress bar")
    add_json_option(p)
    p.set_defaults(func=cmd_bench)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time and measure memory of ViT vs KP-RPE (every bias path) vs iRPE",
        description="Inference and training-step time (median), images/s, peak memory and the KP-RPE/ViT "
        "ratio, on CPU or CUDA. Prints a Markdown table (on a pipe or with --json: the rows as one line of "
        "JSON) and writes a JSON file with the machine description.",
    )
    add_arguments(p)
