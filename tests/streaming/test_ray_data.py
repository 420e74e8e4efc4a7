"""``kprpe embed --ray`` refuses what cannot work in one line, before any model is loaded and without
waiting for Ray: Ray not installed, an address nobody answers at, an input taken for the address, options
that belong to the other path. (The Ray runs themselves: tests/face/test_embed_ray.py.)"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from kprpe.cli import main

WEIGHTS = "tests/fixtures/tiny_kprpe.safetensors"


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(["embed", *argv])
    return code, capsys.readouterr().err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kprpe embed: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_without_ray_the_error_names_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    code, err = _run(capsys, str(tmp_path), "--weights", WEIGHTS, "-o", str(tmp_path / "o.parquet"), "--ray")
    assert code == 2
    assert "pip install 'kprpe[ray]'" in _one_line_error(err)
    assert not (tmp_path / "o.parquet").exists()


def _closed_port() -> int:
    with socket.socket() as probe:  # a port that was free a moment ago: nobody listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_address_nobody_answers_at_is_refused_at_once(capsys, tmp_path):
    """Ray itself retries such an address for minutes; the command says so in one line instead."""
    pytest.importorskip("ray.data")
    address = f"127.0.0.1:{_closed_port()}"
    out = tmp_path / "o.parquet"
    code, err = _run(capsys, str(tmp_path), "--weights", WEIGHTS, "-o", str(out), "--ray", address)
    assert code == 2
    line = _one_line_error(err)
    assert f"cannot reach Ray at '{address}'" in line and "ray start --head" in line
    assert not out.exists()


def test_an_input_taken_for_the_address_is_named(capsys, tmp_path):
    """``--ray`` takes an optional ADDRESS: ``--ray photos/ more/`` would make photos/ the address."""
    pytest.importorskip("ray.data")
    (tmp_path / "photos").mkdir()
    argv = ["--ray", str(tmp_path / "photos"), str(tmp_path), "--weights", WEIGHTS, "-o", str(tmp_path / "o")]
    code, err = _run(capsys, *argv)
    assert code == 2
    line = _one_line_error(err)
    assert "is not a Ray address" in line and "put --ray after the inputs" in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ray-workers", "2"], "--ray-workers needs --ray"),
        (["--ray", "--workers", "2"], "with --ray, give --ray-workers"),
        (["--ray", "--ray-workers", "0"], "--ray-workers must be positive"),
    ],
)
def test_options_of_the_other_path_are_refused(capsys, tmp_path, argv, message):
    if "--ray" in argv:
        pytest.importorskip("ray.data")
    code, err = _run(capsys, str(tmp_path), "--weights", WEIGHTS, "-o", str(tmp_path / "o.parquet"), *argv)
    assert code == 2 and message in _one_line_error(err)


def test_import_kprpe_and_a_local_embed_do_not_load_ray():
    code = (
        "import sys, kprpe, kprpe.streaming.shards, kprpe.cli.face, kprpe.streaming.ray_data; "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_partly_done_video_travels_to_the_actors_with_what_is_done():
    """Actors get the resume state of the files they are given (Completed.subset), nothing else."""
    from kprpe.streaming.stream import Completed, file_key

    done = Completed()
    done.add(file_key("a.jpg"), -1, 1, True, 1)
    done.add(file_key("v.mp4"), 0, 3, False, 16, next_segment=4)  # a time gap: segments 1-3 are empty
    done.add(file_key("w.mp4"), 0, 2, False, 16)
    part = done.subset([file_key("v.mp4")])
    assert part.stills == set() and set(part.segments) == {file_key("v.mp4")}
    assert part.jumps == {file_key("v.mp4"): {0: 4}} and part.video_rows == {file_key("v.mp4"): 3}
    done.add(file_key("v.mp4"), 4, 1, True, 5)
    assert 4 not in part.segments[file_key("v.mp4")]  # a copy: later additions to the whole stay there
    assert not part.file_done("v.mp4")
    part.add(file_key("v.mp4"), 4, 1, True, 5)
    assert part.file_done("v.mp4") and done.file_done("v.mp4")
