"""kprpe.streaming and kprpe.gallery work for any task: a pipeline that is not the face pipeline (here: one
"person" per bright photo, none in a dark one) streams, skips what it declares skippable, and enrols."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
from PIL import Image

from kprpe.errors import KprpeError
from kprpe.gallery.index import GalleryIndex, enrol_gallery
from kprpe.streaming.stream import stream_embeddings


class NoPerson(KprpeError):
    pass


class PersonPipeline:
    """Not a face pipeline: the 'crop' is the photo's mean colour; a dark photo has nobody in it."""

    skip_errors = (NoPerson,)
    all_faces = False

    def faces_in_image(self, image, source=None):
        if image.mean() < 10:
            raise NoPerson(f"nobody in {source}")
        crop = np.broadcast_to(image.reshape(-1, 3).mean(axis=0).astype(np.uint8), (4, 4, 3)).copy()
        keypoints = np.zeros((17, 2), np.float32)  # a body has 17 keypoints, not 5
        person = SimpleNamespace(
            box=None, source_keypoints=keypoints, keypoints=keypoints, score=None, image=crop
        )
        return [person]


class ColourEmbedder:
    batch_size = 2

    def embed_crops(self, crops, keypoints):
        assert keypoints.shape[1:] == (17, 2)
        vectors = crops.reshape(len(crops), -1, 3).mean(axis=1).astype(np.float64) + 1.0
        norms = np.linalg.norm(vectors, axis=1)
        return (vectors / norms[:, None]).astype(np.float32), norms


def _photos(folder, colours):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, colour in colours.items():
        path = folder / f"{name}.png"
        Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(path)
        paths.append(path)
    return paths


def test_a_non_face_pipeline_streams_and_skips_what_it_declares(tmp_path):
    paths = _photos(tmp_path, {"red": (200, 0, 0), "dark": (0, 0, 0), "green": (0, 200, 0)})
    stream = stream_embeddings(paths, pipeline=PersonPipeline(), embedder=ColourEmbedder(), progress=False)
    done = list(stream)
    assert [d.task.path for d in done] == [str(p) for p in paths]
    assert [len(d.rows) for d in done] == [1, 0, 1]
    assert "nobody in" in done[1].failure and done[0].failure is None
    np.testing.assert_allclose(np.linalg.norm(done[0].rows[0].embedding), 1.0, rtol=1e-6)


def test_a_non_face_gallery_enrols_through_the_one_enrolment(tmp_path):
    _photos(tmp_path / "gallery" / "alice", {"a1": (200, 0, 0), "a2": (190, 10, 0)})
    _photos(tmp_path / "gallery" / "nobody", {"n1": (0, 0, 0)})
    index = GalleryIndex(3, backend="numpy")
    failures = enrol_gallery(
        index, tmp_path / "gallery", pipeline=PersonPipeline(), embedder=ColourEmbedder(), progress=False
    )
    assert index.names == ["alice"] and index.count("alice") == 2
    assert {p.rsplit("/", 1)[-1] for p, _ in failures} == {"n1.png", "nobody"}


def test_streaming_and_gallery_import_no_task_and_no_torch():
    code = (
        "import sys, kprpe.streaming.shards, kprpe.gallery.index\n"
        "print(sorted(m for m in ('kprpe.face', 'kprpe.eval', 'torch') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
