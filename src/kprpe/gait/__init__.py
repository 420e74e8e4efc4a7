"""Gait data: the OpenGait layout (read with a numpy-only unpickler), partitions, a training dataset, the
published silhouette pretreatment with keypoints moved alongside (``kprpe gait pack``) and synthetic walkers
(``kprpe gait make-synthetic``). Evaluation is :mod:`kprpe.eval.gait`; see docs/gait.md."""

from __future__ import annotations

from .dataset import (
    AllOrderedFrames,
    FixedOrderedFrames,
    GaitDataset,
    ScanResult,
    SequenceRef,
    pk_batches,
    scan_sequences,
)
from .formats import (
    NUM_JOINTS,
    GaitFormatError,
    NumpyUnpickler,
    UnsafePickleError,
    check_pose,
    dump_array_pickle,
    is_pose,
    load_array_pickle,
    load_sequence,
)
from .partition import GaitPartition, make_partition, read_partition, sequence_key, write_partition
from .pretreatment import FrameTransform, apply_to_keypoints, frame_transform, pretreat_frame

__all__ = [
    "AllOrderedFrames",
    "FixedOrderedFrames",
    "FrameTransform",
    "GaitDataset",
    "GaitFormatError",
    "GaitPartition",
    "NUM_JOINTS",
    "NumpyUnpickler",
    "ScanResult",
    "SequenceRef",
    "UnsafePickleError",
    "apply_to_keypoints",
    "check_pose",
    "dump_array_pickle",
    "frame_transform",
    "is_pose",
    "load_array_pickle",
    "load_sequence",
    "make_partition",
    "pk_batches",
    "pretreat_frame",
    "read_partition",
    "scan_sequences",
    "sequence_key",
    "write_partition",
]
