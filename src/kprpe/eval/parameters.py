"""A checkpoint's parameter count read from its file, without building the model.

``results.json`` reports the trainable parameters of the ``nn.Module`` (``sum(p.numel() for p in
model.parameters())``): that says whether the weights can be a published model. A run whose embeddings all
come from the cache never needs the model, so building it (seconds to minutes for a ViT-Base) only to count
would be waste. A ``.safetensors`` header lists every tensor's shape; what the file holds besides parameters
are the persistent buffers of the registered families, recognised by name below. Anything else (pickled
files, an unknown family, an unreadable header) answers None, and the caller counts on the built model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["header_parameter_count", "BUFFER_SUFFIXES", "COUNTED_FAMILIES"]

# persistent buffers stored beside the parameters: BatchNorm's statistics (IResNet), Swin's relative-position
# tables. Non-persistent buffers (the ViTs' bucket indices) are not in the file at all.
BUFFER_SUFFIXES = (
    ".running_mean",
    ".running_var",
    ".num_batches_tracked",
    ".relative_coords_table",
    ".relative_position_index",
)
# families whose every persistent buffer ends in BUFFER_SUFFIXES and which share no parameters between
# modules (tests/eval/test_parameter_count.py checks every preset): only these are counted from the header
COUNTED_FAMILIES = ("vit", "iresnet", "swin")


def header_parameter_count(path) -> int | None:
    """The parameter count of the recognition model a ``.safetensors`` file holds, from its header alone;
    None when the file cannot tell (not safetensors, unreadable, a family not in :data:`COUNTED_FAMILIES`,
    or a stored kprpe config naming another family than the keys): then build the model and count."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        import torch
        from safetensors import safe_open

        from ..nn.checkpoint import CONFIG_METADATA_KEY, strip_prefixes
        from ..nn.registry import DEFAULT_ARCH, recognize

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        # meta tensors: shapes without storage, so the families' recognisers see what they would see
        state = strip_prefixes({k: torch.empty(s, device="meta") for k, s in shapes.items()})
        family = recognize(state)
        saved = json.loads(metadata[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in metadata else None
    except Exception:  # any doubt: the caller loads the model, which reports a bad file properly
        return None
    if family is None or family.name not in COUNTED_FAMILIES:
        return None
    if saved is not None and (not isinstance(saved, dict) or saved.get("arch", DEFAULT_ARCH) != family.name):
        return None
    return sum(math.prod(t.shape) for k, t in state.items() if not k.endswith(BUFFER_SUFFIXES))
