"""kprpe: face recognition with KeyPoint Relative Position Encoding (KP-RPE) vision transformers.

>>> import kprpe
>>> model = kprpe.create_model("vit_small_kprpe")           # fresh weights
>>> model = kprpe.load_official("path/to/model.safetensors")  # official or kprpe-saved weights
>>> emb = model(images, keypoints)                            # raw embedding, (B, 512)
>>> unit, norm = kprpe.normalize_embedding(emb)
>>> aligner = kprpe.load_aligner("minchul/cvlface_DFA_mobilenet")  # the official DFA (path or repo id)

The names below are imported on first use: ``import kprpe`` (or ``kprpe.errors``, or ``kprpe --help``) does
not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import alias_moved_modules, lazy_exports

__version__ = "0.4.2"

# public name -> the module that defines it, imported the first time the name is read
_EXPORTS = {
    "CheckpointError": ".nn",
    "VisionTransformer": ".nn",
    "ViTConfig": ".nn",
    "create_model": ".nn",
    "list_models": ".nn",
    "load_official": ".nn",
    "load_weights": ".nn",
    "normalize_embedding": ".nn",
    "save_model": ".nn",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

# documented module paths that moved when streaming and the gallery left kprpe.face (0.3): still importable,
# with a DeprecationWarning
alias_moved_modules(
    {
        "kprpe.face.index": "kprpe.gallery.index",
        "kprpe.face.stream": "kprpe.streaming.stream",
        "kprpe.face.video": "kprpe.streaming.video",
        "kprpe.face.embed_output": "kprpe.streaming.shards",
    }
)

if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
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


def load_aligner(name_or_path="minchul/cvlface_DFA_mobilenet", *, device="cpu"):
    """The official DFA face aligner (:class:`kprpe.face.dfa.DifferentiableFaceAligner`, eval mode) from a
    checkpoint file or folder, or a Hugging Face repo id resolved with :func:`kprpe.zoo.resolve` (weights and
    configs only, from the standard cache). ``aligner(rgb)`` with ``rgb`` ``(B, 3, H, W)`` in [-1, 1] returns
    the official tuple ``(aligned_x, orig_pred_ldmks, aligned_ldmks, score, thetas, normalized_bbox)``."""
    from .face.dfa_backend import load_aligner as _load_aligner

    return _load_aligner(name_or_path, device=device)


__all__ = [
    "CheckpointError",
    "ViTConfig",
    "VisionTransformer",
    "__version__",
    "create_model",
    "list_models",
    "load_aligner",
    "load_official",
    "load_weights",
    "normalize_embedding",
    "save_model",
]
