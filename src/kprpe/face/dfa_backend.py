"""The DFA face backend: the official Differentiable Face Aligner (:mod:`kprpe.face.dfa`) behind the
:class:`~kprpe.face.detector.FaceDetector` interface, beside dlib.

Every published KP-RPE weight was trained and evaluated on the DFA's crops and keypoints, so ``--aligner dfa``
reproduces the official pipeline: photo -> RGB in [-1, 1] -> DFA -> ``(aligned_x, aligned_ldmks)`` -> model.
In ``aligned`` mode the DFA's own crop is used as is (float, never re-warped or rounded); the photo-pixel
keypoints and box are also reported, for ``unaligned`` crops, drawing and landmark files.

The DFA never "finds no face": it returns its best guess for the one face it assumes, with ``score`` (the
face probability of the aggregated prediction). ``min_score`` turns a low score into :class:`NoFaceFound`.
Photos of one shape are aligned in one batch (the DFA takes one input shape per call).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import KprpeError
from ..zoo.catalog import DEFAULT_ALIGNER_WEIGHTS  # the published aligner's repo id; any path works too
from .detector import FaceDetection, FaceDetector, NoFaceFound

__all__ = [
    "DEFAULT_ALIGNER_WEIGHTS",
    "AlignerLoadError",
    "DfaAligner",
    "DfaResult",
    "load_aligner",
    "load_dfa_backend",
    "photo_to_input",
]



def load_aligner(
    name_or_path: str | os.PathLike = DEFAULT_ALIGNER_WEIGHTS, *, device: str | torch.device = "cpu"
):
    """The official DFA aligner from a checkpoint file or folder, or a Hugging Face repo id
    (``minchul/cvlface_DFA_mobilenet``, resolved through :func:`kprpe.zoo.resolve`: weights and configs only,
    sha256-checked), in eval mode on ``device``."""
    from ..zoo import resolve
    from .dfa import load_aligner as load_aligner_folder

    return load_aligner_folder(resolve(name_or_path, kind="aligner"), device=device)


class AlignerLoadError(KprpeError, ValueError):
    """The DFA aligner cannot be used: missing or bad checkpoint, unusable device, score out of range."""


def load_dfa_backend(
    weights: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    min_score: float | None = None,
    batch_size: int = 16,
) -> DfaAligner:
    """:class:`DfaAligner` for a command, a service or an evaluation: every way loading can fail is one
    :class:`AlignerLoadError` line naming the weights or the device (the one place these messages live)."""
    from ..zoo import ZooError
    from .dfa import AlignerCheckpointError

    weights = weights or DEFAULT_ALIGNER_WEIGHTS
    if min_score is not None and not 0.0 <= float(min_score) <= 1.0:
        raise AlignerLoadError(
            f"--min-score must be in [0, 1] (a face probability), got {float(min_score):g}"
        )
    try:
        return DfaAligner(weights, device=device, min_score=min_score, batch_size=batch_size)
    except (ZooError, AlignerCheckpointError) as exc:
        raise AlignerLoadError(f"cannot load the DFA aligner {weights}: {exc}") from None
    except (RuntimeError, AssertionError) as exc:  # torch: unknown device, CUDA not available
        raise AlignerLoadError(f"cannot use device {str(device)!r} for the DFA aligner: {exc}") from None


def photo_to_input(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 RGB photos of one shape ``(H, W, 3)`` -> ``(B, 3, H, W)`` float in [-1, 1], the DFA's input
    (``(pixel / 255 - 0.5) / 0.5``, as the official ``ToTensor`` + ``Normalize(0.5, 0.5)``)."""
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2)
    return batch.float().div(255).sub(0.5).div(0.5)


@dataclass
class DfaResult:
    """The DFA's answer for one photo. ``crop``: ``(3, 112, 112)`` float32 RGB in [-1, 1] (``aligned_x``);
    ``crop_keypoints``: ``(5, 2)`` in the crop / 112 (``aligned_ldmks``); ``keypoints``: ``(5, 2)`` photo
    pixels; ``frame_keypoints``: the official ``orig_pred_ldmks`` (None for non-square photos); ``box``:
    photo pixels, continuous coordinates; ``score``: face probability."""

    crop: np.ndarray
    crop_keypoints: np.ndarray
    keypoints: np.ndarray
    frame_keypoints: np.ndarray | None
    box: tuple[float, float, float, float]
    score: float


def _frame_to_photo(values: torch.Tensor, height: int, width: int, padding: float) -> torch.Tensor:
    """Points normalised by the 160 network frame -> photo pixels (the inverse of the DFA's preprocessing:
    ``align_corners=True`` resize of the padded square, then the padding removed), ``(B, N, 2)``."""
    from .dfa.aligner import square_pad
    from .dfa.retinaface import INPUT_SIZE

    left, top, margin = square_pad(height, width, padding)
    side = max(height, width) + 2 * margin
    pixels = values.to(torch.float64) * INPUT_SIZE * (side - 1) / (INPUT_SIZE - 1)
    return pixels - torch.tensor([left + margin, top + margin], dtype=torch.float64)


class DfaAligner(FaceDetector):
    """The official DFA as a face backend (one face per photo, the one the DFA assumes is there).

    ``weights``: path or repo id (default :data:`DEFAULT_ALIGNER_WEIGHTS`), or pass a loaded ``aligner``.
    ``device``: where the DFA runs (cpu, cuda, ...). ``min_score``: reject photos whose DFA score is lower
    (None: never reject). ``padding_ratio``: the official ``padding_ratio_override`` (None: the checkpoint's
    own). ``batch_size``: photos of one shape aligned per forward pass.
    """

    name = "dfa"

    def __init__(
        self,
        weights: str | os.PathLike = DEFAULT_ALIGNER_WEIGHTS,
        *,
        device: str | torch.device = "cpu",
        min_score: float | None = None,
        padding_ratio: float | None = None,
        batch_size: int = 16,
        aligner=None,
    ) -> None:
        if min_score is not None and not 0.0 <= float(min_score) <= 1.0:
            raise ValueError(f"min aligner score must be in [0, 1] (a probability), got {min_score}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.weights = str(weights)
        self.aligner = aligner if aligner is not None else load_aligner(weights, device=device)
        self.device = torch.device(device) if aligner is None else next(self.aligner.parameters()).device
        self.min_score = None if min_score is None else float(min_score)
        self.padding_ratio = padding_ratio
        self.batch_size = int(batch_size)

    def describe(self) -> dict:
        return {
            "backend": "dfa",
            "weights": self.weights,
            "min_score": self.min_score,
            "padding_ratio": self._padding(),
        }

    def _padding(self) -> float:
        if self.padding_ratio is not None:
            return float(self.padding_ratio)
        return float(self.aligner.input_padding_ratio)

    # ------------------------------------------------------------------------------------------ running
    def align(self, images: Sequence[np.ndarray]) -> list[DfaResult]:
        """The DFA on uint8 RGB photos (any sizes; photos of one shape share a forward pass)."""
        results: list[DfaResult | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(tuple(_check_photo(image).shape), []).append(index)
        for shape, indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for index, result in zip(chunk, self._run([images[i] for i in chunk], shape), strict=True):
                    results[index] = result
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _run(self, images: Sequence[np.ndarray], shape: tuple[int, ...]) -> list[DfaResult]:
        from .dfa import input_landmarks

        height, width = shape[:2]
        padding = self._padding()
        x = photo_to_input(images).to(self.device)
        output, inter = self.aligner.trace(x, padding_ratio_override=self.padding_ratio)
        keypoints = input_landmarks(output, height, width, padding).cpu()
        corners = inter["agg"][:, 0:4].reshape(-1, 2, 2).detach().cpu()  # (x0, y0), (x1, y1) / 160
        boxes = _frame_to_photo(corners, height, width, padding).reshape(-1, 4)
        frame = output.orig_pred_ldmks
        results = []
        for i in range(x.shape[0]):
            results.append(
                DfaResult(
                    crop=output.aligned_x[i].float().cpu().numpy(),
                    crop_keypoints=output.aligned_ldmks[i].double().cpu().numpy(),
                    keypoints=keypoints[i].numpy(),
                    frame_keypoints=None if frame is None else frame[i].double().cpu().numpy(),
                    box=tuple(float(v) for v in boxes[i]),
                    score=float(output.score[i, 0]),
                )
            )
        return results

    def _detection(self, result: DfaResult) -> FaceDetection:
        if self.min_score is not None and result.score < self.min_score:
            raise NoFaceFound(
                f"the DFA aligner's face score {result.score:.3f} is below --min-score "
                f"{self.min_score:g} (the DFA always returns its best guess; a low score means no clear face)"
            )
        return FaceDetection(
            box=result.box,
            keypoints=result.keypoints,
            score=result.score,
            landmarks=result.keypoints.copy(),
            aligned=(result.crop, result.crop_keypoints),
        )

    # --------------------------------------------------------------------------------- FaceDetector
    def detect(self, image: np.ndarray, *, source=None) -> list[FaceDetection]:
        return [self._detection(self.align([image])[0])]

    def detect_batch(self, images: Sequence[np.ndarray], *, sources=None) -> list:
        out: list = []
        for result in self.align(images):
            try:
                out.append([self._detection(result)])
            except NoFaceFound as exc:
                out.append(exc)
        return out

    def landmarks_in_box(self, image: np.ndarray, box: Sequence[float], *, source=None) -> FaceDetection:
        """The DFA on the whole image (it needs no box); for a square image (a pre-aligned crop) the
        keypoints are the official ``orig_pred_ldmks`` times the side, so dividing by the side gives the
        official numbers (they differ from the pixel-centre mapping by at most 0.3% of the side)."""
        result = self.align([image])[0]
        detection = self._detection(result)
        height, width = image.shape[:2]
        if result.frame_keypoints is not None and self._padding() == 0:
            detection.keypoints = result.frame_keypoints * np.array([width, height], dtype=np.float64)
        return detection


def _check_photo(image) -> np.ndarray:
    if (
        not isinstance(image, np.ndarray)
        or image.ndim != 3
        or image.shape[2] != 3
        or image.dtype != np.uint8
        or min(image.shape[:2]) < 2
    ):
        raise ValueError(
            "the DFA aligner expects (H>=2, W>=2, 3) uint8 RGB photos, "
            f"got {getattr(image, 'shape', type(image))}"
        )
    return image
