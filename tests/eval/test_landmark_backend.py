"""The landmark backend (dlib or the DFA aligner) belongs to one run, not to the process.

It was a module global set by ``set_landmark_backend``: after a ``kprpe eval ... --aligner dfa`` run (or one
that failed to load the DFA), every later evaluation in the same process (a notebook, a test, a server) found
its ``backend`` keypoints with that DFA and keyed its cache with the DFA's tag, and two threads could swap the
aligner between a set's cache key and its keypoints."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kprpe.cli import main
from kprpe.eval.binfile import read_verification_bin
from kprpe.eval.verification import bin_face_source

from .conftest import REPO, TINY_KPRPE
from .test_sources import _tiny_bin

pytestmark = pytest.mark.skipif(
    not __import__("kprpe.eval.landmarks", fromlist=["x"]).face_backend_available(),
    reason="kprpe.face / dlib not installed",
)


@pytest.fixture(scope="module")
def dfa_folder(tmp_path_factory):
    """The reference (random) DFA weights laid out as the official checkpoint: pretrained_model/model.pt."""
    folder = tmp_path_factory.mktemp("dfa")
    (folder / "pretrained_model").mkdir()
    weights = load_file(REPO / "tests" / "fixtures" / "dfa" / "dfa_weights.safetensors")
    torch.save(weights, folder / "pretrained_model" / "model.pt")
    return folder


def _default_backend_keypoints(path):
    """What a library evaluation given no backend finds: its cache key and the keypoints of two faces."""
    source = bin_face_source(read_verification_bin(path), path, "backend")
    return source.fingerprint, source.load(0, 2)[1]


@pytest.mark.parametrize("dfa_loads", [True, False])
def test_a_dfa_run_leaves_later_evaluations_on_the_default_backend(dfa_loads, dfa_folder, tmp_path, capsys):
    path = _tiny_bin(tmp_path)
    fingerprint, keypoints = _default_backend_keypoints(path)
    aligner = str(dfa_folder) if dfa_loads else str(tmp_path / "missing")
    argv = ["eval", "verify", "--weights", str(TINY_KPRPE), "--bin", str(path), "--keypoints", "backend",
            "--aligner", "dfa", "--aligner-weights", aligner, "-o", str(tmp_path / "run"), "--no-cache",
            "--quiet"]
    assert main(argv) == (0 if dfa_loads else 2), capsys.readouterr().err
    after_fingerprint, after_keypoints = _default_backend_keypoints(path)
    assert after_fingerprint == fingerprint and "aligner" not in after_fingerprint
    np.testing.assert_array_equal(after_keypoints, keypoints)


def test_two_backends_in_one_process_keep_their_own_keypoints_and_cache_keys(dfa_folder, tmp_path):
    """Sources built with different backends, loaded interleaved: each uses its own."""
    from kprpe.eval.landmarks import LandmarkBackend

    path = _tiny_bin(tmp_path)
    vb = read_verification_bin(path)
    dfa = LandmarkBackend("dfa", weights=str(dfa_folder))
    with_dfa = bin_face_source(vb, path, "backend", backend=dfa)
    with_dlib = bin_face_source(vb, path, "backend", backend=LandmarkBackend())
    assert with_dfa.fingerprint != with_dlib.fingerprint and "aligner:dfa" in with_dfa.fingerprint
    dlib_kp = with_dlib.load(0, 2)[1]
    dfa_kp = with_dfa.load(0, 2)[1]
    np.testing.assert_array_equal(dfa_kp, dfa.landmarks(with_dfa.load(0, 2)[0]))
    np.testing.assert_array_equal(with_dlib.load(0, 2)[1], dlib_kp)
    assert not np.allclose(dfa_kp, dlib_kp)


def test_a_backend_loads_once_across_threads(monkeypatch):
    from kprpe.eval.landmarks import LandmarkBackend
    from kprpe.face import dfa_backend

    calls, gate = [], threading.Barrier(4)

    def slow_load(weights, **kwargs):  # slow enough for the other threads to arrive while it loads
        calls.append(weights)
        time.sleep(0.05)
        return object()

    monkeypatch.setattr(dfa_backend, "load_dfa_backend", slow_load)
    backend = LandmarkBackend("dfa", weights="w")
    loaded = []

    def worker():
        gate.wait()
        loaded.append(backend.load())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["w"] and len({id(x) for x in loaded}) == 1


def test_an_unknown_aligner_is_refused():
    from kprpe.eval.landmarks import LandmarkBackend

    with pytest.raises(ValueError, match="'dlib' or 'dfa', got 'mtcnn'"):
        LandmarkBackend("mtcnn")


def test_the_0_4_set_landmark_backend_still_works_with_a_warning(monkeypatch):
    """Removed as a process-wide switch; kept until 0.5 for scripts that call it, with a warning."""
    import kprpe.eval.landmarks as landmarks

    monkeypatch.setattr(landmarks, "_DEPRECATED_CHOICE", [])
    assert landmarks.backend_tag() == ""
    with pytest.warns(FutureWarning, match="set_landmark_backend is deprecated"):
        landmarks.set_landmark_backend("dfa", weights="w.safetensors")
    assert landmarks.backend_tag() == "|aligner:dfa:w.safetensors"
    # an explicit per-run backend is never overridden by it
    assert landmarks.backend_tag(landmarks.LandmarkBackend()) == ""
    with pytest.raises(ValueError, match="'dlib' or 'dfa'"), pytest.warns(FutureWarning):
        landmarks.set_landmark_backend("nope")
