"""``kprpe fetch REPO``: download a published checkpoint's weights and configs into the Hugging Face cache
(for a machine that will later run offline), and the ``kprpe models --zoo`` table."""

from __future__ import annotations

import argparse
import json

from ..zoo.catalog import CATALOG, COMMON_TERMS, METRICS, SOURCES
from .options import add_json_option, emit


def zoo_rows() -> list[dict]:
    return [entry.to_dict() for entry in CATALOG]


def print_zoo(as_json: bool = False) -> None:
    """The known published checkpoints, with their reported accuracy, its source and the data terms."""
    rows = zoo_rows()
    if as_json:
        print(json.dumps(rows, separators=(",", ":")))
        return
    shown = ("AVG", "IJBC@0.01", "TinyFace R1")
    print(
        f"{'repo id':<52} {'kind':<11} {'architecture':<17} {'loss':<8} {'data':<13} "
        + " ".join(f"{m:>11}" for m in shown)
    )
    for row in rows:
        arch = row["architecture"].split(" (")[0].split(":")[0]
        scores = " ".join(
            f"{row['reported'][m]:>11.2f}" if m in row["reported"] else f"{'-':>11}" for m in shown
        )
        print(
            f"{row['repo_id']:<52} {row['kind']:<11} {arch[:17]:<17} {row['loss'] or '-':<8} "
            f"{row['training_data'] or '-':<13} {scores}"
        )
    print(
        "\nreported accuracy (%) as published by the authors; all columns "
        f"({', '.join(METRICS)}): kprpe models --zoo --json"
    )
    print("source: " + SOURCES["cvlface-readme"])
    print("training-data terms:")
    for data in sorted({row["training_data"] for row in rows if row["training_data"]}):
        licence = next(r["licence"] for r in rows if r["training_data"] == data)
        print(f"  {data}: {licence}")
    print(f"  all: {COMMON_TERMS}")
    print(
        "load one by name: kprpe.load_official('<repo id>') / --weights <repo id>; offline machines: kprpe "
        "fetch"
    )


def _cmd_fetch(args: argparse.Namespace) -> int:
    from ..errors import CommandError
    from ..zoo.catalog import find_entry
    from ..zoo.hub import ZooError, _read_registry, parse_repo_id, registry_path, snapshot

    parsed = parse_repo_id(args.repo)
    if parsed is None:
        raise CommandError(
            f"{args.repo!r} is not a Hugging Face repo id (owner/name[@revision]), e.g. "
            "minchul/cvlface_adaface_vit_base_kprpe_webface4m"
        )
    repo, revision = parsed
    try:
        folder = snapshot(repo, revision=revision)  # verifies and records every file's sha256
        recorded = _read_registry(registry_path())["files"]
    except ZooError as exc:
        raise CommandError(str(exc)) from None
    entry = find_entry(repo)
    prefix = f"{repo}@{folder.name}/"
    files = {key[len(prefix) :]: value["sha256"] for key, value in recorded.items() if key.startswith(prefix)}
    text = f"{repo} ({entry.kind if entry else 'not in the zoo catalog'}): {folder}"
    text += "".join(f"\n  {digest}  {name}" for name, digest in files.items())
    payload = {"repo": repo, "kind": entry.kind if entry else None, "folder": str(folder), "sha256": files}
    emit(args, payload, text)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fetch",
        help="download a published checkpoint (weights and configs only) into the Hugging Face cache",
        description="Fetch a Hugging Face repo's weights and configs (never its Python code) into the "
        "standard "
        "cache ($HF_HUB_CACHE), record their sha256, and print where they are. Copy the cache to an "
        "offline machine and set HF_HUB_OFFLINE=1 there.",
    )
    p.add_argument(
        "repo", help="repo id, e.g. minchul/cvlface_adaface_vit_base_kprpe_webface4m (@revision optional)"
    )
    add_json_option(p)
    p.set_defaults(func=_cmd_fetch)
