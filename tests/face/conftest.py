"""Shared fixtures: the astronaut photo, one dlib detector and its detection, the tiny reference weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "fixtures"
TINY_WEIGHTS = DATA / "tiny_kprpe.safetensors"


def run_cli(capsys, *argv) -> tuple[int, dict | None, str]:
    """Run ``kprpe ARGV`` in-process: exit status, the JSON it printed (None if nothing), its stderr."""
    import json

    from kprpe.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


# Hand-checked on skimage.data.astronaut() by looking at 5x / 10x enlargements with a pixel grid:
# pupils/eye centres, the nose tip, and the corners where upper and lower lip meet (x, y in pixels).
ASTRONAUT_KEYPOINTS = np.array(
    [[203.0, 102.0], [246.0, 104.0], [224.0, 126.0], [203.0, 140.0], [244.0, 141.0]], dtype=np.float64
)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()


@pytest.fixture(scope="session")
def dlib_detector():
    pytest.importorskip("dlib")
    from kprpe.face import DlibDetector

    return DlibDetector()


@pytest.fixture(scope="session")
def astronaut_detection(dlib_detector, astronaut):
    faces = dlib_detector.detect(astronaut)
    assert len(faces) == 1
    return faces[0]


@pytest.fixture(scope="session")
def embedder():
    from kprpe.face import FaceEmbedder

    return FaceEmbedder.from_weights(TINY_WEIGHTS)


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory, astronaut) -> Path:
    """astronaut.png plus a rotated JPEG of it."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(astronaut).save(folder / "astronaut.png")
    Image.fromarray(astronaut).rotate(15, expand=True, resample=Image.BILINEAR).save(
        folder / "tilted.jpg", quality=95
    )
    return folder


@pytest.fixture(scope="session")
def three_photos(tmp_path_factory, astronaut) -> Path:
    """Three photos with one face each (the astronaut, mirrored, and tilted)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("three")
    Image.fromarray(astronaut).save(folder / "a.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(folder / "b.png")
    Image.fromarray(astronaut).rotate(10, resample=Image.BILINEAR).save(folder / "c.png")
    return folder


def _face(astronaut: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(astronaut[0:300, 80:380])  # one face, small enough to detect fast


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory, astronaut):
    """Eight different photos of one face (shifted, flipped, darker), so each has its own embedding."""
    folder = tmp_path_factory.mktemp("many")
    face = _face(astronaut)
    for i in range(8):
        variant = np.roll(face, 6 * i, axis=1)
        if i % 2:
            variant = variant[:, ::-1]
        variant = np.clip(variant.astype(np.int16) - 8 * i, 0, 255).astype(np.uint8)
        Image.fromarray(np.ascontiguousarray(variant)).save(folder / f"p{i}.png")
    return folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory, astronaut):
    """A 2 s video at 10 fps of the face drifting sideways (H.264 when available, else MPEG-4)."""
    av = pytest.importorskip("av")
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    face = _face(astronaut)[:256, :256]
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 256, 256, "yuv420p"
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(np.roll(face, 2 * i, axis=1)), format="rgb24"
            )
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _write_times(path, times: list[float], face: np.ndarray) -> None:
    """An MJPEG video of the face drifting sideways, a frame at each of ``times`` seconds."""
    import fractions

    av = pytest.importorskip("av")
    base = fractions.Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = face.shape[1], face.shape[0], "yuvj420p"
        stream.time_base = base
        for i, seconds in enumerate(times):
            image = np.ascontiguousarray(np.roll(face, 2 * i, axis=1))
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = int(round(seconds * 1000)), base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def gap_clip(tmp_path_factory, astronaut):
    """1 s of face at 10 fps, then nothing for 5 s, then 1 s more (sampled at 4 fps in segments of 2
    frames, segments 2 to 11 hold no frame)."""
    path = tmp_path_factory.mktemp("gap") / "gap.mkv"
    times = [i / 10 for i in range(10)] + [6 + i / 10 for i in range(10)]
    _write_times(path, times, _face(astronaut)[:256, :256])
    return path


@pytest.fixture
def old_crops_alive(monkeypatch) -> list[int]:
    """Runs every FacePipeline.iter_batches one photo per chunk and records, each time the caller asks for
    the next chunk, how many crops of chunks two or more back are still alive. A caller that writes or
    embeds each chunk and lets it go keeps this at 0 (it may still hold the chunk it just finished)."""
    import gc
    import weakref

    from kprpe.face.pipeline import FacePipeline

    original = FacePipeline.iter_batches
    alive: list[int] = []

    def watched(self, inputs, *, progress=True):
        self.batch_size = 1
        refs: list[list[weakref.ref]] = []
        for part in original(self, inputs, progress=progress):
            gc.collect()
            alive.append(sum(ref() is not None for chunk in refs[:-1] for ref in chunk))
            refs.append([weakref.ref(record.face) for record in part.records])
            yield part

    monkeypatch.setattr(FacePipeline, "iter_batches", watched)
    return alive
