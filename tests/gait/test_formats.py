"""The OpenGait layout reader: numpy-only unpickling and the checks of load_sequence."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from kprpe.errors import KprpeError
from kprpe.gait import GaitFormatError, UnsafePickleError, dump_array_pickle, load_array_pickle, load_sequence

from .conftest import evil_pickle, write_sequence


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64, np.int64, bool])
def test_arrays_round_trip_every_protocol(tmp_path, protocol, dtype):
    array = (np.arange(2 * 64 * 44).reshape(2, 64, 44) % 7).astype(dtype)
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps(array, protocol=protocol))
    loaded = load_array_pickle(path)
    assert loaded.dtype == array.dtype and np.array_equal(loaded, array)


def test_fortran_order_and_writer(tmp_path):
    array = np.asfortranarray(np.random.default_rng(0).normal(size=(3, 17, 3)))
    for protocol in (4, 5):
        (tmp_path / f"f{protocol}.pkl").write_bytes(pickle.dumps(array, protocol=protocol))
        assert np.array_equal(load_array_pickle(tmp_path / f"f{protocol}.pkl"), array)
    dump_array_pickle(tmp_path / "w.pkl", array)
    assert np.array_equal(pickle.loads((tmp_path / "w.pkl").read_bytes()), array)  # OpenGait can read it


def test_code_in_a_pickle_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(evil_pickle(marker))
    with pytest.raises(UnsafePickleError, match="refusing to load global") as info:
        load_array_pickle(path)
    assert not marker.exists()
    assert str(path) in str(info.value) and isinstance(info.value, KprpeError)


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"sils": 1}, "expected one numpy array, got dict"),
        ([np.zeros(3)], "expected one numpy array, got list"),
        (np.array(["a", "b"]), "only bool, integer and float"),
        (np.array([object()], dtype=object)[:0], "only bool, integer and float"),
        (np.zeros(2, dtype=[("x", "f4")]), "refusing"),
        (np.float32(1.0), "refusing to load global"),  # a numpy scalar is not an array
    ],
)
def test_anything_but_a_numeric_array_is_refused(tmp_path, obj, message):
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(GaitFormatError, match=message):
        load_array_pickle(path)


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "t.pkl"
    path.write_bytes(pickle.dumps(np.zeros((4, 64, 44), np.uint8))[:-20])
    with pytest.raises(GaitFormatError, match="not a readable array pickle"):
        load_array_pickle(path)
    with pytest.raises(GaitFormatError, match="cannot read"):
        load_array_pickle(tmp_path / "none.pkl")


def test_load_sequence_reads_modalities_in_name_order(tmp_path):
    write_sequence(tmp_path / "s", frames=6)
    arrays = load_sequence(tmp_path / "s")
    assert list(arrays) == ["pose", "sils"]
    assert arrays["sils"].shape == (6, 64, 44) and arrays["pose"].shape == (6, 17, 3)


def test_mismatched_frame_counts(tmp_path):
    write_sequence(tmp_path / "s", frames=6, pose_frames=5)
    with pytest.raises(GaitFormatError, match=r"differ in frame count \(pose: 5, sils: 6\)"):
        load_sequence(tmp_path / "s")


def test_empty_sequences(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(GaitFormatError, match="empty sequence"):
        load_sequence(tmp_path / "none")
    dump_array_pickle(tmp_path / "zero" / "sils.pkl", np.zeros((0, 64, 44), np.uint8))
    with pytest.raises(GaitFormatError, match="'sils' is empty"):
        load_sequence(tmp_path / "zero")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p.__setitem__((2, 3, 0), np.nan), "NaN/inf"),
        (lambda p: p.__setitem__((0, 1, 2), -0.5), "negative"),
        (lambda p: p.__setitem__((1, 4, 0), 400.0), "far outside the 64x44 silhouette frame"),
    ],
)
def test_bad_keypoints(tmp_path, edit, message):
    write_sequence(tmp_path / "s", frames=4)
    pose = load_array_pickle(tmp_path / "s" / "pose.pkl")
    edit(pose)
    dump_array_pickle(tmp_path / "s" / "pose.pkl", pose)
    with pytest.raises(GaitFormatError, match=message):
        load_sequence(tmp_path / "s")


def test_out_of_frame_joint_with_zero_confidence_is_allowed(tmp_path):
    write_sequence(tmp_path / "s", frames=4)
    pose = load_array_pickle(tmp_path / "s" / "pose.pkl")
    pose[1, 4] = (400.0, -300.0, 0.0)  # an undetected joint: its position means nothing
    dump_array_pickle(tmp_path / "s" / "pose.pkl", pose)
    assert load_sequence(tmp_path / "s")["pose"][1, 4, 0] == 400.0


def test_unconfident_joints_far_above_an_occluded_frame_are_allowed(tmp_path):
    # synthetic walkers hit this: an occluder hid the upper body, the pretreatment stretched the visible legs
    # to 64 rows, and the hidden head's low-confidence guesses landed ~115 px above the frame
    write_sequence(tmp_path / "s", frames=4)
    pose = load_array_pickle(tmp_path / "s" / "pose.pkl")
    pose[2, :6] = (49.0, -115.0, 0.27)
    dump_array_pickle(tmp_path / "s" / "pose.pkl", pose)
    assert load_sequence(tmp_path / "s")["pose"][2, 0, 1] == -115.0
    pose[2, 0, 2] = 0.5  # the same position with a confident joint is still refused
    dump_array_pickle(tmp_path / "s" / "pose.pkl", pose)
    with pytest.raises(GaitFormatError, match="far outside"):
        load_sequence(tmp_path / "s")


def test_links_leaving_the_root_are_refused(tmp_path):
    outside = write_sequence(tmp_path / "outside" / "seq", frames=3)
    root = tmp_path / "root"
    (root / "0001" / "t").mkdir(parents=True)
    os.symlink(outside, root / "0001" / "t" / "v")
    with pytest.raises(GaitFormatError, match="leaves the data root"):
        load_sequence(root / "0001" / "t" / "v", root=root)
    (root / "0002" / "t" / "v").mkdir(parents=True)
    os.symlink(outside / "sils.pkl", root / "0002" / "t" / "v" / "sils.pkl")
    with pytest.raises(GaitFormatError, match="leaves the data root"):
        load_sequence(root / "0002" / "t" / "v", root=root)
    assert (
        load_sequence(root / "0001" / "t" / "v")["sils"].shape[0] == 3
    )  # without a root: no containment rule
