"""An ONNX Runtime engine that stands in for the PyTorch model in the face pipeline and evaluation.

``engine(images, keypoints=None)`` takes and returns torch tensors (or numpy arrays) exactly like
``model(images, keypoints)``; it checks shapes before every run so a wrong input gives one clear error instead
of an ONNX Runtime trace. Besides ``__call__`` it has the few attributes the pipeline reads from a model:
``config`` (img_size, in_chans, num_keypoints, output_dim, rel_pos), ``uses_keypoints``, ``device``,
``eval()``, ``to()`` and ``fingerprint`` (SHA-256 of the file).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..errors import KprpeError

__all__ = ["OnnxModelError", "OnnxInputError", "OnnxEngine", "ENGINES", "load_engine"]

ENGINES = ("torch", "onnx")
CONFIG_KEY = "kprpe_config"  # the metadata kprpe export writes; other keys (a third party's) are not read
# keypoints a graph without a 'keypoints' input is said to take: the face pipeline's five points, which such a
# graph never reads (0 would make flip TTA ask for a left/right permutation of no points)
IMAGE_ONLY_KEYPOINTS = 5


class OnnxModelError(KprpeError):
    """The file is not an ONNX model kprpe can run (unreadable, wrong inputs/outputs, missing runtime)."""


class OnnxInputError(KprpeError, ValueError):
    """Inputs that do not fit the exported graph (shape, dtype, keypoints for a model without them)."""


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxModelError(
            f"the onnx engine needs onnxruntime: pip install 'kprpe[onnx]' ({exc})"
        ) from None
    return onnxruntime


def _providers(device: str | torch.device | None, ort) -> list[str]:
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise OnnxModelError(
        f"device {str(device)!r} is not available to onnxruntime here (providers: "
        f"{', '.join(ort.get_available_providers())}); use --device cpu"
    )


class OnnxEngine:
    """Run an exported kprpe ``.onnx`` file with ONNX Runtime (CPU execution provider by default)."""

    training = False

    def __init__(
        self, path: str | os.PathLike, *, threads: int | None = None, device: str | None = None
    ) -> None:
        ort = _import_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError(f"ONNX file not found: {self.path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initialisers etc. are not the user's problem
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.providers = _providers(device, ort)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=self.providers)
        except (
            Exception
        ) as exc:  # onnxruntime raises its own pybind exception types (InvalidProtobuf, Fail, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxModelError(f"{self.path} is not a loadable ONNX model: {first[:300]}") from None
        self.threads = threads or options.intra_op_num_threads or os.cpu_count()
        self.device = torch.device("cpu")  # inputs and outputs live on the CPU whatever the provider
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self._check_signature()
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ description
    def _check_signature(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        listed = ", ".join(f"{i.name}{list(i.shape)}" for i in self.session.get_inputs()) or "none"
        if "images" not in inputs or len(inputs["images"].shape) != 4:
            raise OnnxModelError(
                f"{self.path} is not a kprpe embedding model: expected an input 'images' (B, 3, H, W) and an "
                f"optional 'keypoints' (B, K, 2); it has inputs {listed}"
            )
        extra = sorted(set(inputs) - {"images", "keypoints"})
        if extra:
            raise OnnxModelError(
                f"{self.path} has unexpected inputs {extra} (inputs: {listed}); export it with kprpe"
            )
        if "keypoints" in inputs and (
            len(inputs["keypoints"].shape) != 3 or inputs["keypoints"].shape[2] != 2
        ):
            raise OnnxModelError(
                f"{self.path}: input 'keypoints' must be (B, K, 2), got {inputs['keypoints'].shape}"
            )
        if "embedding" not in outputs:
            raise OnnxModelError(
                f"{self.path} has no output 'embedding' (outputs: {outputs}); export it with kprpe"
            )
        shape = inputs["images"].shape
        kp_shape = inputs["keypoints"].shape if "keypoints" in inputs else None
        out_shape = self.session.get_outputs()[outputs.index("embedding")].shape
        if len(out_shape) != 2:
            raise OnnxModelError(
                f"{self.path}: output 'embedding' must be (B, D), got shape {list(out_shape)}; export it "
                "with kprpe"
            )

        def static(value, name):
            if not isinstance(value, int):
                raise OnnxModelError(f"{self.path}: the {name} of the graph must be fixed, got {value!r}")
            return value

        cfg = self._stored_config()
        self.config = SimpleNamespace(
            **{
                **cfg,
                "in_chans": static(shape[1], "channel count"),
                "img_size": static(shape[2], "image height"),
                "num_keypoints": static(kp_shape[1], "keypoint count")
                if kp_shape
                else cfg.get("num_keypoints") or IMAGE_ONLY_KEYPOINTS,
                "output_dim": static(out_shape[1], "embedding size"),
                "rel_pos": cfg.get("rel_pos", "kprpe" if kp_shape else "none"),
            }
        )
        if shape[3] != shape[2]:
            raise OnnxModelError(
                f"{self.path}: images must be square, the graph expects {shape[2]}x{shape[3]}"
            )
        self.uses_keypoints = kp_shape is not None
        self.precision = str(self.metadata.get("kprpe_precision", "float32"))

    def _stored_config(self) -> dict:
        """The model config kprpe export stored (empty for a third-party graph), its values checked: the
        graph's shapes win over it, but ``num_keypoints`` and ``rel_pos`` are read from it."""
        if CONFIG_KEY not in self.metadata:
            return {}
        try:
            cfg = json.loads(self.metadata[CONFIG_KEY])
        except (json.JSONDecodeError, RecursionError) as exc:
            raise OnnxModelError(f"{self.path}: metadata {CONFIG_KEY} is not JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise OnnxModelError(
                f"{self.path}: metadata {CONFIG_KEY} is a JSON {type(cfg).__name__}, expected an object of "
                "model config fields"
            )
        count = cfg.get("num_keypoints", 0)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 1024:
            raise OnnxModelError(
                f"{self.path}: metadata {CONFIG_KEY} num_keypoints must be a whole number in [0, 1024], "
                f"got {count!r:.60}"
            )
        if not isinstance(cfg.get("rel_pos", ""), str):
            raise OnnxModelError(f"{self.path}: metadata {CONFIG_KEY} rel_pos must be text")
        return {k: v for k, v in cfg.items() if k.isidentifier() and not k.startswith("_")}

    @property
    def output_dim(self) -> int:
        return int(self.config.output_dim)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the ONNX file: ties an index or cache entry to the graph that made it."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            with open(self.path, "rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(chunk)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    # ------------------------------------------------------------------ torch-model look-alike
    def eval(self) -> OnnxEngine:
        return self

    def to(self, device=None, *args, **kwargs) -> OnnxEngine:
        if device is not None and torch.device(device).type != "cpu":
            raise OnnxModelError(
                f"the onnx engine takes CPU tensors; choose the provider with device= at load, "
                f"not .to({device!r})"
            )
        return self

    def __repr__(self) -> str:
        return f"OnnxEngine({str(self.path)!r}, providers={self.providers}, keypoints={self.uses_keypoints})"

    # ------------------------------------------------------------------ running
    def check_inputs(self, images: np.ndarray, keypoints: np.ndarray | None) -> None:
        """Raise :class:`OnnxInputError` naming the expected and the received shape."""
        cfg = self.config
        expected = f"(B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size})"
        if images.ndim != 4 or images.shape[1:] != (cfg.in_chans, cfg.img_size, cfg.img_size):
            raise OnnxInputError(
                f"images must have shape {expected} for {self.path.name}, got {tuple(images.shape)}"
            )
        if images.shape[0] == 0:
            raise OnnxInputError("images is an empty batch (B = 0)")
        if not self.uses_keypoints:
            if keypoints is not None:
                raise OnnxInputError(
                    f"{self.path.name} takes no keypoints (its only input is 'images'); call engine(images)"
                )
            return
        kexp = f"({images.shape[0]}, {cfg.num_keypoints}, 2)"
        if keypoints is None:
            raise OnnxInputError(f"{self.path.name} is a KP-RPE model: it needs keypoints of shape {kexp}")
        if keypoints.shape != (images.shape[0], cfg.num_keypoints, 2):
            raise OnnxInputError(
                f"keypoints must have shape {kexp} to match the images, got {tuple(keypoints.shape)}"
            )
        if not np.isfinite(keypoints).all():
            bad = np.flatnonzero(~np.isfinite(keypoints).reshape(keypoints.shape[0], -1).all(1)).tolist()
            raise OnnxInputError(
                f"keypoints contain NaN or inf (samples {bad}); every keypoint must be a finite (x, y)"
            )

    @staticmethod
    def _array(value, name: str) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            if not value.is_floating_point():
                raise OnnxInputError(f"{name} must be floating point, got dtype {value.dtype}")
            return value.float().numpy()
        value = np.asarray(value)
        if value.dtype.kind != "f":
            raise OnnxInputError(f"{name} must be floating point, got dtype {value.dtype}")
        return np.ascontiguousarray(value, dtype=np.float32)

    def run(self, images, keypoints=None) -> np.ndarray:
        """Raw embeddings ``(B, D)`` float32 as a numpy array."""
        x = self._array(images, "images")
        kp = self._array(keypoints, "keypoints") if keypoints is not None else None
        self.check_inputs(x, kp)
        feed = {"images": x}
        if kp is not None:
            feed["keypoints"] = kp
        return self.session.run(["embedding"], feed)[0]

    def __call__(self, images, keypoints=None) -> torch.Tensor:
        """Raw embeddings ``(B, D)`` as a float32 CPU tensor (the torch model's output convention)."""
        return torch.from_numpy(np.ascontiguousarray(self.run(images, keypoints), dtype=np.float32))


def load_engine(
    path: str | os.PathLike, *, threads: int | None = None, device: str | None = None
) -> OnnxEngine:
    """An :class:`OnnxEngine` for ``path`` (a ``.onnx`` file written by ``kprpe export``)."""
    return OnnxEngine(path, threads=threads, device=device)
