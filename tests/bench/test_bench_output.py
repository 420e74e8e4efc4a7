"""kprpe bench follows the one output rule: it never replaces a file it did not write without --overwrite."""

from __future__ import annotations

import json

from kprpe.cli import bench, main


def test_bench_refuses_a_file_it_did_not_write_before_any_work(tmp_path, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "run_suite", lambda *a, **k: ran.append(1) or [])
    precious = tmp_path / "notes.json"
    precious.write_text('{"mine": 1}')
    assert main(["bench", "--smoke", "-o", str(precious)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert precious.read_text() == '{"mine": 1}' and not ran


def test_bench_replaces_its_own_result_file_and_others_only_with_overwrite(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_suite", lambda *a, **k: [])
    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["written_by"] == bench.BENCH_MARKER
    assert main(["bench", "--smoke", "-o", str(out)]) == 0  # its own file: replaced without --overwrite
    other = tmp_path / "other.json"
    other.write_text("{}")
    assert main(["bench", "--smoke", "-o", str(other), "--overwrite"]) == 0
    assert json.loads(other.read_text())["written_by"] == bench.BENCH_MARKER
