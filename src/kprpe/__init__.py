"""kprpe: face recognition with KeyPoint Relative Position Encoding (KP-RPE) vision transformers.

>>> import kprpe
>>> model = kprpe.create_model("vit_small_kprpe")           # fresh weights
>>> model = kprpe.load_official("path/to/model.safetensors")  # official or kprpe-saved weights
>>> emb = model(images, keypoints)                            # raw embedding, (B, 512)
>>> unit, norm = kprpe.normalize_embedding(emb)
"""

from .nn import (
    CheckpointError,
    VisionTransformer,
    ViTConfig,
    create_model,
    list_models,
    load_official,
    load_weights,
    normalize_embedding,
    save_model,
)

__version__ = "0.2.0"

__all__ = [
    "CheckpointError",
    "ViTConfig",
    "VisionTransformer",
    "__version__",
    "create_model",
    "list_models",
    "load_official",
    "load_weights",
    "normalize_embedding",
    "save_model",
]
