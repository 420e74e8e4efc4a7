"""Training: config, margin heads and partial FC, distributed helpers, checkpoints, the loop."""

from .checkpoint import CheckpointState, latest_checkpoint
from .config import ConfigError, TrainConfig, apply_overrides, config_from_dict, load_config
from .distributed import (
    DistributedBatchNorm1d,
    DistributedBatchNorm2d,
    DistributedBatchNorm3d,
    use_distributed_batchnorm,
)
from .heads import AdaFaceMargin, CombinedMargin, PartialFC, PlainLogits, build_margin, class_shard
from .loop import Trainer, TrainingDiverged
from .schedule import learning_rate, lr_factor
from .validation import load_verification_bin, validation_accuracy, verification_accuracy

__all__ = [
    "AdaFaceMargin",
    "CheckpointState",
    "CombinedMargin",
    "ConfigError",
    "DistributedBatchNorm1d",
    "DistributedBatchNorm2d",
    "DistributedBatchNorm3d",
    "PartialFC",
    "PlainLogits",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "apply_overrides",
    "build_margin",
    "class_shard",
    "config_from_dict",
    "latest_checkpoint",
    "load_config",
    "load_verification_bin",
    "learning_rate",
    "lr_factor",
    "use_distributed_batchnorm",
    "validation_accuracy",
    "verification_accuracy",
]
