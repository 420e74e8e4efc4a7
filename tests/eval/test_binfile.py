from __future__ import annotations

import os
import pickle

import cv2
import numpy as np
import pytest

from kprpe.eval.binfile import (
    BinFormatError,
    UnsafePickleError,
    read_verification_bin,
    restricted_loads,
    write_verification_bin,
)
from kprpe.images import ImageLoadError, decode_image


def _png(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def test_bin_round_trip(tmp_path):
    images = [_png(i) for i in range(8)]
    issame = [True, False, True, False]
    path = tmp_path / "tiny.bin"
    write_verification_bin(path, images, issame)
    vb = read_verification_bin(path)
    assert vb.name == "tiny" and vb.num_pairs == 4 and len(vb) == 8
    np.testing.assert_array_equal(vb.issame, issame)
    assert vb.encoded_images == images
    decoded = decode_image(vb.encoded_images[3])
    expected = cv2.cvtColor(
        cv2.imdecode(np.frombuffer(images[3], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
    )
    np.testing.assert_array_equal(decoded, expected)


def test_old_protocol_bytes_are_accepted(tmp_path):
    # Python 3 bytes at protocol 2 go through _codecs.encode(str, 'latin1'): the one global we allow
    images = [_png(0), _png(1)]
    path = tmp_path / "p2.bin"
    path.write_bytes(pickle.dumps((images, [True]), protocol=2))
    assert b"_codecs" in path.read_bytes()
    assert read_verification_bin(path).encoded_images == images


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_side_effects(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_RunsCode(marker), b"x"], [True])))
    with pytest.raises(
        UnsafePickleError, match=r"evil\.bin.*refusing to load global '(posix|os|nt)\.system'"
    ):
        read_verification_bin(path)
    assert not marker.exists()
    # the same file *would* run code through plain pickle: the test is meaningful
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("payload", [
    lambda: pickle.dumps(eval),  # noqa: B023  (a global builtin)
    lambda: b"c__builtin__\neval\n(S'1'\ntR.",  # hand-written protocol-0 REDUCE on eval
    lambda: pickle.dumps(np.zeros(3)),  # arrays are not part of the format either
])
def test_any_global_is_refused(payload):
    with pytest.raises(UnsafePickleError):
        restricted_loads(payload())


def test_codecs_encode_with_other_codec_is_refused():
    data = (
        b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x06\x00\x00\x00rot_13q\x02\x86q\x03Rq\x04."
    )
    with pytest.raises(UnsafePickleError, match="rot_13"):
        restricted_loads(data)


@pytest.mark.parametrize("obj, message", [
    ({"a": 1}, "expected a pair"),
    (([b"x", b"y", b"z"], [True]), "3 images for 1 pairs"),
    (([b"x", 5], [True]), "image 1 is int"),
    (([b"x", b"y"], ["yes"]), r"issame\[0\]"),
    (([], []), "no pairs"),
])
def test_structure_errors(tmp_path, obj, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(BinFormatError, match=message):
        read_verification_bin(path)


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes(pickle.dumps(([_png(0), _png(1)], [True]))[:50])
    with pytest.raises(BinFormatError, match="not a readable pickle"):
        read_verification_bin(path)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_verification_bin(tmp_path / "nope.bin")
    with pytest.raises(ImageLoadError, match="cannot decode"):
        decode_image(b"not an image", where="x.bin image 0")


def test_a_buffer_referenced_many_times_is_held_once(tmp_path):
    """A 1 MB protocol-5 pickle naming one bytearray 4,000 times must not become 4,000 copies (4 GB)."""
    import pickle

    import numpy as np

    from kprpe.eval.binfile import read_verification_bin

    big = bytearray(b"\xff\xd8" + bytes(1_000_000))
    path = tmp_path / "refs.bin"
    path.write_bytes(pickle.dumps(([big] * 4000, [True] * 2000), protocol=5))
    assert path.stat().st_size < 1_100_000
    vb = read_verification_bin(path)
    assert len(vb) == 4000 and vb.issame.all() and isinstance(vb.encoded_images[0], bytes)
    assert len({id(b) for b in vb.encoded_images}) == 1
    assert np.frombuffer(vb.encoded_images[3999], np.uint8)[:2].tolist() == [0xFF, 0xD8]


@pytest.mark.parametrize("protocol", [2, 5])
def test_numpy_arrays_only_when_asked(protocol):
    """Verification .bin files stay array-free; MNIST's pickle (kprpe.experiments.mnist_data) may hold plain
    arrays, under NumPy 1 and 2 module names and both pickle encodings of an array."""
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([3, 1], np.int64))
    data = pickle.dumps(arrays, protocol=protocol)
    with pytest.raises(UnsafePickleError, match="refusing to load global 'numpy"):
        restricted_loads(data)
    loaded = restricted_loads(data, numpy_arrays=True)
    for got, want in zip(loaded, arrays, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype
    old_name = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # as NumPy 1 wrote it
    if old_name != data:
        np.testing.assert_array_equal(restricted_loads(old_name, numpy_arrays=True)[0], arrays[0])
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        restricted_loads(pickle.dumps(eval), numpy_arrays=True)
