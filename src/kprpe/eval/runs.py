"""One function per protocol: data in, a results dict out (the command line only adds files and plots)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .binfile import read_verification_bin
from .embedding import embed_with_cache
from .ijb import read_ijb_meta, template_features, template_pair_scores
from .images import (
    DataFormatError,
    IdentityImages,
    image_face_source,
    list_images,
    path_inside,
    read_pairs_csv,
    scan_identity_folders,
)
from .landmarks import DEFAULT_LANDMARK_BACKEND, LandmarkBackend, LandmarkFileError, read_pixel_landmarks
from .metrics import DEFAULT_FAR_TARGETS, cmc_ranks, kfold_accuracy, open_set_dir_at_fpir, rank_accuracy
from .verification import bin_face_source, pair_scores, resolve_keypoint_source, verification_metrics

__all__ = [
    "EvalSettings",
    "ModelHandle",
    "evaluate_bins",
    "evaluate_ijb",
    "evaluate_pairs",
    "evaluate_identification",
    "robustness_sweep",
    "read_boxes",
]


@dataclass
class EvalSettings:
    """Choices shared by all protocols."""

    flip: bool = True
    batch_size: int = 64
    device: str | None = None
    cache_dir: str | os.PathLike | None = None  # None: no cache
    progress: bool = True
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS
    n_folds: int = 10
    tar_far_convention: str = "insightface"  # see metrics.TAR_FAR_CONVENTIONS
    calibrate_far: float | None = None  # also report the threshold for this FAR (kprpe.eval.calibration)
    # where ``backend`` keypoints come from (dlib, or the DFA aligner): this run's, never a process-wide one
    landmark_backend: LandmarkBackend = DEFAULT_LANDMARK_BACKEND


@dataclass
class ModelHandle:
    """A checkpoint path whose model is loaded on first use (an embedding not in the cache, the parameter
    count when the weights file cannot tell it, a fingerprint) and then kept: one handle, one load, so a
    run passes its one handle everywhere."""

    weights: Path
    name: str = ""
    device: str | None = None
    engine: str = "torch"  # torch: a checkpoint; onnx: a file from ``kprpe export`` run by ONNX Runtime
    # ``weights`` already resolved by the caller (kprpe.zoo.resolve): a repo id's snapshot is not hashed again
    resolved: Path | None = field(default=None, repr=False)
    _model: torch.nn.Module | None = field(default=None, repr=False)

    def __post_init__(self):
        self.source = str(self.weights)  # as the user named it (a path or a model-zoo repo id)
        self.weights = Path(self.weights)
        if not self.name:
            self.name = self.weights.stem if self.weights.stem != "model" else self.weights.parent.name
        if self.resolved is not None:
            self.weights = Path(self.resolved)
        else:
            from ..zoo import resolve

            self.weights = resolve(
                self.weights, kind="recognition"
            )  # a path, or a repo id -> its verified snapshot

    def __call__(self) -> torch.nn.Module:
        if self._model is None and self.engine == "onnx":
            from ..export import load_engine

            self._model = load_engine(self.weights, device=self.device)
        if self._model is None:
            from ..nn import load_official

            model = load_official(self.weights)
            if self.device is not None:
                model = model.to(self.device)
            self._model = model.eval()
        return self._model

    def parameter_count(self) -> int | None:
        """The model's parameter count (None for an ONNX engine): says whether it can be a published model.

        Read from the weights file's header when the model is not loaded yet (a run served from the
        embedding cache then never builds it); counted on the built model when the file cannot tell."""
        if self.engine == "onnx":  # an ONNX graph's initializers are not the module's parameters
            return None
        if self._model is None:
            from .parameters import header_parameter_count

            count = header_parameter_count(self.fingerprint_path)
            if count is not None:
                return count
        model = self()
        if not isinstance(model, torch.nn.Module):
            return None
        return sum(p.numel() for p in model.parameters())

    @property
    def fingerprint_path(self) -> Path:
        """The file whose identity keys the cache (a directory's model file when given a directory)."""
        if self.weights.is_dir():
            for candidate in (
                "model.safetensors",
                "pretrained_model/model.safetensors",
                "pretrained_model/model.pt",
                "model.pt",
                "model.pth",
            ):
                if (self.weights / candidate).is_file():
                    return self.weights / candidate
        return self.weights


def run_report(protocol: str, handle: ModelHandle, settings: EvalSettings, *, mode: str, keypoint_source,
               sets: dict) -> dict:
    """The ``results.json`` header every single-model protocol writes, then its sets. ``keypoint_source`` may
    be a per-set mapping; it is written as one value when every set used the same source."""
    if isinstance(keypoint_source, dict) and len(set(keypoint_source.values())) == 1:
        keypoint_source = next(iter(keypoint_source.values()))
    return dict(protocol=protocol, weights=str(handle.weights), model=handle.source,
                parameters=handle.parameter_count(), flip=settings.flip, mode=mode,
                keypoint_source=keypoint_source, sets=sets)


def embed_source(handle: ModelHandle, source, settings: EvalSettings, mode: str, desc: str):
    """Every protocol's embedding step: ``source`` through the model with the run's settings and cache.
    Returns ``(embeddings, norms, from_cache)``."""
    handle.device = settings.device
    return embed_with_cache(
        handle,
        handle.fingerprint_path,
        source,
        mode=mode,
        flip=settings.flip,
        cache_dir=settings.cache_dir,
        batch_size=settings.batch_size,
        device=settings.device,
        progress=settings.progress,
        desc=desc,
    )


def verification_result(scores, labels, settings: EvalSettings) -> dict:
    """Every protocol's verification step: the metrics of :func:`verification_metrics` with the run's folds,
    FAR targets and convention, and the calibrated threshold when the run asks for one."""
    result = verification_metrics(
        scores,
        labels,
        n_folds=settings.n_folds,
        far_targets=settings.far_targets,
        tar_far_convention=settings.tar_far_convention,
    )
    _calibrate(result, scores, labels, settings)
    return result


def ijb_result(
    emb: np.ndarray,
    norms: np.ndarray,
    *,
    template_ids: np.ndarray,
    media_ids: np.ndarray,
    detector_scores: np.ndarray,
    pair_t1: np.ndarray,
    pair_t2: np.ndarray,
    labels: np.ndarray,
    settings: EvalSettings,
    use_norm: bool,
    use_detector_score: bool,
) -> dict:
    """The IJB 1:1 protocol on face embeddings: template pooling (media-averaged, optionally weighted by
    norm and detector score), template-pair scores, TAR@FAR (no k-fold accuracy: not an IJB metric)."""
    feats, templates = template_features(
        emb,
        template_ids,
        media_ids,
        norms=norms if use_norm else None,
        detector_scores=detector_scores if use_detector_score else None,
    )
    scores = template_pair_scores(feats, templates, pair_t1, pair_t2)
    result = verification_result(scores, labels, settings)
    result.pop("kfold", None)  # accuracy is not an IJB metric
    result.pop("val_at_far", None)
    result.update(
        num_faces=int(emb.shape[0]),
        num_templates=int(templates.size),
        use_norm=use_norm,
        use_detector_score=use_detector_score,
    )
    return result


def _calibrate(result: dict, scores, labels, settings: EvalSettings) -> None:
    if settings.calibrate_far is not None:
        from .calibration import CalibrationError, calibrate_threshold

        try:
            result["calibration"] = calibrate_threshold(scores, labels, settings.calibrate_far)
        except CalibrationError as exc:  # the metrics are still worth writing; the command reports this after
            result["calibration"] = {"far_target": settings.calibrate_far, "error": str(exc)}


def evaluate_bins(
    handle: ModelHandle,
    bin_paths: Sequence[str | os.PathLike],
    settings: EvalSettings,
    *,
    keypoint_source: str = "auto",
    landmarks: Sequence[str | os.PathLike | None] | None = None,
) -> dict:
    """10-fold accuracy, VAL@FAR and TAR@FAR on each ``.bin`` set. ``landmarks[i]`` belongs to
    ``bin_paths[i]``."""
    landmarks = list(landmarks) if landmarks else [None] * len(bin_paths)
    if len(landmarks) != len(bin_paths):
        raise ValueError(f"{len(landmarks)} landmark files for {len(bin_paths)} .bin sets")
    sets, sources = {}, {}
    for path, lm in zip(bin_paths, landmarks, strict=True):
        vb = read_verification_bin(path)
        source_kind = resolve_keypoint_source(keypoint_source, lm, settings.landmark_backend)
        source = bin_face_source(vb, path, source_kind, lm, backend=settings.landmark_backend)
        mode = f"prealigned:{source_kind}"
        emb, norms, cached = embed_source(handle, source, settings, mode=mode, desc=vb.name)
        scores = pair_scores(emb, np.arange(0, len(vb), 2), np.arange(1, len(vb), 2))
        result = verification_result(scores, vb.issame, settings)
        result.update(keypoint_source=source_kind, embeddings_from_cache=cached)
        sets[vb.name] = result
        sources[vb.name] = source_kind
    return run_report("verification (.bin, 10-fold)", handle, settings, mode="prealigned",
                      keypoint_source=sources, sets=sets)


def evaluate_ijb(
    handle: ModelHandle,
    *,
    name: str,
    tid_mid,
    pairs,
    landmarks,
    images_dir,
    settings: EvalSettings,
    t: float = 0.0,
    use_norm: bool = True,
    use_detector_score: bool = True,
) -> dict:
    """IJB-B/C 1:1: template features from aligned loose crops (or crops at ``t`` toward the box crop)."""
    meta = read_ijb_meta(tid_mid, pairs, landmarks)
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataFormatError(f"image folder not found: {images_dir}")
    paths = [path_inside(images_dir, n, listed_in=tid_mid) for n in meta.names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataFormatError(
            f"{len(missing)} of {len(paths)} faces are missing from {images_dir} (first: {missing[0].name})"
        )
    source = image_face_source(paths, meta.names, landmarks=meta.landmarks, t=t)
    emb, norms, cached = embed_source(handle, source, settings, mode=f"ijb:t={t:g}", desc=name)
    result = ijb_result(
        emb,
        norms,
        template_ids=meta.template_ids,
        media_ids=meta.media_ids,
        detector_scores=meta.detector_scores,
        pair_t1=meta.pair_t1,
        pair_t2=meta.pair_t2,
        labels=meta.pair_labels,
        settings=settings,
        use_norm=use_norm,
        use_detector_score=use_detector_score,
    )
    result.update(embeddings_from_cache=cached)
    return run_report("IJB 1:1 verification", handle, settings, mode="aligned" if t == 0 else f"t={t:g}",
                      keypoint_source="landmark file", sets={name: result})


def _resolve_images(root: Path, names: Sequence[str]) -> list[Path]:
    paths = [Path(n) if Path(n).is_absolute() else root / n for n in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataFormatError(f"{len(missing)} images not found (first: {missing[0]})")
    return paths


@dataclass
class _ImagePairs:
    """A pairs CSV resolved to files: each distinct image once (``names``/``paths``), pairs as indices."""

    names: list[str]
    paths: list[Path]
    first: np.ndarray
    second: np.ndarray
    labels: np.ndarray


def _read_image_pairs(pairs_csv: Path, images_root) -> _ImagePairs:
    """Read ``pairs_csv`` and find its images under ``images_root`` (default: the CSV's folder)."""
    firsts, seconds, labels = read_pairs_csv(pairs_csv)
    root = Path(images_root) if images_root else pairs_csv.parent
    names = sorted(set(firsts) | set(seconds))
    index = {n: i for i, n in enumerate(names)}
    return _ImagePairs(
        names=names,
        paths=_resolve_images(root, names),
        first=np.array([index[n] for n in firsts]),
        second=np.array([index[n] for n in seconds]),
        labels=labels,
    )


def evaluate_pairs(
    handle: ModelHandle,
    pairs_csv,
    settings: EvalSettings,
    *,
    images_root=None,
    landmarks=None,
    t: float = 0.0,
    keypoint_source: str = "auto",
) -> dict:
    """Custom pairs: ``image_a,image_b,label`` rows; images pre-aligned, or cropped from a pixel landmark
    file."""
    pairs_csv = Path(pairs_csv)
    pairs = _read_image_pairs(pairs_csv, images_root)
    points = read_pixel_landmarks(landmarks)[0] if landmarks else None
    kp_kind = (
        "landmark file"
        if points is not None
        else resolve_keypoint_source(keypoint_source, None, settings.landmark_backend)
    )
    source = image_face_source(
        pairs.paths,
        pairs.names,
        landmarks=points,
        t=t,
        keypoint_source="template" if points is not None else kp_kind,
        backend=settings.landmark_backend,
    )
    emb, norms, cached = embed_source(handle, source, settings, mode=f"pairs:t={t:g}", desc=pairs_csv.stem)
    scores = pair_scores(emb, pairs.first, pairs.second)
    result = verification_result(scores, pairs.labels, settings)
    result.update(embeddings_from_cache=cached)
    mode = ("aligned" if t == 0 else f"t={t:g}") if points is not None else "prealigned"
    return run_report("verification (pairs CSV)", handle, settings, mode=mode, keypoint_source=kp_kind,
                      sets={pairs_csv.stem: result})


def evaluate_identification(
    handle: ModelHandle,
    settings: EvalSettings,
    *,
    gallery,
    probe,
    distractors=None,
    label_regex: str | None = None,
    keypoint_source: str = "auto",
    ranks: Sequence[int] = (1, 5, 20),
    fpir_targets: Sequence[float] = (1e-2, 1e-1),
    gallery_per: str = "image",
    name: str = "identification",
) -> dict:
    """Closed-set rank-k (CMC) and, when some probes have no mate, open-set DIR@FPIR, on identity folders.

    Distractor images join the gallery under labels no probe can have. ``gallery_per="identity"`` averages
    each identity's gallery images into one template (IJB-S style); ``"image"`` keeps every image (TinyFace).
    """
    if gallery_per not in ("image", "identity"):
        raise ValueError(f"gallery_per must be 'image' or 'identity', got {gallery_per!r}")
    kp_kind = resolve_keypoint_source(keypoint_source, None, settings.landmark_backend)
    parts = {
        "gallery": scan_identity_folders(gallery, label_regex),
        "probe": scan_identity_folders(probe, label_regex),
    }
    if distractors:
        d = Path(distractors)
        files = list_images(d)
        if not files:
            raise DataFormatError(f"no images under distractor folder {d}")
        parts["distractors"] = IdentityImages(
            paths=files, labels=[f"\0distractor{i}" for i in range(len(files))]
        )
    feats = {}
    for role, items in parts.items():
        source = image_face_source(items.paths, [str(p) for p in items.paths], keypoint_source=kp_kind,
                                   backend=settings.landmark_backend)
        feats[role] = embed_source(handle, source, settings, mode=f"prealigned:{kp_kind}", desc=role)[0]
    g_emb, g_lab = feats["gallery"], np.asarray(parts["gallery"].labels, dtype=object)
    if gallery_per == "identity":
        uniq, inv = np.unique(g_lab, return_inverse=True)
        summed = np.zeros((uniq.size, g_emb.shape[1]))
        np.add.at(summed, inv, g_emb)
        g_emb = summed / np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)
        g_lab = uniq
    if "distractors" in feats:
        g_emb = np.concatenate([g_emb, feats["distractors"]])
        g_lab = np.concatenate([g_lab, np.asarray(parts["distractors"].labels, dtype=object)])
    p_lab = np.asarray(parts["probe"].labels, dtype=object)
    sim = feats["probe"].astype(np.float64) @ g_emb.T.astype(np.float64)
    rank_of = cmc_ranks(sim, p_lab, g_lab)
    result = dict(
        num_probes=int(p_lab.size),
        num_mated_probes=int((rank_of > 0).sum()),
        num_gallery=int(g_lab.size),
        num_distractors=len(parts["distractors"].paths) if distractors else 0,
        gallery_per=gallery_per,
        closed_set=rank_accuracy(rank_of, ranks),
        cmc=[float(np.mean(rank_of[rank_of > 0] <= k)) for k in range(1, min(50, g_lab.size) + 1)],
    )
    if (rank_of == 0).any():
        result["open_set"] = open_set_dir_at_fpir(sim, p_lab, g_lab, fpir_targets)
    return run_report("identification (closed/open set)", handle, settings, mode="prealigned",
                      keypoint_source=kp_kind, sets={name: result})


def read_boxes(path) -> dict[str, np.ndarray]:
    """Detector boxes ``image_name x1 y1 x2 y2`` (pixels), one per line, returned in continuous pixel
    coordinates (:mod:`kprpe.face.align`).

    The file holds the detector convention, array slice bounds: the box is ``image[y1:y2, x1:x2]``, so a box
    covering a whole W x H image reads ``0 0 W H``. Pixel centres sit at integers in kprpe, so each value
    moves by -0.5 on the way in."""
    path = Path(path)
    boxes = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.replace(",", " ").split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) != 5:
                raise LandmarkFileError(
                    f"{path}:{lineno}: expected 'image_name x1 y1 x2 y2', got {len(parts)} fields"
                )
            try:
                box = np.array([float(v) for v in parts[1:]])
            except ValueError as exc:
                raise LandmarkFileError(f"{path}:{lineno}: {exc}") from None
            if box[2] <= box[0] or box[3] <= box[1]:
                raise LandmarkFileError(f"{path}:{lineno}: box needs x2 > x1 and y2 > y1")
            boxes[parts[0]] = box - 0.5
    return boxes


def robustness_sweep(
    handles: Sequence[ModelHandle],
    pairs_csv,
    landmarks,
    settings: EvalSettings,
    *,
    t_values: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    images_root=None,
    boxes=None,
) -> dict:
    """Figure 5 of the paper: 10-fold accuracy on raw-photo pairs as the crop moves from aligned (t=0) to
    the detector-box crop (t=1), for each checkpoint."""
    pairs = _read_image_pairs(Path(pairs_csv), images_root)
    points = read_pixel_landmarks(landmarks)[0]
    box_table = read_boxes(boxes) if boxes else None
    names_out = [h.name for h in handles]
    if len(set(names_out)) != len(names_out):
        raise ValueError(f"checkpoint names must differ, got {names_out} (use NAME=PATH)")
    accuracy = {h.name: [] for h in handles}
    std = {h.name: [] for h in handles}
    for t in t_values:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1], got {t}")
        source = image_face_source(pairs.paths, pairs.names, landmarks=points, boxes=box_table, t=float(t))
        for h in handles:
            emb = embed_source(h, source, settings, mode=f"sweep:t={t:g}", desc=f"{h.name} t={t:g}")[0]
            kf = kfold_accuracy(
                pair_scores(emb, pairs.first, pairs.second), pairs.labels, n_folds=settings.n_folds
            )
            accuracy[h.name].append(kf.accuracy_mean)
            std[h.name].append(kf.accuracy_std)
    return dict(
        protocol="alignment-robustness sweep",
        flip=settings.flip,
        weights={h.name: str(h.weights) for h in handles},
        keypoint_source="landmark file",
        box_source="box file" if boxes else "landmark bounding box (enlarged)",
        num_pairs=int(pairs.labels.size),
        sweep=dict(
            t=[float(t) for t in t_values], checkpoints=names_out, accuracy=accuracy, accuracy_std=std
        ),
    )
