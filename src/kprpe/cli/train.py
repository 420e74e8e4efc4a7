"""``kprpe train CONFIG.yaml [key=value ...] [--resume | --resume-from DIR]`` (also under torchrun)."""

from __future__ import annotations

import argparse

from ..errors import CommandError
from .options import add_json_option, add_quiet_option, emit, json_safe

__all__ = ["register"]


def _cmd_train(args: argparse.Namespace) -> int:
    from ..train.config import load_config
    from ..train.loop import Trainer

    if args.resume and args.resume_from:
        raise CommandError(
            "use either --resume (latest checkpoint of the run) or --resume-from DIR, not both"
        )
    resume = args.resume_from or ("latest" if args.resume else None)
    overrides = [*args.overrides, "train.progress=false"] if args.quiet else args.overrides
    # bad configs, data, landmark files and checkpoints raise KprpeError subclasses: kprpe.cli prints them
    if _is_gait_config(args.config):  # task: gait (kprpe.train.gait: SwinGait, P x K, triplet + CE)
        from ..train.gait import load_gait_config

        cfg = load_gait_config(args.config, overrides)
    else:
        cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, resume=resume)
    final = trainer.run()
    if trainer.dist.is_main:  # one result per run, not one per torchrun process
        payload, summary = _result(trainer, final)
        emit(args, json_safe(payload), summary)
    return 0


def _result(trainer, final) -> tuple[dict, str]:
    """The finished run by the output convention: where the model and logs are, the steps, the last logged
    loss and the final validation; a task that writes a results file (gait: results.json) has its content
    under ``results``."""
    import json

    out = trainer.output_dir
    # gait writes results.json at the end of a validated run (face runs keep validation.csv only)
    results = out / "results.json" if trainer.task.name == "gait" and trainer.last_validation else None
    losses = [row["loss"] for row in trainer.history if "loss" in row]
    logs = [out / name for name in ("log.jsonl", "train_log.csv", "validation.csv") if (out / name).is_file()]
    payload = {
        "task": trainer.task.name,
        "output": str(out),
        "model": str(final),
        "steps": trainer.step,
        "loss": losses[-1] if losses else None,
        "validation": trainer.last_validation,
        "files": [str(f) for f in [final, *([results] if results else []), *logs]],
    }
    lines = [f"trained {trainer.step} steps" + (f"; final loss {losses[-1]:.4f}" if losses else "")]
    for name, metrics in (trainer.last_validation or {}).items():
        lines.append(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None))
    if results:
        payload["results"] = json.loads(results.read_text(encoding="utf-8"))
        lines.append(f"Gait3D protocol on the test split: {results}")
        lines.append(f"model: {final} (kprpe eval gait --weights)")
    else:
        lines.append(f"model: {final} (load with kprpe.load_official or kprpe verify --weights)")
    return payload, "\n".join(lines)


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
    add_quiet_option(p, help="no progress bar (the per-step numbers still go to train_log.csv and log.jsonl)")
    add_json_option(p)
    p.set_defaults(func=_cmd_train)
