"""Embedding aligned face crops with a kprpe model: batching, flip test-time augmentation, and the
fingerprint that ties stored embeddings to the weights that made them.

>>> embedder = FaceEmbedder.from_weights("model.safetensors")  # anything kprpe.load_official accepts
>>> unit, norms = embedder.embed_faces(FacePipeline().faces_in_file("photo.jpg"))
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import torch

from ..inference import embed, to_model_input
from ..keypoints import ARCFACE_TEMPLATE_112, FACE_FLIP_PERMUTATION
from .align import CROP_SIZE, AlignedFace

__all__ = ["FaceEmbedder", "model_fingerprint"]


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state dict (names, shapes, bytes): ties an index to the weights that made
    it."""
    if getattr(model, "fingerprint", None) is not None:  # an ONNX engine: the file's hash
        return model.fingerprint
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class FaceEmbedder:
    """KP-RPE (or any kprpe) model + flip test-time augmentation over crops from :class:`FacePipeline`.

    Flip TTA sums the raw embeddings of a crop and its mirror (keypoints mirrored, 0<->1 and 3<->4 swapped)
    before L2-normalising; the norm of the summed embedding is returned alongside (a quality signal).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        flip: bool = True,
        batch_size: int = 64,
        device: str | None = None,
        flip_permutation: Sequence[int] | None = None,
    ) -> None:
        config = getattr(model, "config", None)
        if getattr(config, "img_size", CROP_SIZE) != CROP_SIZE:
            raise ValueError(f"the face pipeline makes {CROP_SIZE}x{CROP_SIZE} crops but the model expects "
                             f"{config.img_size}")
        # how many keypoints a crop must come with: what the model was built for (5 ArcFace points by default)
        self.num_keypoints = int(getattr(config, "num_keypoints", len(ARCFACE_TEMPLATE_112)))
        if flip_permutation is None and self.num_keypoints == len(FACE_FLIP_PERMUTATION):
            flip_permutation = FACE_FLIP_PERMUTATION
        if flip and flip_permutation is None:
            raise ValueError(f"flip test-time augmentation with {self.num_keypoints} keypoints needs the "
                             "flip_permutation that swaps their left/right points (or flip=False)")
        self.flip_permutation = flip_permutation
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if device is None:  # where the model lives (an ONNX engine says so itself; it has no parameters)
            device = getattr(model, "device", None) or next(model.parameters()).device
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.flip = flip
        self.batch_size = batch_size
        self._fingerprint: str | None = None

    @classmethod
    def from_weights(cls, weights: str | os.PathLike | None = None, **kwargs) -> FaceEmbedder:
        """Load any checkpoint :func:`kprpe.load_official` accepts (file, published directory, repo id);
        None: the published KP-RPE ViT-Base (:data:`kprpe.zoo.DEFAULT_WEIGHTS`)."""
        from ..nn import load_official

        return cls(load_official(weights), **kwargs)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @property
    def output_dim(self) -> int:
        return int(getattr(getattr(self.model, "config", None), "output_dim", 0))

    def embed_crops(self, crops: np.ndarray, keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 crops ``(N, 112, 112, 3)`` + normalised keypoints ``(N, K, 2)`` (``K`` = the model's
        ``num_keypoints``) -> unit ``(N, D)``, norms ``(N,)``."""
        crops = np.asarray(crops)
        keypoints = np.asarray(keypoints, dtype=np.float32)
        if crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3) or crops.dtype != np.uint8:
            raise ValueError(
                f"crops must be uint8 (N, {CROP_SIZE}, {CROP_SIZE}, 3), got {crops.dtype} {crops.shape}"
            )
        expected = (crops.shape[0], self.num_keypoints, 2)
        if keypoints.shape != expected:
            raise ValueError(f"keypoints must have shape {expected} (the model takes {self.num_keypoints} "
                             f"keypoints), got {keypoints.shape}")
        if crops.shape[0] == 0:
            return np.zeros((0, self.output_dim), np.float32), np.zeros((0,), np.float32)
        unit, norms = embed(
            self.model,
            to_model_input(crops),
            torch.from_numpy(keypoints),
            flip=self.flip,
            batch_size=self.batch_size,
            device=self.device,
            flip_permutation=self.flip_permutation,
        )
        return unit.numpy().astype(np.float32), norms.numpy().astype(np.float32)

    def embed_faces(self, faces: Sequence[AlignedFace]) -> tuple[np.ndarray, np.ndarray]:
        """Embed crops made by :class:`FacePipeline` (batched). A face that carries float ``pixels`` (the
        DFA's own crop) is embedded from them exactly; the others from their uint8 ``image``."""
        if not faces:
            empty = np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)
            return self.embed_crops(empty, np.zeros((0, self.num_keypoints, 2), np.float32))
        keypoints = np.stack([face.keypoints for face in faces]).astype(np.float32)
        if all(face.pixels is None for face in faces):
            return self.embed_crops(np.stack([face.image for face in faces]), keypoints)
        expected = (len(faces), self.num_keypoints, 2)
        if keypoints.shape != expected:
            raise ValueError(f"keypoints must have shape {expected} (the model takes {self.num_keypoints} "
                             f"keypoints), got {keypoints.shape}")
        images = torch.stack(
            [
                torch.from_numpy(np.ascontiguousarray(face.pixels, dtype=np.float32))
                if face.pixels is not None
                else to_model_input(face.image[None])[0]
                for face in faces
            ]
        )
        unit, norms = embed(
            self.model,
            images,
            torch.from_numpy(keypoints),
            flip=self.flip,
            batch_size=self.batch_size,
            device=self.device,
            flip_permutation=self.flip_permutation,
        )
        return unit.numpy().astype(np.float32), norms.numpy().astype(np.float32)
