"""Sequences of an OpenGait-layout root, for training and evaluation.

:class:`GaitDataset` indexes ``root/<id>/<type>/<view>/`` folders (optionally one split of a partition) and
loads a sequence on access, with its frames chosen by a frame sampler: :class:`FixedOrderedFrames` (training:
a random contiguous run, ``num`` frames kept in order) or :class:`AllOrderedFrames` (evaluation). It keeps
``labels`` and ``indices_by_label`` so a P x K sampler (:func:`pk_batches`) can draw P ids and K sequences.
Nothing here needs torch: items are numpy arrays that a collate function can stack.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .formats import GaitFormatError, load_sequence
from .partition import GaitPartition, read_partition, sequence_key

__all__ = [
    "SequenceRef",
    "ScanResult",
    "scan_sequences",
    "FixedOrderedFrames",
    "AllOrderedFrames",
    "GaitDataset",
    "pk_batches",
]


@dataclass(frozen=True)
class SequenceRef:
    """One sequence folder: its identity, type, view and path."""

    identity: str
    seq_type: str
    view: str
    path: Path

    @property
    def key(self) -> str:
        return sequence_key(self.identity, self.seq_type, self.view)


@dataclass
class ScanResult:
    """The sequences found under a root and the folders skipped, each with its reason."""

    sequences: list[SequenceRef] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _subfolders(folder: Path, top: Path, result: ScanResult) -> list[Path]:
    kept = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):  # staging folders of an interrupted pack, editor files
            continue
        if not child.is_dir():
            continue
        resolved = child.resolve()
        if resolved != top and top not in resolved.parents:
            result.skipped.append((str(child), f"a link that leaves the data root (to {resolved})"))
            continue
        kept.append(child)
    return kept


def scan_sequences(root: str | os.PathLike, suffixes: tuple[str, ...] = (".pkl",)) -> ScanResult:
    """Every ``<id>/<type>/<view>`` folder under ``root`` holding files ending in ``suffixes``, sorted.

    Skipped and counted (never silently): folders that are links leaving ``root``, and view folders without
    such files (empty sequences). Hidden names are ignored. The files are not opened here."""
    root = Path(root)
    if not root.is_dir():
        raise GaitFormatError(f"gait data root not found: {root}")
    top = root.resolve()
    result = ScanResult()
    for id_dir in _subfolders(root, top, result):
        for type_dir in _subfolders(id_dir, top, result):
            for view_dir in _subfolders(type_dir, top, result):
                if not any(
                    p.suffix.lower() in suffixes and not p.name.startswith(".") for p in view_dir.iterdir()
                ):
                    result.skipped.append((str(view_dir), f"empty sequence (no {'/'.join(suffixes)} files)"))
                    continue
                result.sequences.append(SequenceRef(id_dir.name, type_dir.name, view_dir.name, view_dir))
    return result


@dataclass(frozen=True)
class FixedOrderedFrames:
    """Training frames: a random contiguous run of ``num + skip`` frames, ``num`` of them kept at random in
    their order (OpenGait's ``fixed_ordered`` with ``frames_skip_num``). Sequences shorter than the run are
    tiled first, so every item has exactly ``num`` frames."""

    num: int = 30
    skip: int = 4

    def __call__(self, length: int, rng: np.random.Generator) -> np.ndarray:
        run = self.num + self.skip
        frames = np.arange(length)
        if length < run:
            frames = np.tile(frames, -(-run // length))
        start = int(rng.integers(0, frames.size - run + 1))
        window = frames[start : start + run]
        keep = np.sort(rng.choice(run, size=self.num, replace=False))
        return window[keep]


@dataclass(frozen=True)
class AllOrderedFrames:
    """Evaluation frames: all of them in order, at most ``limit`` (OpenGait's ``frames_all_limit``)."""

    limit: int | None = 720

    def __call__(self, length: int, rng: np.random.Generator) -> np.ndarray:
        return np.arange(length if self.limit is None else min(length, self.limit))


class GaitDataset:
    """Sequences under ``root`` (the ids of one ``split`` of ``partition`` if given).

    ``partition``: a :class:`GaitPartition` or a JSON path. Ids it names that have no sequence raise
    :class:`GaitFormatError` unless ``allow_missing`` (then they are listed in ``missing_ids``).
    ``item = dataset[i]``: ``{modality: array with the sampled frames first, "label": int, "key": str}``.
    ``modalities``: the file stems to load (default: all). ``transform``: ``f(item, rng) -> item``, called
    after frame sampling, the place for joint silhouette + keypoint augmentation.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        partition: GaitPartition | str | os.PathLike | None = None,
        split: str = "all",
        *,
        frames=None,
        modalities: tuple[str, ...] | None = None,
        transform=None,
        allow_missing: bool = False,
        seed: int = 0,
    ):
        self.root = Path(root)
        scan = scan_sequences(self.root)
        self.skipped = scan.skipped
        sequences = scan.sequences
        self.missing_ids: list[str] = []
        if partition is not None:
            if not isinstance(partition, GaitPartition):
                partition = read_partition(partition)
            wanted = partition.ids(split)
            self.missing_ids = partition.missing_ids({s.identity for s in sequences}, split)
            if self.missing_ids and not allow_missing:
                raise GaitFormatError(
                    f"{self.root}: {len(self.missing_ids)} of the {len(wanted)} {split} ids in the partition "
                    f"have no sequence (first: {', '.join(self.missing_ids[:5])}); pass "
                    "allow_missing to skip them"
                )
            wanted_set = set(wanted)
            sequences = [s for s in sequences if s.identity in wanted_set]
        if not sequences:
            raise GaitFormatError(
                f"{self.root}: no sequences" + (f" in split {split!r}" if partition else "")
            )
        self.partition = partition
        self.sequences = sequences
        self.identities = sorted({s.identity for s in sequences})
        index = {identity: i for i, identity in enumerate(self.identities)}
        self.labels = np.array([index[s.identity] for s in sequences], dtype=np.int64)
        self.indices_by_label = {i: np.flatnonzero(self.labels == i) for i in range(len(self.identities))}
        self.frames = frames if frames is not None else AllOrderedFrames()
        self.modalities = modalities
        self.transform = transform
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.sequences)

    def load(self, index: int) -> dict[str, np.ndarray]:
        """All frames of every (selected) modality of sequence ``index``."""
        ref = self.sequences[index]
        arrays = load_sequence(ref.path, root=self.root)
        if self.modalities is not None:
            absent = [m for m in self.modalities if m not in arrays]
            if absent:
                raise GaitFormatError(f"{ref.path}: no modality {absent[0]!r} (has {', '.join(arrays)})")
            arrays = {m: arrays[m] for m in self.modalities}
        return arrays

    def sample(self, index: int, rng: np.random.Generator) -> dict:
        """Sequence ``index`` with frames chosen by ``self.frames`` using ``rng`` (reproducible workers)."""
        arrays = self.load(index)
        length = next(iter(arrays.values())).shape[0]
        chosen = self.frames(length, rng)
        item: dict = {name: array[chosen] for name, array in arrays.items()}
        item["label"] = int(self.labels[index])
        item["key"] = self.sequences[index].key
        if self.transform is not None:
            item = self.transform(item, rng)
        return item

    def __getitem__(self, index: int) -> dict:
        return self.sample(index, self.rng)


def pk_batches(
    indices_by_label: dict[int, np.ndarray], p: int, k: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Endless batches of ``p * k`` dataset indices: ``p`` distinct labels, ``k`` sequences each (drawn with
    replacement when a label has fewer than ``k``), label-major order."""
    labels = np.array(sorted(indices_by_label))
    if p > labels.size:
        raise GaitFormatError(f"P = {p} identities per batch but the data has only {labels.size}")
    while True:
        batch = []
        for label in rng.choice(labels, size=p, replace=False):
            pool = indices_by_label[int(label)]
            batch.append(rng.choice(pool, size=k, replace=pool.size < k))
        yield np.concatenate(batch)
