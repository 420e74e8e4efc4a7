"""Published checkpoints by name: ``kprpe.zoo.resolve("minchul/cvlface_adaface_vit_base_kprpe_webface4m")``
gives local, verified files (weights and configs only, from the standard Hugging Face cache);
:data:`DEFAULT_WEIGHTS` is the model used when none is named (:mod:`kprpe.zoo.defaults`).

Imports only the standard library at import time (huggingface_hub is loaded when a repo id must be resolved),
so :mod:`kprpe.nn` can call it without pulling in anything else.
"""

from __future__ import annotations

from .catalog import CATALOG, ZooEntry, find_entry
from .defaults import DEFAULT_WEIGHTS, AlignerChoice, default_aligner, show_terms_once, trained_aligner
from .hub import (
    KINDS,
    ZooError,
    cached_snapshot,
    hub_cache_dir,
    hub_offline,
    kprpe_cache_dir,
    parse_repo_id,
    registry_path,
    resolve,
    snapshot,
    snapshot_origin,
    verify_snapshot,
)

__all__ = [
    "CATALOG",
    "DEFAULT_WEIGHTS",
    "AlignerChoice",
    "cached_snapshot",
    "default_aligner",
    "show_terms_once",
    "snapshot_origin",
    "trained_aligner",
    "KINDS",
    "ZooEntry",
    "ZooError",
    "find_entry",
    "hub_cache_dir",
    "hub_offline",
    "kprpe_cache_dir",
    "parse_repo_id",
    "registry_path",
    "resolve",
    "snapshot",
    "verify_snapshot",
]
