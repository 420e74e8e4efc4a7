"""Models: relative-position buckets, position encodings (RPE, iRPE, KP-RPE), attention, the face ViT, the
IResNet, presets, checkpoints."""

from .attention import Attention, Block, Mlp
from .buckets import bucket_ids, num_buckets, piecewise_index
from .checkpoint import (
    CheckpointError,
    infer_config,
    load_official,
    load_weights,
    read_state_dict,
    save_model,
)
from .iresnet import IResNet, IResNetConfig
from .keypoint_rpe import KeypointRPE, patch_centres, relative_keypoints
from .position import gather_bias
from .registry import create_model, list_models, preset_config, register_model
from .vit import VisionTransformer, ViTConfig, normalize_embedding, num_parameters

__all__ = [
    "Attention",
    "Block",
    "CheckpointError",
    "IResNet",
    "IResNetConfig",
    "KeypointRPE",
    "Mlp",
    "ViTConfig",
    "VisionTransformer",
    "bucket_ids",
    "create_model",
    "gather_bias",
    "infer_config",
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
    "register_model",
    "relative_keypoints",
    "save_model",
]
