from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from kprpe.data.recordio import (
    RECORDIO_MAGIC,
    RecordHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    pack_record,
    unpack_record,
)


def _write(path, payloads):
    with RecordIOWriter(path) as w:
        for key, payload in payloads.items():
            w.write(key, payload)


def test_header_layout_matches_spec():
    payload = pack_record(RecordHeader(0, 7.0, 3, 4), b"JPEG")
    assert payload[:24] == struct.pack("<IfQQ", 0, 7.0, 3, 4) and payload[24:] == b"JPEG"
    vec = pack_record(RecordHeader(2, (5.0, 9.0)), b"xy")
    assert struct.unpack_from("<IfQQ", vec) == (2, 0.0, 0, 0)
    assert np.frombuffer(vec[24:32], "<f4").tolist() == [5.0, 9.0] and vec[32:] == b"xy"
    assert unpack_record(vec) == (RecordHeader(2, (5.0, 9.0)), b"xy")


def test_round_trip_random_access_and_file_layout(tmp_path):
    rec = tmp_path / "d.rec"
    payloads = {k: pack_record(RecordHeader(0, float(k)), bytes([k]) * (k + 1)) for k in range(7)}
    _write(rec, payloads)
    raw = rec.read_bytes()
    magic, lrec = struct.unpack_from("<II", raw, 0)
    assert magic == RECORDIO_MAGIC and lrec >> 29 == 0 and lrec & ((1 << 29) - 1) == len(payloads[0])
    lines = (tmp_path / "d.idx").read_text().splitlines()
    assert lines[0] == "0\t0" and len(lines) == 7
    assert all(int(line.split("\t")[1]) % 4 == 0 for line in lines)  # records are 4-byte aligned
    reader = RecordIOReader(rec)
    for key in (5, 0, 3, 6):
        header, data = reader.read_record(key)
        assert header.label == float(key) and data == bytes([key]) * (key + 1)


def test_continuation_parts_are_joined(tmp_path):
    rec = tmp_path / "split.rec"
    parts = [(1, b"abcde"), (2, b"fg"), (3, b"hijk")]
    with open(rec, "wb") as f:
        for flag, data in parts:
            f.write(
                struct.pack("<II", RECORDIO_MAGIC, (flag << 29) | len(data))
                + data
                + b"\0" * ((-len(data)) % 4)
            )
    (tmp_path / "split.idx").write_text("0\t0\n")
    assert RecordIOReader(rec).read(0) == b"abcdefghijk"


def test_damage_is_reported_with_key_and_offset(tmp_path):
    rec = tmp_path / "d.rec"
    _write(
        rec,
        {0: pack_record(RecordHeader(0, 0.0), b"a" * 40), 1: pack_record(RecordHeader(0, 1.0), b"b" * 40)},
    )
    raw = bytearray(rec.read_bytes())
    off1 = int((tmp_path / "d.idx").read_text().splitlines()[1].split("\t")[1])
    raw[off1] ^= 0xFF
    rec.write_bytes(bytes(raw))
    reader = RecordIOReader(rec)
    reader.read(0)
    with pytest.raises(RecordIOError, match=rf"key 1 at offset {off1}: bad magic"):
        reader.read(1)
    with pytest.raises(RecordIOError, match="key 9 is not in the index"):
        reader.read(9)
    rec.write_bytes(bytes(raw[: off1 + 12]))
    with pytest.raises(RecordIOError, match="key 1"):
        RecordIOReader(rec).read(1)


def test_bad_index_lines_name_the_line(tmp_path):
    (tmp_path / "d.rec").write_bytes(b"")
    (tmp_path / "d.idx").write_text("0\t0\nnot a line\n")
    with pytest.raises(RecordIOError, match=r"d.idx:2"):
        RecordIOReader(tmp_path / "d.rec")


def test_writer_leaves_nothing_when_the_block_fails(tmp_path):
    rec = tmp_path / "d.rec"
    with pytest.raises(RuntimeError):
        with RecordIOWriter(rec) as w:
            w.write(0, b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with RecordIOWriter(rec) as w:
        w.write(0, b"x")
        with pytest.raises(RecordIOError, match="written twice"):
            w.write(0, b"y")


class _ReadAll(Dataset):
    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, i):
        return torch.tensor(list(self.reader.read(i)[:8]))


def test_reader_is_safe_in_forked_dataloader_workers(tmp_path):
    rec = tmp_path / "d.rec"
    _write(rec, {k: bytes([k % 256]) * 64 for k in range(40)})
    reader = RecordIOReader(rec)
    reader.read(3)  # the parent opens its handle before forking
    reader = pickle.loads(pickle.dumps(reader))  # picklable (spawn-style workers)
    reader.read(5)
    loader = DataLoader(_ReadAll(reader), batch_size=4, num_workers=2, multiprocessing_context="fork")
    got = torch.cat([b for b in loader])
    assert got[:, 0].tolist() == [k % 256 for k in range(40)]
    assert reader.read(39)[0] == 39  # the parent's handle still works after the workers read


def test_writer_commits_the_pair_with_normal_permissions_and_no_temporaries(tmp_path):
    import os

    rec = tmp_path / "d.rec"
    _write(rec, {0: pack_record(RecordHeader(0, 1.0), b"a")})
    umask = os.umask(0)
    os.umask(umask)
    for path in (rec, tmp_path / "d.idx"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.idx", "d.rec"]


def test_a_failure_between_the_renames_never_leaves_a_mismatched_index(tmp_path, monkeypatch):
    import os

    rec = tmp_path / "d.rec"
    _write(rec, {k: pack_record(RecordHeader(0, float(k)), b"old" * k) for k in range(3)})
    real_replace = os.replace
    calls = []

    def replace_then_die(src, dst):
        calls.append(dst)
        if str(dst).endswith(".idx"):
            raise OSError("killed between the two renames")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(OSError, match="killed"):
        _write(rec, {k: pack_record(RecordHeader(0, float(k)), b"new-longer" * k) for k in range(5)})
    monkeypatch.setattr(os, "replace", real_replace)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # temporaries cleaned up
    with pytest.raises(RecordIOError, match="index file not found.*interrupted"):
        RecordIOReader(rec)  # the old index is gone: the new .rec is never read through it


def test_rewrite_keeps_the_length(tmp_path):
    rec = tmp_path / "d.rec"
    with RecordIOWriter(rec) as w:
        w.write(0, pack_record(RecordHeader(2, (0.0, 0.0))))
        w.write(1, pack_record(RecordHeader(0, 0.0), b"img"))
        with pytest.raises(RecordIOError, match="same length|keep that length"):
            w.rewrite(0, pack_record(RecordHeader(3, (1.0, 2.0, 3.0))))
        w.rewrite(0, pack_record(RecordHeader(2, (2.0, 3.0))))
    reader = RecordIOReader(rec)
    assert reader.index[0] == 0 and reader.read_header(0).label == (2.0, 3.0)
    assert reader.read_record(1)[1] == b"img"


@pytest.mark.parametrize("label", [float("nan"), float("inf"), 2.5])
def test_bad_labels_are_bad_samples_not_crashes(tmp_path, label):
    import cv2

    from kprpe.data.dataset import DataError, FaceDataset, RecordSource

    ok, jpg = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    rec = tmp_path / "d.rec"
    _write(rec, {
        0: pack_record(RecordHeader(2, (3.0, 4.0))),
        1: pack_record(RecordHeader(0, 0.0), jpg.tobytes()),
        2: pack_record(RecordHeader(0, label), jpg.tobytes()),
        3: pack_record(RecordHeader(2, (1.0, 3.0))),
    })
    source = RecordSource(rec)
    with pytest.raises(DataError, match="not a whole class number"):
        source.get(1)
    replaced = FaceDataset(source, image_size=8, on_error="replace")[1]
    assert not bool(replaced["valid"])
    assert bool(FaceDataset(source, image_size=8, on_error="replace")[0]["valid"])
    with pytest.raises(DataError, match="not a whole class number"):
        FaceDataset(source, image_size=8, on_error="raise")[1]


@pytest.mark.parametrize("header", [(float("nan"), 4.0), (2.0, 2e8)])
def test_damaged_header_record_is_refused_before_anything_is_sized(tmp_path, header):
    from kprpe.data.dataset import DataError, RecordSource

    rec = tmp_path / "d.rec"
    _write(rec, {0: pack_record(RecordHeader(2, header)), 1: pack_record(RecordHeader(0, 0.0), b"x"),
                 2: pack_record(RecordHeader(2, (1.0, 2.0)))})
    with pytest.raises(DataError, match="header record 0"):
        RecordSource(rec)
