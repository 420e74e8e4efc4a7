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
