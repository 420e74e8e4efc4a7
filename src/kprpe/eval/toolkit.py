"""The official CVLface evaluation toolkit's on-disk layout, read directly.

Each evaluation set of the toolkit (``facerec_val/<name>``) is a Hugging Face ``datasets`` folder written with
``Dataset.save_to_disk`` (``state.json``, ``dataset_info.json``, ``data-*.arrow``); face ``i`` is the row
whose ``index`` column is ``i`` (the indices are 0..N-1). Three kinds:

- **verification** (lfw, cfp_fp, agedb_30, calfw, cplfw): columns ``image``, ``index``, ``is_same``; the faces
  with indices 2k and 2k+1 form pair k, labelled by their ``is_same``.
- **IJB-B/C** (``IJBB_gt_aligned``, ``IJBC_gt_aligned``): columns ``image``, ``index`` and a ``metadata.pt``
  beside the arrow files with per-face ``templates``, ``medias``, ``faceness_scores`` and the template pairs
  ``p1``, ``p2``, ``label``.
- **TinyFace** (``tinyface_aligned_pad_0.1``): columns ``image``, ``index``, ``path`` and a ``metadata.pt``
  with the file lists ``image_paths``, ``probe_paths``, ``gallery_paths``, ``distractor_paths``
  (see :mod:`kprpe.eval.tinyface`).

The arrow files are memory-mapped and faces are decoded one batch at a time, so a set is never held in memory
as images. ``metadata.pt`` is a torch pickle; it is read with ``torch.load(weights_only=True)`` allowing
only numpy arrays besides plain containers, so loading it cannot run code. The ``datasets`` library is an
optional dependency: ``pip install 'kprpe[eval-toolkit]'``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import KprpeError
from .binfile import decode_image
from .embedding import FaceSource, file_fingerprint
from .images import DataFormatError
from .landmarks import (
    backend_tag,
    indexed_keypoints,
)
from .tinyface import (
    TINYFACE_FOLDERS,
    TINYFACE_RANKS,
    TinyFaceProtocol,
    is_tinyface_folder,
    tinyface_folder_lists,
    tinyface_identification,
    tinyface_label,
)

__all__ = [
    "TOOLKIT_KINDS",
    "evaluate_tinyface",
    "tinyface_toolkit_result",
    "METADATA_FILE",
    "IJB_METADATA_KEYS",
    "TINYFACE_METADATA_KEYS",
    "ToolkitFormatError",
    "ToolkitSet",
    "is_toolkit_dataset",
    "find_toolkit_sets",
    "open_toolkit_set",
    "read_toolkit_metadata",
    "metadata_array",
    "metadata_strings",
    "toolkit_face_source",
    "verification_pairs",
    "evaluate_toolkit",
]

TOOLKIT_KINDS = ("verification", "ijb", "tinyface")
METADATA_FILE = "metadata.pt"
IJB_METADATA_KEYS = ("templates", "medias", "faceness_scores", "p1", "p2", "label")
TINYFACE_METADATA_KEYS = ("image_paths", "probe_paths", "gallery_paths", "distractor_paths")
_INSTALL_HINT = "pip install 'kprpe[eval-toolkit]'"


class ToolkitFormatError(DataFormatError, KprpeError):
    """A folder that is not an evaluation set in the CVLface toolkit layout (the message says what is
    wrong)."""


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ToolkitFormatError(
            f"reading the CVLface toolkit layout needs the `datasets` library: {_INSTALL_HINT}"
        ) from None
    return datasets


def is_toolkit_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` (no ``datasets`` import needed)."""
    p = Path(path)
    return p.is_dir() and (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def find_toolkit_sets(root: str | os.PathLike) -> list[Path]:
    """``root`` itself when it is a toolkit set, else its sub-folders that are (e.g. ``facerec_val/``),
    sorted."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"toolkit folder not found: {root}")
    if is_toolkit_dataset(root):
        return [root]
    found = sorted(p for p in root.iterdir() if is_toolkit_dataset(p)) if root.is_dir() else []
    if not found:
        raise ToolkitFormatError(
            f"{root}: neither a `save_to_disk` dataset folder (state.json, dataset_info.json) "
            "nor a folder of them"
        )
    return found


def _numpy_globals() -> list:
    """The numpy names a pickled ``ndarray`` refers to, under the module paths numpy 1 and numpy 2 write."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray
    allowed: list = [np.ndarray, np.dtype]
    dtype_classes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes by their class
    if dtype_classes is not None:
        allowed += [getattr(dtype_classes, n) for n in dir(dtype_classes) if n.endswith("DType")]
    for name in ("_reconstruct", "scalar"):
        fn = getattr(multiarray, name)
        allowed += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    return allowed


def read_toolkit_metadata(path: str | os.PathLike, required: Sequence[str] = ()) -> dict[str, Any]:
    """``metadata.pt`` as a dict, without unpickling arbitrary objects.

    ``torch.load(weights_only=True)`` builds only tensors, plain containers, strings and numbers; numpy arrays
    are allowed on top (their reconstruct function and dtype, nothing else). Any other global -- a class, a
    function such as ``os.system`` -- is refused before it runs. ``required`` keys must be present.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"toolkit metadata not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            meta = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise ToolkitFormatError(
            f"{path}: refusing to unpickle it ({reason}); only tensors, numpy arrays, "
            "strings, numbers and containers are read"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ToolkitFormatError(f"{path}: not a torch-saved file ({exc})") from None
    if not isinstance(meta, dict):
        raise ToolkitFormatError(f"{path}: expected a dict of metadata, got {type(meta).__name__}")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ToolkitFormatError(f"{path}: missing metadata keys {missing} (has {sorted(map(str, meta))})")
    return meta


def metadata_array(meta: dict, key: str, where: Path, dtype=None) -> np.ndarray:
    """A metadata entry (tensor, array or list) as a 1-D numpy array."""
    value = meta[key]
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value) if dtype is None else np.asarray(value, dtype=dtype)
    if arr.ndim == 2 and 1 in arr.shape:  # a column or row vector
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ToolkitFormatError(
            f"{where}: metadata {key!r} should be one-dimensional, got shape {arr.shape}"
        )
    return arr


def metadata_strings(meta: dict, key: str, where: Path) -> list[str]:
    """A metadata list of file paths as Python strings."""
    value = meta[key]
    items = value.tolist() if isinstance(value, np.ndarray) else list(value)
    bad = [v for v in items if not isinstance(v, str)]
    if bad:
        raise ToolkitFormatError(
            f"{where}: metadata {key!r} should hold file paths, found {type(bad[0]).__name__}"
        )
    return items


@dataclass
class ToolkitSet:
    """One toolkit evaluation set, opened (memory-mapped, nothing decoded yet)."""

    path: Path
    kind: str  # one of TOOLKIT_KINDS
    dataset: Any  # datasets.Dataset
    rows: np.ndarray  # rows[i]: the dataset row of the face with index i
    metadata: dict | None

    @property
    def name(self) -> str:
        return self.path.name

    def __len__(self) -> int:
        return int(self.rows.size)

    def column(self, name: str) -> np.ndarray:
        """A non-image column in index order (face ``i`` at position ``i``)."""
        if name not in self.dataset.column_names:
            raise ToolkitFormatError(
                f"{self.path}: no column {name!r} (columns: {self.dataset.column_names})"
            )
        values = self.dataset.select_columns([name]).with_format("numpy")[:][name]
        return np.asarray(values)[self.rows]


def _row_order(index: np.ndarray, where: Path) -> np.ndarray:
    n = index.size
    if not np.issubdtype(index.dtype, np.integer):
        raise ToolkitFormatError(f"{where}: column 'index' must hold integers, got {index.dtype}")
    if n == 0:
        raise ToolkitFormatError(f"{where}: the dataset is empty")
    rows = np.full(n, -1, dtype=np.int64)
    valid = (index >= 0) & (index < n)
    if not valid.all():
        bad = int(index[~valid][0])
        raise ToolkitFormatError(f"{where}: column 'index' must number the faces 0..{n - 1}, found {bad}")
    rows[index] = np.arange(n)
    if (rows < 0).any():
        missing = int(np.nonzero(rows < 0)[0][0])
        raise ToolkitFormatError(f"{where}: column 'index' repeats values; index {missing} is missing")
    return rows


def open_toolkit_set(path: str | os.PathLike) -> ToolkitSet:
    """Open a toolkit set and tell its kind: ``is_same`` column -> verification; otherwise ``metadata.pt``
    decides (IJB keys -> ijb, TinyFace keys -> tinyface)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"toolkit set not found: {path}")
    if not is_toolkit_dataset(path):
        raise ToolkitFormatError(
            f"{path}: not a `save_to_disk` dataset folder (no state.json/dataset_info.json)"
        )
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ToolkitFormatError(f"{path}: cannot open the dataset ({exc})") from None
    if not isinstance(ds, datasets.Dataset):
        raise ToolkitFormatError(f"{path}: expected one dataset, found a {type(ds).__name__} (splits)")
    missing = [c for c in ("image", "index") if c not in ds.column_names]
    if missing:
        raise ToolkitFormatError(f"{path}: missing columns {missing} (columns: {ds.column_names})")
    index = np.asarray(ds.select_columns(["index"]).with_format("numpy")[:]["index"])
    rows = _row_order(index, path)
    meta_path = path / METADATA_FILE
    if "is_same" in ds.column_names:
        if len(rows) % 2:
            raise ToolkitFormatError(
                f"{path}: a verification set needs an even number of faces, got {len(rows)}"
            )
        return ToolkitSet(path=path, kind="verification", dataset=ds, rows=rows, metadata=None)
    if not meta_path.is_file():
        raise ToolkitFormatError(
            f"{path}: no 'is_same' column and no {METADATA_FILE}: not a verification, IJB or TinyFace set"
        )
    meta = read_toolkit_metadata(meta_path)
    for kind, keys in (("ijb", IJB_METADATA_KEYS), ("tinyface", TINYFACE_METADATA_KEYS)):
        if all(k in meta for k in keys):
            return ToolkitSet(path=path, kind=kind, dataset=ds, rows=rows, metadata=meta)
    raise ToolkitFormatError(
        f"{meta_path}: keys {sorted(map(str, meta))} are neither IJB {list(IJB_METADATA_KEYS)} "
        f"nor TinyFace {list(TINYFACE_METADATA_KEYS)}"
    )


def verification_pairs(ts: ToolkitSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of a verification set: faces ``2k`` and ``2k+1``, label ``is_same`` of face ``2k`` (both faces of
    a pair must carry the same label)."""
    same = ts.column("is_same").astype(bool)
    first, second = np.arange(0, len(ts), 2), np.arange(1, len(ts), 2)
    disagree = np.nonzero(same[first] != same[second])[0]
    if disagree.size:
        k = int(disagree[0])
        raise ToolkitFormatError(
            f"{ts.path}: faces {2 * k} and {2 * k + 1} form pair {k} but their is_same differ"
        )
    return first, second, same[first]


def _image_bytes(item, where: str) -> bytes:
    if isinstance(item, dict):
        if item.get("bytes"):
            return item["bytes"]
        if item.get("path") and Path(item["path"]).is_file():
            return Path(item["path"]).read_bytes()
    raise ToolkitFormatError(f"{where}: no encoded image bytes (got {type(item).__name__})")


def toolkit_face_source(
    ts: ToolkitSet, keypoint_source: str, landmarks: str | os.PathLike | None = None, *, backend=None
) -> FaceSource:
    """The faces of ``ts`` in index order, decoded per batch (112x112), keypoints from ``keypoint_source``
    (``file``: a ``idx,ldmk_0..ldmk_9`` CSV keyed by the ``index`` column; ``backend``: from ``backend``, a
    :class:`~kprpe.eval.landmarks.LandmarkBackend`, default dlib; ``template``)."""
    datasets = _datasets()
    images = ts.dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    keypoints = indexed_keypoints(
        keypoint_source, landmarks, len(ts), what="faces", index_name="index", error=ToolkitFormatError,
        backend=backend,
    )

    def load(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        rows = ts.rows[start:stop]
        contiguous = rows.size and rows[-1] - rows[0] == rows.size - 1 and np.all(np.diff(rows) == 1)
        batch = images[int(rows[0]) : int(rows[-1]) + 1] if contiguous else images[rows.tolist()]
        faces = np.stack(
            [
                decode_image(
                    _image_bytes(item, f"{ts.path} index {start + k}"), where=f"{ts.path} index {start + k}"
                )
                for k, item in enumerate(batch["image"])
            ]
        )
        return faces, keypoints(start, stop, faces)

    arrow = sorted(ts.path.glob("*.arrow"))
    fp = "toolkit:" + "|".join(file_fingerprint(p) for p in arrow) + f"|kp:{keypoint_source}"
    if keypoint_source == "backend":
        fp += backend_tag(backend)
    if landmarks is not None and keypoint_source == "file":
        fp += f"|{file_fingerprint(landmarks)}"
    return FaceSource(count=len(ts), load=load, fingerprint=fp)


def _ijb_result(
    ts: ToolkitSet, emb: np.ndarray, norms: np.ndarray, settings, use_norm: bool, use_detector_score: bool
) -> dict:
    """The toolkit's IJB arrays, checked, through the one IJB protocol (:func:`.runs.ijb_result`)."""
    from .runs import ijb_result

    meta, where = ts.metadata, ts.path / METADATA_FILE
    per_face = {k: metadata_array(meta, k, where) for k in ("templates", "medias", "faceness_scores")}
    for key, values in per_face.items():
        if values.size != len(ts):
            raise ToolkitFormatError(f"{where}: {key!r} has {values.size} entries for {len(ts)} faces")
    p1, p2 = metadata_array(meta, "p1", where, np.int64), metadata_array(meta, "p2", where, np.int64)
    label = metadata_array(meta, "label", where)
    if not (p1.size == p2.size == label.size):
        raise ToolkitFormatError(
            f"{where}: p1, p2 and label differ in length ({p1.size}, {p2.size}, {label.size})"
        )
    return ijb_result(
        emb,
        norms,
        template_ids=per_face["templates"].astype(np.int64),
        media_ids=per_face["medias"].astype(np.int64),
        detector_scores=per_face["faceness_scores"],
        pair_t1=p1,
        pair_t2=p2,
        labels=label.astype(bool),
        settings=settings,
        use_norm=use_norm,
        use_detector_score=use_detector_score,
    )


def evaluate_toolkit(
    handle,
    paths: Sequence[str | os.PathLike],
    settings,
    *,
    keypoint_source: str = "auto",
    landmarks: Sequence[str | os.PathLike | None] | None = None,
    ijb_use_norm: bool = False,
    ijb_use_detector_score: bool = True,
    ranks: Sequence[int] = (1, 5, 20),
) -> dict:
    """Every set under ``paths`` (toolkit sets, or folders of them such as ``facerec_val/``), each by its
    kind: verification (10-fold accuracy, TAR@FAR), IJB 1:1 (TAR@FAR), TinyFace (rank-k).

    IJB templates pool faces as the toolkit's headline number does (``Norm:False_Det:True``): unit face
    features weighted by detector score; ``ijb_use_norm`` keeps the feature norm too. ``landmarks[i]`` (a
    normalised ``idx,ldmk_0..ldmk_9`` CSV keyed by the ``index`` column) belongs to the i-th set found.
    """
    from .runs import embed_source, run_report, verification_result
    from .verification import pair_scores, resolve_keypoint_source

    folders = [s for p in paths for s in find_toolkit_sets(p)]
    names = [f.name for f in folders]
    if len(set(names)) != len(names):
        raise ToolkitFormatError(f"two toolkit sets share a name: {names}")
    landmarks = list(landmarks) if landmarks else [None] * len(folders)
    if len(landmarks) != len(folders):
        raise ToolkitFormatError(f"{len(landmarks)} landmark files for {len(folders)} toolkit sets ({names})")
    sets, kinds = {}, {}
    backend = getattr(settings, "landmark_backend", None)
    for folder, lm in zip(folders, landmarks, strict=True):
        ts = open_toolkit_set(folder)
        if getattr(settings, "calibrate_far", None) is not None and ts.kind == "tinyface":  # before any work
            raise ToolkitFormatError(
                f"{folder}: --calibrate needs verification pairs; {ts.name} is a TinyFace identification set"
            )
        kp_kind = resolve_keypoint_source(keypoint_source, lm, backend)
        source = toolkit_face_source(ts, kp_kind, lm, backend=backend)
        mode = f"prealigned:{kp_kind}"
        emb, norms, cached = embed_source(handle, source, settings, mode=mode, desc=ts.name)
        if ts.kind == "verification":
            first, second, labels = verification_pairs(ts)
            result = verification_result(pair_scores(emb, first, second), labels, settings)
        elif ts.kind == "ijb":
            result = _ijb_result(ts, emb, norms, settings, ijb_use_norm, ijb_use_detector_score)
        else:
            result = tinyface_toolkit_result(ts, emb, ranks)
        result.update(toolkit_kind=ts.kind, keypoint_source=kp_kind, embeddings_from_cache=cached)
        sets[ts.name] = result
        kinds[ts.name] = kp_kind
    return run_report("CVLface evaluation toolkit", handle, settings, mode="prealigned",
                      keypoint_source=kinds, sets=sets)


# ------------------------------------------------------------------ TinyFace (toolkit set or original
# folders)
def tinyface_toolkit_result(ts, features: np.ndarray, ranks: Sequence[int] = TINYFACE_RANKS) -> dict:
    """Rank-k on a toolkit TinyFace set (``ts``: an opened :class:`kprpe.eval.toolkit.ToolkitSet`), with
    ``features[i]`` the unit flip-summed feature of the face with index ``i``."""
    where = ts.path / METADATA_FILE
    lists = {k: metadata_strings(ts.metadata, k, where) for k in TINYFACE_METADATA_KEYS}
    if len(lists["image_paths"]) != len(ts):
        raise ToolkitFormatError(
            f"{where}: image_paths lists {len(lists['image_paths'])} images, the set has {len(ts)}"
        )
    # the faces' own names, in index order; the metadata's image_paths only when the set has no path column
    paths = [str(p) for p in ts.column("path")] if "path" in ts.dataset.column_names else lists["image_paths"]
    protocol = TinyFaceProtocol.from_paths(
        paths, lists["probe_paths"], lists["gallery_paths"], lists["distractor_paths"], where=str(ts.path)
    )
    return tinyface_identification(features, protocol, ranks)


def evaluate_tinyface(
    handle,
    path: str | os.PathLike,
    settings,
    *,
    keypoint_source: str = "auto",
    ranks: Sequence[int] = TINYFACE_RANKS,
    name: str | None = None,
) -> dict:
    """TinyFace rank-k from a CVLface toolkit folder or an original ``Testing_Set`` folder (Probe/,
    Gallery_Match/, Gallery_Distractor/; images taken as pre-aligned crops and resized to 112)."""
    from .images import image_face_source
    from .runs import embed_source, run_report
    from .verification import resolve_keypoint_source

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"TinyFace folder not found: {path}")
    backend = getattr(settings, "landmark_backend", None)
    kp_kind = resolve_keypoint_source(keypoint_source, None, backend)
    if is_toolkit_dataset(path):
        ts = open_toolkit_set(path)
        if ts.kind != "tinyface":
            raise ToolkitFormatError(f"{path}: a {ts.kind} set, not TinyFace (use `kprpe eval toolkit`)")
        emb, _, cached = embed_source(
            handle, toolkit_face_source(ts, kp_kind, backend=backend), settings, mode=f"prealigned:{kp_kind}",
            desc=ts.name,
        )
        result = tinyface_toolkit_result(ts, emb, ranks)
        layout = "CVLface toolkit"
    elif is_tinyface_folder(path):
        probes, matches, distractors = tinyface_folder_lists(path)
        files = probes + matches + distractors
        source = image_face_source(files, [str(p) for p in files], keypoint_source=kp_kind, backend=backend)
        emb, _, cached = embed_source(handle, source, settings, mode=f"prealigned:{kp_kind}", desc=path.name)
        n_p, n_m = len(probes), len(matches)
        protocol = TinyFaceProtocol(
            probe_rows=np.arange(n_p),
            match_rows=np.arange(n_p, n_p + n_m),
            distractor_rows=np.arange(n_p + n_m, len(files)),
            probe_labels=np.array([tinyface_label(p) for p in probes], dtype=np.int64),
            match_labels=np.array([tinyface_label(p) for p in matches], dtype=np.int64),
        )
        result = tinyface_identification(emb, protocol, ranks)
        layout = "TinyFace folders"
    else:
        raise DataFormatError(
            f"{path}: neither a CVLface toolkit TinyFace set (save_to_disk folder) nor a TinyFace "
            f"test folder with {', '.join(TINYFACE_FOLDERS)}"
        )
    result.update(layout=layout, keypoint_source=kp_kind, embeddings_from_cache=cached)
    return run_report("TinyFace identification (rank-k)", handle, settings, mode="prealigned",
                      keypoint_source=kp_kind, sets={name or path.name: result})
