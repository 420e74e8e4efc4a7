"""The ``kprpe`` command. Each command group is a module of this package with a ``register(subparsers)``
function that imports no model code (the handlers import what they run); this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

from ..errors import KprpeError
from .options import Parser, add_json_option, emit, wants_json

# Command groups, in the order they appear in ``kprpe --help``; a group whose module is absent is skipped
# (a task package such as gait adds its cli/<task>.py and its name here).
COMMAND_MODULES = (
    "kprpe.cli.face",
    "kprpe.cli.search",
    "kprpe.cli.data",
    "kprpe.cli.train",
    "kprpe.cli.eval",
    "kprpe.cli.gait",
    "kprpe.cli.experiments",
    "kprpe.cli.bench",
    "kprpe.cli.zoo",
    "kprpe.cli.serve",
    "kprpe.cli.export",
)


def _cmd_models(args: argparse.Namespace) -> int:
    from ..nn import list_models, num_parameters, preset_config
    from ..nn.registry import preset_family

    if args.zoo:
        from .zoo import print_zoo

        print_zoo(as_json=wants_json(args))
        return 0
    rows, texts = [], []
    for name in list_models():
        family = preset_family(name)  # each family describes its own presets
        row = dict(name=name, **family.row(preset_config(name)))
        texts.append(family.describe_text(row))
        if args.params:
            from ..nn import create_model

            row["parameters"] = num_parameters(create_model(name))
        rows.append(row)
    if wants_json(args):  # the output convention: --json, or stdout not a terminal
        print(json.dumps(rows, separators=(",", ":")))
    else:
        for r, text in zip(rows, texts, strict=True):
            extra = f"  {r['parameters']:,} params" if "parameters" in r else ""
            print(f"{r['name']:<18} {text}{extra}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import demo_summary, run_demo

    result = run_demo(model_name=args.model, batch_size=args.batch_size)
    emit(args, result, demo_summary(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(
        prog="kprpe",
        description="Face and gait recognition with KP-RPE vision transformers (ViT, Swin): models, face "
        "pipeline, training, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"kprpe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered model presets")
    p.add_argument("--params", action="store_true", help="also build each preset and count its parameters")
    add_json_option(p)
    p.add_argument(
        "--zoo",
        action="store_true",
        help="list the published checkpoints loadable by name (repo id, data, reported accuracy, terms)",
    )
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("demo", help="build a KP-RPE model and embed a few synthetic faces (smoke demo)")
    p.add_argument("--model", default="vit_small_kprpe", help="preset name (default: vit_small_kprpe)")
    p.add_argument("--batch-size", type=int, default=4)
    add_json_option(p)
    p.set_defaults(func=_cmd_demo)

    for module_name in COMMAND_MODULES:
        if importlib.util.find_spec(module_name.rsplit(".", 1)[0]) is None:
            continue
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).register(sub)
    _name_every_command(parser)
    return parser


def subcommand_parsers(parser: argparse.ArgumentParser):
    """``(parser, its sub-command parsers)`` pairs, depth first (aliases such as ``enroll`` skipped)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for child in action.choices.values():
                if id(child) in seen:
                    continue
                seen.add(id(child))
                yield child
                yield from subcommand_parsers(child)


def _name_every_command(parser: argparse.ArgumentParser) -> None:
    """Each command records its full name (``kprpe eval pairs``): errors and warnings are prefixed with it.
    The deepest parser's default wins (argparse copies a sub-command's namespace over its parent's)."""
    parser.set_defaults(command_prog=parser.prog)
    for child in subcommand_parsers(parser):
        child.set_defaults(command_prog=child.prog)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KprpeError as exc:  # every deliberate error (CommandError, bad files, configs, checkpoints)
        print(f"{args.command_prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`kprpe models --json | head`): not an error of ours. Point stdout at devnull
        # so the interpreter's final flush does not raise again, and exit like other Unix tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
