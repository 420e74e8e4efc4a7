"""``kprpe gait pack``: per-frame silhouette PNGs and pose files -> the OpenGait layout, pretreated.

Input: ``silhouettes/<id>/<type>/<view>/*.png`` and, optionally, ``poses/<id>/<type>/<view>/*.{txt,json,csv}``
(Gait3D's ``2D_Silhouettes`` and ``2D_Poses``). A frame's number is the longest run of digits in its file
name (``human_crop_f24551`` -> 24551, ``00001_2d_pose`` -> 1); silhouettes and poses are joined by it, because
the pretreatment drops near-empty frames and so breaks 1:1 order.

Output: ``out/<id>/<type>/<view>/{pose,sils}.pkl`` (``pose`` float32 ``[T, 17, 3]`` in the pixels of the
``sils`` uint8 ``[T, 64, 44]`` frames) and ``out/partition.json``. Each sequence is built in a hidden staging
folder and renamed into place, so an interrupted pack leaves only whole sequences; running it again resumes
(finished sequences are kept and counted).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import check_output_folder
from .dataset import scan_sequences
from .formats import NUM_JOINTS, GaitFormatError, dump_array_pickle
from .partition import GaitPartition, make_partition, read_partition, write_partition
from .pretreatment import MIN_FRAME_MASS, pretreat_frame_and_keypoints

__all__ = [
    "PackReport",
    "frame_number",
    "read_pose_file",
    "pack_sequences",
    "POSE_SUFFIXES",
]

PACK_MARKER = ".kprpe-gait-pack"
POSE_SUFFIXES = (".txt", ".json", ".csv")
_DIGITS = re.compile(r"\d+")


def frame_number(path: Path) -> int:
    """The frame number in a file name: its longest run of digits (the last one on a tie)."""
    runs = _DIGITS.findall(path.stem)
    if not runs:
        raise GaitFormatError(f"{path}: no frame number in the file name")
    longest = max(len(r) for r in runs)
    return int([r for r in runs if len(r) == longest][-1])


def _pose_from_numbers(path: Path, values: list[float]) -> np.ndarray:
    if len(values) == NUM_JOINTS * 3 + 2:  # Gait3D / GREW: two leading numbers, then 17 x (x, y, confidence)
        values = values[2:]
    if len(values) != NUM_JOINTS * 3:
        raise GaitFormatError(
            f"{path}: expected 17 x (x, y, confidence) = 51 numbers (or 53 with two leading ones), got "
            f"{len(values)}"
        )
    return np.asarray(values, dtype=np.float64).reshape(NUM_JOINTS, 3)


def read_pose_file(path: str | os.PathLike) -> np.ndarray:
    """One frame's COCO-17 keypoints ``[17, 3]`` (x, y, confidence in input pixels) from
    ``.txt`` (Gait3D: one comma-separated line of 53 numbers, the first two dropped; 51 also accepted),
    ``.csv`` (17 rows ``x,y,confidence``, an optional header row, or one row of 51/53 numbers) or ``.json``
    (17 triples, 51 numbers, or either under a ``"keypoints"`` key)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GaitFormatError(f"{path}: cannot read the pose file ({exc})") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict):
                if "keypoints" not in data:
                    raise GaitFormatError(f"{path}: a JSON object needs a 'keypoints' key")
                data = data["keypoints"]
            flat = np.asarray(data, dtype=np.float64).reshape(-1).tolist()
            return _pose_from_numbers(path, flat)
        if suffix == ".csv":
            rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
            if rows and not _numeric(rows[0]):
                rows = rows[1:]  # a header row
            return _pose_from_numbers(path, [float(c) for r in rows for c in r if c.strip()])
        values = [float(v) for v in re.split(r"[,\s]+", text.strip()) if v]
        return _pose_from_numbers(path, values)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise GaitFormatError(f"{path}: not a pose file ({type(exc).__name__}: {exc})") from None


def _numeric(row: list[str]) -> bool:
    try:
        [float(c) for c in row if c.strip()]
    except ValueError:
        return False
    return True


@dataclass
class PackReport:
    """What a pack did; every frame and sequence that was not packed is counted with its reason."""

    packed: int = 0
    resumed: int = 0  # sequences finished by an earlier run and kept
    frames: int = 0
    dropped_frames: int = 0  # near-empty silhouettes
    frames_without_pose: int = 0
    invalid_joints: int = 0
    links_left: int = 0  # frame files that are links leaving their root, not read
    skipped: list[tuple[str, str]] = field(default_factory=list)
    partition: GaitPartition | None = None


def _read_silhouette(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise GaitFormatError(f"{path}: not a readable image ({exc})") from None


def _frames_by_number(files: list[Path], what: str) -> dict[int, Path]:
    by_number: dict[int, Path] = {}
    for path in files:
        number = frame_number(path)
        if number in by_number:
            raise GaitFormatError(f"{path}: {what} frame {number} also in {by_number[number].name}")
        by_number[number] = path
    return by_number


def _inside(path: Path, root: Path) -> bool:
    resolved, top = path.resolve(), root.resolve()
    return resolved == top or top in resolved.parents


def _pack_one(
    sil_dir: Path,
    sil_root: Path,
    pose_dir: Path | None,
    pose_root: Path | None,
    width: int,
    report: PackReport,
):
    """The pretreated ``(sils [T, 64, width], pose [T, 17, 3] or None)`` of one sequence (T may be 0)."""
    pngs = [p for p in sil_dir.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")]
    report.links_left += sum(not _inside(p, sil_root) for p in pngs)
    pngs = [p for p in pngs if _inside(p, sil_root)]
    silhouettes = _frames_by_number(pngs, "silhouette")
    poses: dict[int, Path] = {}
    if pose_dir is not None and pose_dir.is_dir():
        files = [
            p for p in pose_dir.iterdir() if p.suffix.lower() in POSE_SUFFIXES and not p.name.startswith(".")
        ]
        report.links_left += sum(not _inside(p, pose_root) for p in files)
        files = [p for p in files if _inside(p, pose_root)]
        poses = _frames_by_number(files, "pose")
    frames, keypoints = [], []
    for number in sorted(silhouettes):
        image = _read_silhouette(silhouettes[number])
        raw = read_pose_file(poses[number]) if number in poses else np.zeros((NUM_JOINTS, 3))
        result = pretreat_frame_and_keypoints(image, raw, width, MIN_FRAME_MASS)
        if result is None:
            report.dropped_frames += 1
            continue
        frame, moved, invalid = result
        frames.append(frame)
        if pose_root is None:
            continue
        if number not in poses:  # the joint cannot be guessed: (0, 0, 0) like an undetected joint
            report.frames_without_pose += 1
        report.invalid_joints += invalid
        keypoints.append(moved)
    if not frames:
        return None, None
    sils = np.stack(frames)
    return sils, (np.stack(keypoints).astype(np.float32) if pose_root is not None else None)


def pack_sequences(
    silhouettes: str | os.PathLike,
    out: str | os.PathLike,
    poses: str | os.PathLike | None = None,
    *,
    width: int = 44,
    partition: str | os.PathLike | None = None,
    allow_missing_ids: bool = False,
    test_fraction: float = 0.5,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> PackReport:
    """Pretreat every sequence under ``silhouettes`` (and its poses) into ``out`` (see the module docstring).

    ``partition``: a partition JSON to validate against the packed ids and copy to ``out/partition.json``
    (ids it names that have no sequence raise :class:`GaitFormatError` unless ``allow_missing_ids``);
    without it a seeded Gait3D-style partition is made (``test_fraction`` of the ids, one probe each).
    """
    sil_root, out = Path(silhouettes), Path(out)
    if partition is None and not 0.0 < test_fraction < 1.0:  # checked now, not after hours of packing
        raise GaitFormatError(f"test fraction must be in (0, 1), got {test_fraction}")
    pose_root = Path(poses) if poses is not None else None
    if pose_root is not None and not pose_root.is_dir():
        raise GaitFormatError(f"pose folder not found: {pose_root}")
    inputs = [sil_root] + ([pose_root] if pose_root is not None else [])
    check_output_folder(out, PACK_MARKER, inputs)
    for item in inputs:
        if _inside(out, item):  # the scan would find the output among the inputs on the next run
            raise GaitFormatError(f"the output folder {out} is inside the input {item}; write it elsewhere")
    scan = scan_sequences(sil_root, suffixes=(".png",))
    report = PackReport(skipped=list(scan.skipped))
    given = read_partition(partition) if partition is not None else None
    if given is not None:
        missing = given.missing_ids({s.identity for s in scan.sequences})
        if missing and not allow_missing_ids:
            raise GaitFormatError(
                f"{partition}: {len(missing)} ids have no silhouette sequence under {sil_root} (first: "
                f"{', '.join(missing[:5])}); pass --allow-missing-ids to pack anyway"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / PACK_MARKER).write_text("written by kprpe gait pack; re-running it resumes\n")
    packed_keys = []
    for number, ref in enumerate(scan.sequences):
        if progress is not None:
            progress(number, len(scan.sequences))
        relative = Path(ref.identity, ref.seq_type, ref.view)
        target = out / relative
        if target.is_dir():
            report.resumed += 1
            packed_keys.append((ref.identity, ref.seq_type, ref.view))
            continue
        pose_dir = pose_root / relative if pose_root is not None else None
        if pose_dir is not None and pose_dir.exists() and not _inside(pose_dir, pose_root):
            report.skipped.append((str(pose_dir), "a link that leaves the pose root"))
            continue
        try:
            sils, pose = _pack_one(ref.path, sil_root, pose_dir, pose_root, width, report)
        except GaitFormatError as exc:  # an unreadable frame or pose file costs its sequence, not the run
            report.skipped.append((str(ref.path), str(exc)))
            continue
        if sils is None:
            report.skipped.append((str(ref.path), "empty after pretreatment (every frame near-empty)"))
            continue
        _write_sequence(target, sils, pose)
        report.packed += 1
        report.frames += sils.shape[0]
        packed_keys.append((ref.identity, ref.seq_type, ref.view))
    if not packed_keys:
        raise GaitFormatError(f"{sil_root}: no sequence could be packed ({len(report.skipped)} skipped)")
    if given is not None:
        report.partition = given
    else:
        report.partition = make_partition(packed_keys, test_fraction=test_fraction, seed=seed)
    write_partition(out / "partition.json", report.partition)
    return report


def _write_sequence(target: Path, sils: np.ndarray, pose: np.ndarray | None) -> None:
    """Write a sequence folder whole or not at all: build it hidden beside ``target``, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        if pose is not None:
            dump_array_pickle(staging / "pose.pkl", pose)
        dump_array_pickle(staging / "sils.pkl", sils)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700 folders
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
