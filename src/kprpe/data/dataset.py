"""Training data: insightface RecordIO or an image folder, plus an optional landmark file, as one dataset.

A *source* lists samples and returns ``(encoded image bytes, label)`` for a sample index. :class:`FaceDataset`
decodes, looks up the keypoints, augments (seeded per sample) and returns model-ready tensors. Damaged samples
are never dropped silently: with ``on_error="raise"`` the first one stops training with its index; with
``"replace"`` the sample is returned flagged ``valid=False`` (black image, excluded from the loss) and the
loop counts and logs every such index.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import KprpeError
from ..images import ImageLoadError, decode_image
from ..keypoints import ARCFACE_TEMPLATE_112
from ..landmarks import read_landmarks
from .recordio import RecordIOError, RecordIOReader, index_path_for
from .transforms import AugmentConfig, FaceAugment, image_to_tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "RecordSource",
    "FolderSource",
    "open_source",
    "FaceDataset",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(KprpeError, ValueError):
    """A sample or data set that cannot be used; the message names the file and sample index."""


class RecordSource:
    """Images of an insightface RecordIO data set, indexed 0..N-1 in key order.

    When record 0 is a header (flag > 0), image keys are ``1 .. label[0] - 1`` and ``label[1] - label[0]`` is
    the number of identities; otherwise every key is an image record.
    """

    def __init__(self, rec_path: str | os.PathLike) -> None:
        self.path = Path(rec_path)
        self.reader = RecordIOReader(self.path, index_path_for(self.path))
        keys = self.reader.keys
        self.declared_num_classes: int | None = None
        if not keys:
            raise DataError(f"{self.path}: the index lists no records")
        first = keys[0]
        try:
            header, _ = self.reader.read_record(first)
        except RecordIOError as exc:
            raise DataError(f"{self.path}: cannot read the first record: {exc}") from exc
        if first == 0 and header.flag > 0:
            label = header.label
            if not all(math.isfinite(v) and v == int(v) and 0 <= v < 2**53 for v in label[:2]):
                raise DataError(f"{self.path}: header record 0 holds {label[:2]}; expected whole key numbers")
            end_image = int(label[0])
            self.image_keys = [k for k in keys if 0 < k < end_image]
            if len(label) >= 2 and label[1] > label[0]:
                declared = int(label[1] - label[0])
                # insightface stores one identity record per class after the images: a header that claims more
                # classes than the index has records is damaged (and would size the classifier from garbage).
                identity_records = sum(1 for k in keys if k >= end_image)
                if declared > identity_records:
                    raise DataError(
                        f"{self.path}: header record 0 declares {declared} identities (keys {int(label[0])}.."
                        f"{int(label[1]) - 1}) but the index has only {identity_records} records after the "
                        "images; "
                        "the header is damaged (set data.num_classes to override)"
                    )
                self.declared_num_classes = declared
        else:
            self.image_keys = list(keys)
        if not self.image_keys:
            raise DataError(
                f"{self.path}: no image records (header record 0 says images end at key {header.label})"
            )

    def __len__(self) -> int:
        return len(self.image_keys)

    def describe(self, index: int) -> str:
        return f"{self.path} sample {index} (record key {self.image_keys[index]})"

    def get(self, index: int) -> tuple[bytes, int]:
        key = self.image_keys[index]
        try:
            header, data = self.reader.read_record(key)
        except RecordIOError as exc:
            raise DataError(f"sample {index}: {exc}") from exc
        return data, self._label_of(index, header)

    def label(self, index: int) -> int:
        try:
            header = self.reader.read_header(self.image_keys[index])
        except RecordIOError as exc:
            raise DataError(f"sample {index}: {exc}") from exc
        return self._label_of(index, header)

    def _label_of(self, index: int, header) -> int:
        """The record's class label as an int; NaN, infinite or fractional labels make the sample bad."""
        label = header.label[0] if isinstance(header.label, tuple) else header.label
        if not math.isfinite(label) or label != int(label) or abs(label) >= 2**31:
            raise DataError(f"{self.describe(index)}: label {label!r} is not a whole class number")
        return int(label)


class FolderSource:
    """Images in ``root/<identity>/<image>``: identities are the sorted sub-folder names (label = position),
    samples the sorted image files (extensions :data:`IMAGE_EXTENSIONS`, case-insensitive)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.path = Path(root)
        if not self.path.is_dir():
            raise DataError(f"image folder not found: {self.path}")
        self.identities = sorted(
            p.name for p in self.path.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        self.files: list[str] = []
        self.labels: list[int] = []
        self.ignored: list[str] = []
        for label, identity in enumerate(self.identities):
            for p in sorted((self.path / identity).iterdir()):
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                    self.files.append(f"{identity}/{p.name}")
                    self.labels.append(label)
                elif not p.name.startswith("."):
                    self.ignored.append(f"{identity}/{p.name}")
        if not self.files:
            raise DataError(
                f"{self.path}: no images found; expected <identity>/<image> with extensions "
                f"{', '.join(IMAGE_EXTENSIONS)}"
            )
        self.declared_num_classes = len(self.identities)

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return f"{self.path / self.files[index]} (sample {index})"

    def get(self, index: int) -> tuple[bytes, int]:
        path = self.path / self.files[index]
        try:
            return path.read_bytes(), self.labels[index]
        except OSError as exc:
            raise DataError(f"sample {index}: cannot read {path}: {exc}") from exc

    def label(self, index: int) -> int:
        return self.labels[index]


def open_source(path: str | os.PathLike) -> RecordSource | FolderSource:
    """A ``.rec`` file (with its ``.idx``) or an image folder."""
    path = Path(path)
    if path.suffix == ".rec" or (path.is_file() and index_path_for(path).is_file()):
        return RecordSource(path)
    if path.is_dir():
        rec = path / "train.rec"
        if rec.is_file():
            return RecordSource(rec)
        return FolderSource(path)
    raise DataError(
        f"training data not found: {path} (expected a .rec file with its .idx, or a folder of "
        "<identity>/<image>)"
    )


class FaceDataset(Dataset):
    """``dataset[i]`` or ``dataset[(i, seed)]`` -> dict with ``image`` (3, S, S) in [-1, 1], ``keypoints``
    (K, 2) normalised, ``label``, ``index`` and ``valid``.

    The ``(index, seed)`` form augments with ``numpy.random.default_rng(seed)`` (the training sampler passes
    it); a bare index is not augmented. Without a landmark file every sample gets the ArcFace template
    (right for aligned data sets such as WebFace4M). ``missing_landmarks``: ``"error"`` refuses a landmark
    file that lacks samples, ``"template"`` uses the template for them (the count is in
    :attr:`num_missing_landmarks`).
    """

    def __init__(
        self,
        source: RecordSource | FolderSource | str | os.PathLike,
        *,
        image_size: int = 112,
        landmarks: str | os.PathLike | None = None,
        augment: AugmentConfig | None = None,
        num_classes: int | None = None,
        num_keypoints: int = 5,
        missing_landmarks: str = "error",
        on_error: str = "raise",
    ) -> None:
        self.source = source if isinstance(source, (RecordSource, FolderSource)) else open_source(source)
        if on_error not in ("raise", "replace"):
            raise ValueError(f"on_error must be 'raise' or 'replace', got {on_error!r}")
        if missing_landmarks not in ("error", "template"):
            raise ValueError(f"missing_landmarks must be 'error' or 'template', got {missing_landmarks!r}")
        self.on_error = on_error
        self.image_size = int(image_size)
        self.num_keypoints = num_keypoints
        self.augment = FaceAugment(augment or AugmentConfig(), self.image_size)
        self.eval_transform = FaceAugment(AugmentConfig.disabled(), self.image_size)
        self.num_classes = num_classes or self.source.declared_num_classes
        if not self.num_classes:
            raise DataError(
                f"{self.source.path}: the number of identities is not recorded in the data; set "
                "data.num_classes"
            )
        n = len(self.source)
        self.num_missing_landmarks = 0
        if landmarks is not None:
            kps = read_landmarks(landmarks, num_samples=n, num_keypoints=num_keypoints)
            missing = np.flatnonzero(~np.isfinite(kps).all(axis=(1, 2)))
            self.num_missing_landmarks = int(missing.size)
            if missing.size and missing_landmarks == "error":
                shown = ", ".join(str(i) for i in missing[:10])
                raise DataError(
                    f"{landmarks}: {missing.size} of {n} samples have no landmarks (first: {shown}); add "
                    "them, or set "
                    f"data.missing_landmarks=template to use the ArcFace template for those samples"
                )
            if missing.size:
                kps[missing] = self._template()
            self.keypoints = kps
        else:
            if num_keypoints != 5:
                raise DataError(
                    "without a landmark file the ArcFace 5-point template is used, but "
                    f"num_keypoints={num_keypoints}"
                )
            self.keypoints = None

    def _template(self) -> np.ndarray:
        return (ARCFACE_TEMPLATE_112 / 112.0).astype(np.float32)

    def __len__(self) -> int:
        return len(self.source)

    def sample_keypoints(self, index: int) -> np.ndarray:
        return self.keypoints[index] if self.keypoints is not None else self._template()

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """Decoded RGB image and label of sample ``index``, checked; raises :class:`DataError`."""
        data, label = self.source.get(index)
        try:
            image = decode_image(data, self.source.describe(index))
        except ImageLoadError as exc:
            raise DataError(str(exc)) from None
        if not 0 <= label < self.num_classes:
            raise DataError(
                f"{self.source.describe(index)}: label {label} outside 0..{self.num_classes - 1} "
                "(num_classes)"
            )
        return image, label

    def __getitem__(self, item) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, None)
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range 0..{len(self) - 1}")
        try:
            image, label = self.load(index)
        except DataError:
            if self.on_error == "raise":
                raise
            size = self.image_size
            return dict(
                image=torch.zeros(3, size, size),
                keypoints=torch.from_numpy(self._template()),
                label=torch.tensor(0, dtype=torch.long),
                index=torch.tensor(index, dtype=torch.long),
                valid=torch.tensor(False),
            )
        rng = np.random.default_rng(seed) if seed is not None else None
        transform = self.augment if rng is not None else self.eval_transform
        image, kp = transform(image, self.sample_keypoints(index), rng)
        return dict(
            image=image_to_tensor(image),
            keypoints=torch.from_numpy(kp),
            label=torch.tensor(label, dtype=torch.long),
            index=torch.tensor(index, dtype=torch.long),
            valid=torch.tensor(True),
        )
