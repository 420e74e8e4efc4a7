"""Turn an image folder into an insightface RecordIO data set, and compute a data set's landmark file."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..images import ImageLoadError, decode_image
from ..landmarks import write_landmarks
from .dataset import DataError, FolderSource, RecordSource, open_source
from .recordio import RecordHeader, RecordIOWriter, pack_record

__all__ = ["PackReport", "pack_folder", "LandmarkReport", "compute_landmarks"]


@dataclass
class PackReport:
    rec_path: Path
    num_images: int = 0
    num_identities: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    ignored: list[str] = field(default_factory=list)  # non-image files


def pack_folder(
    folder: str | os.PathLike,
    rec_path: str | os.PathLike,
    *,
    resize: int | None = None,
    quality: int = 95,
    progress: bool = True,
) -> PackReport:
    """Write ``folder/<identity>/<image>`` to ``rec_path`` (+ ``.idx``) in the insightface layout.

    Record 0 is a header with ``label = (N + 1, N + 1 + C)``; images are keys ``1..N`` (label = identity
    index, sorted folder order); keys ``N+1..N+C`` hold each identity's ``(first key, end key)``. Every image
    is
    decoded first: unreadable ones are left out and listed in the report, never silently. With ``resize`` the
    images are re-encoded as ``resize x resize`` JPEGs, otherwise the original bytes are stored.
    """
    source = FolderSource(folder)
    report = PackReport(Path(rec_path), ignored=list(source.ignored), num_identities=len(source.identities))
    c = len(source.identities)
    ranges = np.full((c, 2), -1, dtype=np.int64)
    n = 0
    # Records are streamed to the writer (memory stays at one image); the header record 0 needs the final
    # count, so it is written first as a same-sized placeholder and filled in at the end (it keeps offset 0).
    with RecordIOWriter(rec_path) as writer:
        writer.write(0, pack_record(RecordHeader(2, (0.0, 0.0))))
        for index in tqdm(range(len(source)), desc="packing images", unit="img", disable=not progress):
            try:
                data, label = source.get(index)
                image = decode_image(data, source.describe(index))
            except (DataError, ImageLoadError) as exc:
                report.failures.append((source.files[index], str(exc)))
                continue
            if resize is not None:
                if image.shape[:2] != (resize, resize):
                    interp = cv2.INTER_AREA if image.shape[0] > resize else cv2.INTER_LINEAR
                    image = cv2.resize(image, (resize, resize), interpolation=interp)
                ok, buf = cv2.imencode(
                    ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
                )
                if not ok:
                    report.failures.append((source.files[index], "JPEG encoding failed"))
                    continue
                data = buf.tobytes()
            n += 1
            writer.write(n, pack_record(RecordHeader(0, float(label)), data))
            if ranges[label, 0] < 0:
                ranges[label, 0] = n
            ranges[label, 1] = n + 1
        if n == 0:
            raise DataError(f"{folder}: none of the {len(source)} images could be read; nothing written")
        for label in range(c):
            start, end = (int(v) for v in ranges[label]) if ranges[label, 0] >= 0 else (0, 0)
            writer.write(n + 1 + label, pack_record(RecordHeader(2, (float(start), float(end)))))
        writer.rewrite(0, pack_record(RecordHeader(2, (float(n + 1), float(n + 1 + c)))))
    report.num_images = n
    return report


@dataclass
class LandmarkReport:
    csv_path: Path
    num_samples: int = 0
    num_found: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)  # (sample index, reason)


def compute_landmarks(
    data: str | os.PathLike | RecordSource | FolderSource,
    csv_path: str | os.PathLike,
    detect: Callable[[np.ndarray], np.ndarray | None],
    *,
    progress: bool = True,
    limit: int | None = None,
) -> LandmarkReport:
    """Run ``detect(rgb uint8 image) -> (5, 2) normalised keypoints or None`` on every sample and write the
    landmark CSV. Samples that cannot be decoded or where no face is found are listed in the report (and have
    no row in the file)."""
    source = data if isinstance(data, (RecordSource, FolderSource)) else open_source(data)
    n = len(source) if limit is None else min(limit, len(source))
    report = LandmarkReport(Path(csv_path), num_samples=n)
    keypoints = np.full((n, 5, 2), np.nan)
    # a backend that runs a network (the DFA) offers detect.batch(images) -> [keypoints | None | Exception]
    batch = getattr(detect, "batch", None)
    step = 64 if batch is not None else 1
    bar = tqdm(total=n, desc="landmarks", unit="img", disable=not progress)
    for start in range(0, n, step):
        decoded: dict[int, np.ndarray] = {}
        for index in range(start, min(start + step, n)):
            try:
                decoded[index] = decode_image(source.get(index)[0], source.describe(index))
            except (DataError, ImageLoadError) as exc:
                report.failures.append((index, str(exc)))
        if batch is not None and decoded:
            try:
                answers = dict(zip(decoded, batch(list(decoded.values())), strict=True))
            except Exception as exc:  # the whole batch failed: say so for each of its images
                answers = dict.fromkeys(decoded, exc)
        else:
            answers = {}
            for index, image in decoded.items():
                try:
                    answers[index] = detect(image)
                except Exception as exc:  # a backend failure on one image must not lose the others
                    answers[index] = exc
        for index, kp in answers.items():
            if isinstance(kp, Exception):
                report.failures.append((index, f"landmark backend failed: {type(kp).__name__}: {kp}"))
                continue
            if kp is None:
                report.failures.append((index, "no face found"))
                continue
            kp = np.asarray(kp, dtype=np.float64)
            if kp.shape != (5, 2) or not np.isfinite(kp).all():
                report.failures.append(
                    (index, f"backend returned keypoints of shape {kp.shape} / non-finite values")
                )
                continue
            keypoints[index] = kp
        bar.update(min(start + step, n) - start)
    bar.close()
    report.failures.sort(key=lambda failure: failure[0])
    write_landmarks(csv_path, np.arange(n), keypoints)
    report.num_found = n - len(report.failures)
    return report
