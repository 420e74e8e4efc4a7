"""What kprpe uses when no model is named: the published KP-RPE ViT-Base (WebFace4M), the DFA aligner its
authors trained it on, and the training-data terms shown once per published checkpoint.

``kprpe verify a.jpg b.jpg`` (no ``--weights``), ``kprpe serve`` and ``kprpe.load_official()`` all go through
:data:`DEFAULT_WEIGHTS` and :func:`kprpe.zoo.resolve`: downloaded on first use (weights and configs only,
sha256 recorded), or the one-line error naming ``kprpe fetch`` when offline and not cached.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .catalog import COMMON_TERMS, DEFAULT_ALIGNER_WEIGHTS, find_entry
from .hub import ZooError, kprpe_cache_dir, resolve, snapshot_origin

__all__ = [
    "DEFAULT_WEIGHTS",
    "AlignerChoice",
    "default_aligner",
    "show_terms_once",
    "terms_marker",
    "trained_aligner",
]

# The checkpoint every face command, `kprpe serve` and the Python API use when no weights are given.
DEFAULT_WEIGHTS = "minchul/cvlface_adaface_vit_base_kprpe_webface4m"


def terms_marker(repo: str) -> Path:
    """The file whose presence means ``repo``'s training-data terms were shown on this machine."""
    owner, name = repo.split("/", 1)
    return kprpe_cache_dir() / "zoo" / "terms-shown" / f"{owner}--{name}".lower()


def show_terms_once(repo: str, *, stream=None) -> bool:
    """Print a catalogued checkpoint's training-data terms (one line, stderr) the first time it is used here,
    then leave a marker in kprpe's cache; True when printed. Uncatalogued repos have no known terms."""
    entry = find_entry(repo)
    if entry is None:
        return False
    marker = terms_marker(entry.repo_id)
    if marker.exists():
        return False
    trained = f"was trained on {entry.training_data}: " if entry.training_data else ""
    print(
        f"kprpe: {entry.repo_id} {trained}{entry.licence}; {COMMON_TERMS} "
        "(shown once; all checkpoints' terms: kprpe models --zoo)",
        file=stream or sys.stderr,
        flush=True,
    )
    from ..files import atomic_write_text

    try:
        atomic_write_text(marker, datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    except OSError:  # a read-only cache: the terms are shown again next time, which is harmless
        pass
    return True


def trained_aligner(weights: str | os.PathLike | None) -> str | None:
    """The aligner a published checkpoint was trained on its crops (the DFA, for the KP-RPE models), named by
    repo id or found as a snapshot of the Hugging Face cache; None for anything else (your own weights)."""
    entry = _published(weights)
    kprpe_vit = entry is not None and entry.loader == "vit" and "KP-RPE" in entry.architecture
    return DEFAULT_ALIGNER_WEIGHTS if kprpe_vit else None


def _published(weights):
    """The catalog entry of ``weights`` named by repo id or by its snapshot folder, else None."""
    if weights is None:
        return None
    origin = snapshot_origin(weights)
    return find_entry(origin[0] if origin else os.fspath(weights))


@dataclass(frozen=True)
class AlignerChoice:
    """The landmark backend a command uses when none is named, and the one-line ``notice`` explaining a
    fallback (None when there is nothing to say)."""

    name: str  # "dfa" or "dlib"
    notice: str | None = None


def default_aligner(weights, aligner_weights: str | os.PathLike | None = None) -> AlignerChoice:
    """``dfa`` for the published KP-RPE weights (trained on its crops) when its weights can be had (cached, or
    downloadable); ``dlib`` with a notice when they cannot (offline fallback); ``dlib`` for other weights."""
    wanted = trained_aligner(weights)
    if wanted is None:
        return AlignerChoice("dlib")
    aligner_weights = aligner_weights or wanted
    try:
        resolve(aligner_weights, kind="aligner")
    except ZooError as exc:
        reason = str(exc).split(";", 1)[0]
        model = _published(weights).repo_id
        return AlignerChoice(
            "dlib",
            f"kprpe: using dlib landmarks, not the DFA aligner {model} was trained with ({reason}); "
            f"run `kprpe fetch {aligner_weights}` to use it, or give --aligner",
        )
    return AlignerChoice("dfa")
