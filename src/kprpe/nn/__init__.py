"""Models: relative-position buckets, position encodings (RPE, iRPE, KP-RPE), attention, the face ViT, the
IResNet, presets, checkpoints.

Model families register themselves with :mod:`.registry` when imported: importing them here is what makes
their presets and checkpoints known (a new family, e.g. nn/swin.py, adds one import below).
"""

from .attention import Attention, Block, Mlp
from .buckets import bucket_ids, num_buckets, piecewise_index
from .checkpoint import CheckpointError, load_official, load_weights, read_state_dict, save_model

# the model families: each registers itself and its presets on import (order: `kprpe models`, dispatch)
from .vit_family import infer_config  # isort: skip
from .iresnet import IResNet, IResNetConfig  # isort: skip
from .swin import SwinConfig, SwinTransformer  # isort: skip
from .swingait import SwinGait, SwinGaitConfig  # isort: skip
from .keypoint_rpe import KeypointRPE, patch_centres, relative_keypoints
from .position import gather_bias
from .registry import (
    create_model,
    family_of_model,
    list_families,
    list_models,
    preset_config,
    register_family,
    register_model,
)
from .vit import VisionTransformer, ViTConfig, normalize_embedding, num_parameters

__all__ = [
    "SwinGait",
    "SwinGaitConfig",
    "Attention",
    "Block",
    "CheckpointError",
    "IResNet",
    "IResNetConfig",
    "KeypointRPE",
    "Mlp",
    "SwinConfig",
    "SwinTransformer",
    "ViTConfig",
    "VisionTransformer",
    "bucket_ids",
    "create_model",
    "family_of_model",
    "gather_bias",
    "infer_config",
    "list_families",
    "list_models",
    "load_official",
    "load_weights",
    "normalize_embedding",
    "num_buckets",
    "num_parameters",
    "patch_centres",
    "piecewise_index",
    "preset_config",
    "read_state_dict",
    "register_family",
    "register_model",
    "relative_keypoints",
    "save_model",
]
