"""Training data: RecordIO reader/writer, image folders, keypoint-consistent augmentation. Landmark files
(:mod:`kprpe.landmarks`) and image decoding (:mod:`kprpe.images`) have their own homes; their names are
re-exported here for existing callers."""

from ..images import decode_image
from ..landmarks import LandmarkFileError, read_landmarks, write_landmarks
from .dataset import (
    IMAGE_EXTENSIONS,
    DataError,
    FaceDataset,
    FolderSource,
    RecordSource,
    open_source,
)
from .pack import PackReport, pack_folder
from .recordio import (
    RECORDIO_MAGIC,
    RecordHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    index_path_for,
    pack_record,
    unpack_record,
)
from .sampler import ResumableSampler
from .transforms import (
    AugmentConfig,
    FaceAugment,
    apply_affine_to_keypoints,
    geometric_matrix,
    image_to_tensor,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "RECORDIO_MAGIC",
    "AugmentConfig",
    "DataError",
    "FaceAugment",
    "FaceDataset",
    "FolderSource",
    "LandmarkFileError",
    "PackReport",
    "RecordHeader",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "RecordSource",
    "ResumableSampler",
    "apply_affine_to_keypoints",
    "decode_image",
    "geometric_matrix",
    "image_to_tensor",
    "index_path_for",
    "open_source",
    "pack_folder",
    "pack_record",
    "read_landmarks",
    "unpack_record",
    "write_landmarks",
]
