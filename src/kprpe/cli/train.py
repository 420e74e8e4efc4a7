"""``kprpe train CONFIG.yaml [key=value ...] [--resume | --resume-from DIR]`` (also under torchrun)."""

from __future__ import annotations

import argparse

from ..errors import CommandError

__all__ = ["register"]


def _cmd_train(args: argparse.Namespace) -> int:
    from ..train.config import load_config
    from ..train.loop import Trainer

    if args.resume and args.resume_from:
        raise CommandError(
            "use either --resume (latest checkpoint of the run) or --resume-from DIR, not both"
        )
    resume = args.resume_from or ("latest" if args.resume else None)
    # bad configs, data, landmark files and checkpoints raise KprpeError subclasses: kprpe.cli prints them
    if _is_gait_config(args.config):  # task: gait (kprpe.train.gait: SwinGait, P x K, triplet + CE)
        from ..train.gait import load_gait_config

        cfg = load_gait_config(args.config, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg, resume=resume)
    final = trainer.run()
    if trainer.dist.is_main and trainer.task.name == "gait":
        print(
            f"trained {trainer.step} steps; model: {final}; Gait3D protocol on the test split: "
            f"{trainer.output_dir / 'results.json'}"
        )
    elif trainer.dist.is_main:
        print(
            f"trained {trainer.step} steps; model: {final} (load with kprpe.load_official or kprpe verify "
            "--weights)"
        )
    return 0


def _is_gait_config(path) -> bool:
    """True for a YAML config whose top level says ``task: gait`` (anything unreadable: the face loader's
    errors apply)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(values, dict) and values.get("task") == "gait"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a model from a YAML config (single process, or under torchrun)",
        description="Train from CONFIG (see docs/training.md). Overrides are key=value with dotted keys, "
                    "e.g. "
        "optim.lr=3e-4 train.max_steps=1000. Multi-GPU: torchrun --nproc_per_node N -m kprpe train CONFIG.",
    )
    p.add_argument("config", help="YAML training config")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (values parsed as YAML)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir"
    )
    p.add_argument(
        "--resume-from", default=None, metavar="DIR", help="continue from this checkpoint directory"
    )
    p.set_defaults(func=_cmd_train)
