"""Access to the official reference vectors committed under tests/fixtures (see tests/fixtures/README.md)."""

from __future__ import annotations

from pathlib import Path

import torch

DATA = Path(__file__).parent / "fixtures"


def load_vectors(name: str) -> dict[str, torch.Tensor]:
    """All reference tensors of ``tiny_<name>`` (io, intermediates, layer-0), keyed as in the reference."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for part in ("io", "intermediates", "layer0"):
        path = DATA / f"tiny_{name}_{part}.safetensors"
        if path.exists():
            out.update(load_file(str(path)))
    return out
