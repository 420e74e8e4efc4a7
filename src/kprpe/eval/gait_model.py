"""A gait model on a packed data set: sequences batched with their lengths, embedded with all frames, and the
Gait3D protocol (:func:`kprpe.eval.gait.evaluate_gait3d`) run on the embeddings — what ``kprpe eval gait`` and
gait training's validation do."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["collate_sequences", "embed_dataset", "evaluate_model"]


def collate_sequences(items: list[dict], frame_size: tuple[int, int]) -> dict:
    """Stack sequences (padding to the longest, with ``lengths``): silhouettes scaled to [0, 1]; keypoints
    to (x / W, y / H, confidence)."""
    h, w = frame_size
    lengths = [int(item["sils"].shape[0]) for item in items]
    t = max(lengths)
    sils = np.zeros((len(items), t, h, w), np.float32)
    pose = np.zeros((len(items), t, 17, 3), np.float32)
    for i, item in enumerate(items):
        sils[i, : lengths[i]] = item["sils"] / 255.0
        if "pose" in item:
            pose[i, : lengths[i]] = item["pose"]
    pose[..., 0] /= w
    pose[..., 1] /= h
    return {
        "sils": torch.from_numpy(sils),
        "keypoints": torch.from_numpy(pose),
        "lengths": torch.tensor(lengths),
        "labels": torch.tensor([int(item["label"]) for item in items]),
        "keys": [item["key"] for item in items],
    }


@torch.no_grad()
def embed_dataset(
    model: nn.Module, dataset, batch_size: int = 4, device=None, progress: bool = False
) -> np.ndarray:
    """``(N, E, P)`` float32 embeddings (before the BNNeck) of every sequence of ``dataset``, all frames;
    ``progress``: a bar on stderr, in sequences."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    frame_size = tuple(model.config.frame_size)
    out = []
    rng = np.random.default_rng(0)
    bar = tqdm(total=len(dataset), desc="sequences", unit="seq", disable=not progress)
    for start in range(0, len(dataset), batch_size):
        items = [dataset.sample(i, rng) for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate_sequences(items, frame_size)
        result = model(batch["sils"].to(device), batch["keypoints"].to(device), batch["lengths"].to(device))
        out.append(result["embeddings"].float().cpu().numpy())
        bar.update(len(items))
    bar.close()
    model.train(was_training)
    return np.concatenate(out)


def evaluate_model(
    model: nn.Module,
    root,
    partition,
    *,
    batch_size: int = 4,
    metric: str = "euc",
    frames_limit: int = 720,
    keypoints: str = "real",
    device=None,
    progress: bool = False,
) -> dict:
    """The Gait3D protocol (:func:`kprpe.eval.gait.evaluate_gait3d`) on the test split of ``partition``
    (``progress``: a bar on stderr while the sequences are embedded)."""
    from ..gait import AllOrderedFrames, GaitDataset, read_partition
    from ..gait.augment import KeypointControl
    from .gait import evaluate_gait3d

    part = read_partition(partition)
    control = KeypointControl(keypoints, tuple(model.config.frame_size)) if keypoints != "real" else None
    dataset = GaitDataset(root, part, "test", frames=AllOrderedFrames(frames_limit), transform=control)
    features = embed_dataset(model, dataset, batch_size, device, progress=progress)
    sequences = [(s.identity, s.seq_type, s.view) for s in dataset.sequences]
    raw = {
        "TRAIN_SET": list(part.train_ids),
        "TEST_SET": list(part.test_ids),
        "PROBE_SET": list(part.probe_set),
    }
    return evaluate_gait3d(features, sequences, raw, metric)
