"""The OpenGait partition file:
``{"TRAIN_SET": [ids], "TEST_SET": [ids], "PROBE_SET": ["id-type-view", ...]}``.

``PROBE_SET`` is Gait3D's: one probe sequence per test id; every other test sequence is gallery (see
:func:`kprpe.eval.gait.gait3d_split`). Ids are strings (``"0000"``): numbers would lose their zero padding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import write_json
from .formats import GaitFormatError

__all__ = ["GaitPartition", "read_partition", "write_partition", "make_partition", "sequence_key"]


def sequence_key(identity: str, seq_type: str, view: str) -> str:
    """A sequence's name in ``PROBE_SET``: ``id-type-view``."""
    return f"{identity}-{seq_type}-{view}"


def _strings(where: str, key: str, value) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GaitFormatError(f"{where}: {key} must be a list of strings (ids keep their zero padding)")
    if len(set(value)) != len(value):
        raise GaitFormatError(f"{where}: {key} lists {len(value) - len(set(value))} entries twice")
    return tuple(value)


@dataclass(frozen=True)
class GaitPartition:
    """Train and test identities, and (Gait3D) the probe sequences of the test ids."""

    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    probe_set: tuple[str, ...] = field(default=())

    @classmethod
    def from_mapping(cls, data: Mapping, where: str = "partition") -> GaitPartition:
        if not isinstance(data, Mapping):
            raise GaitFormatError(f"{where}: expected a JSON object with TRAIN_SET and TEST_SET")
        for key in ("TRAIN_SET", "TEST_SET"):
            if key not in data:
                raise GaitFormatError(f"{where}: missing {key}")
        train = _strings(where, "TRAIN_SET", data["TRAIN_SET"])
        test = _strings(where, "TEST_SET", data["TEST_SET"])
        probe = _strings(where, "PROBE_SET", data.get("PROBE_SET", []))
        overlap = set(train) & set(test)
        if overlap:
            raise GaitFormatError(
                f"{where}: {len(overlap)} ids are in both TRAIN_SET and TEST_SET "
                f"(first: {sorted(overlap)[0]})"
            )
        test_set = set(test)
        stray = [p for p in probe if p.split("-", 1)[0] not in test_set]
        if stray:
            raise GaitFormatError(
                f"{where}: {len(stray)} PROBE_SET entries name no TEST_SET id (first: {stray[0]})"
            )
        return cls(train, test, probe)

    def to_mapping(self) -> dict:
        data = {"TRAIN_SET": list(self.train_ids), "TEST_SET": list(self.test_ids)}
        if self.probe_set:
            data["PROBE_SET"] = list(self.probe_set)
        return data

    def __getitem__(self, key: str):  # so evaluation code can take this or the plain JSON mapping
        return self.to_mapping()[key]

    def get(self, key: str, default=None):
        return self.to_mapping().get(key, default)

    def ids(self, split: str) -> tuple[str, ...]:
        """``train``, ``test`` or ``all`` identities."""
        if split == "train":
            return self.train_ids
        if split == "test":
            return self.test_ids
        if split == "all":
            return self.train_ids + self.test_ids
        raise GaitFormatError(f"split must be 'train', 'test' or 'all', got {split!r}")

    def missing_ids(self, available: Collection[str], split: str = "all") -> list[str]:
        """Ids of ``split`` that have no sequence in ``available`` (OpenGait drops them silently)."""
        present = set(available)
        return [i for i in self.ids(split) if i not in present]


def read_partition(path: str | os.PathLike) -> GaitPartition:
    """Read and validate a partition JSON (errors name the file and the key)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GaitFormatError(f"{path}: cannot read the partition ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GaitFormatError(f"{path}: not valid JSON ({exc})") from None
    return GaitPartition.from_mapping(data, where=str(path))


def write_partition(path: str | os.PathLike, partition: GaitPartition) -> Path:
    """Write the partition JSON atomically."""
    return write_json(path, partition.to_mapping())


def make_partition(
    sequences: Iterable[tuple[str, str, str]], *, test_fraction: float = 0.5, seed: int = 0
) -> GaitPartition:
    """A Gait3D-style partition of ``(id, type, view)`` sequences: a seeded ``test_fraction`` of the ids
    (at least one each side when there are two or more; a single id is train only) are test ids, and one
    seeded sequence per test id is its probe (only ids with two or more sequences can have a gallery match;
    others get no probe)."""
    if not 0.0 < test_fraction < 1.0:
        raise GaitFormatError(f"test fraction must be in (0, 1), got {test_fraction}")
    by_id: dict[str, list[str]] = {}
    for identity, seq_type, view in sequences:
        by_id.setdefault(identity, []).append(sequence_key(identity, seq_type, view))
    ids = sorted(by_id)
    if len(ids) < 2:  # nothing to test on: everything trains
        return GaitPartition(tuple(ids), (), ())
    rng = np.random.default_rng(seed)
    num_test = min(max(1, round(len(ids) * test_fraction)), len(ids) - 1)
    test = sorted(rng.choice(ids, size=num_test, replace=False).tolist())
    test_set = set(test)
    train = [i for i in ids if i not in test_set]
    probes = [sorted(by_id[i])[int(rng.integers(len(by_id[i])))] for i in test if len(by_id[i]) > 1]
    return GaitPartition(tuple(train), tuple(test), tuple(probes))
