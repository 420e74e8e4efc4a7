"""``kprpe embed --ray`` refuses what cannot work in one line, before any model is loaded and without
waiting for Ray: Ray not installed, an address nobody answers at, an input taken for the address, options
that belong to the other path. (The Ray runs themselves: tests/face/test_embed_ray.py.)"""

from __future__ import annotations

import contextlib
import math
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


class _FakeRay:
    """What RayRunner asks of Ray, recording what the job is submitted with (no Ray is started)."""

    def __init__(self, nodes: list[dict]) -> None:
        self._nodes = nodes
        self.submitted: dict = {}
        fake = self

        class Dataset:
            def map_batches(self, fn, **options):
                fake.submitted = options
                return self

            def iter_batches(self, **_):
                return iter([])

        context = SimpleNamespace(execution_options=SimpleNamespace())
        self.data = SimpleNamespace(
            DataContext=SimpleNamespace(get_current=lambda: context),
            from_items=lambda items, **_: Dataset(),
            ActorPoolStrategy=lambda size: ("actors", size),
        )

    def nodes(self) -> list[dict]:
        return self._nodes

    def cluster_resources(self) -> dict:
        total: dict = {}
        for node in self._nodes:
            for name, amount in node["Resources"].items():
                total[name] = total.get(name, 0) + amount
        return total


def _submit(monkeypatch, nodes, files: int = 20, **runner) -> dict:
    """Run a RayRunner on ``files`` photos against a fake cluster of ``nodes``: the options Ray gets."""
    from kprpe.streaming import ray_data
    from kprpe.streaming.stream import Completed, StreamStats

    fake = _FakeRay([{"Alive": True, "Resources": resources} for resources in nodes])
    monkeypatch.setattr(ray_data, "ray_session", lambda *a, **k: contextlib.nullcontext(fake))
    job = ray_data.RayRunner(pipeline_factory=object, embedder_factory=object, batch_size=1, **runner)
    assert list(job([Path(f"p{i}.jpg") for i in range(files)], Completed(), StreamStats())) == []
    return fake.submitted


def test_ray_gpus_reach_the_actor_options(monkeypatch):
    cluster = [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 2}]
    options = _submit(monkeypatch, cluster, num_gpus=0.5)
    assert options["num_gpus"] == 0.5 and options["num_cpus"] == 1
    assert options["compute"] == ("actors", 6)  # 3 GPUs, two actors on each; not the 16 CPUs
    options = _submit(monkeypatch, cluster, num_gpus=2, workers=1)
    assert options["num_gpus"] == 2 and options["compute"] == ("actors", 1)
    assert "num_gpus" not in _submit(monkeypatch, cluster)  # CPU actors, as before


@pytest.mark.parametrize(
    ("nodes", "runner", "message"),
    [
        ([{"CPU": 8}], {"num_gpus": 1}, "but the Ray cluster has none"),
        ([{"CPU": 8, "GPU": 1}] * 2, {"num_gpus": 2}, "no Ray node has that many (the most on one node: 1)"),
        ([{"CPU": 8, "GPU": 1}], {"num_gpus": 0.5, "workers": 3}, "give --ray-workers 2 or less"),
    ],
)
def test_gpus_the_cluster_cannot_give_are_refused_before_the_job(monkeypatch, nodes, runner, message):
    """Ray would keep such actors pending forever, waiting for a GPU that never comes."""
    from kprpe.streaming.ray_data import RayJobError

    with pytest.raises(RayJobError, match=re.escape(message)):
        _submit(monkeypatch, nodes, **runner)


@pytest.mark.parametrize("gpus", [-1.0, 1.5, math.inf, math.nan])
def test_ray_gpus_ray_cannot_schedule_are_refused(gpus):
    from kprpe.streaming.ray_data import RayJobError, RayRunner

    with pytest.raises(RayJobError, match="--ray-gpus must be 0, a fraction of one GPU"):
        RayRunner(pipeline_factory=object, embedder_factory=object, num_gpus=gpus)


def _runner_for(argv):
    from kprpe.cli.face import _ray_runner
    from kprpe.cli.main import build_parser

    return _ray_runner(build_parser().parse_args(["embed", "x.jpg", "--weights", WEIGHTS, "-o", "o", *argv]))


def test_with_ray_gpus_the_actors_model_is_built_on_cuda(monkeypatch):
    """The actors' factories build with --device cuda (Ray makes an actor's GPU its only cuda device)."""
    pytest.importorskip("ray.data")
    from kprpe.face.embedder import FaceEmbedder

    runner = _runner_for(["--ray", "--ray-gpus", "0.5"])
    assert runner.num_gpus == 0.5
    built = []
    monkeypatch.setattr(FaceEmbedder, "from_weights", lambda *a, **k: built.append(k["device"]))
    runner.embedder_factory()
    _runner_for(["--ray"]).embedder_factory()
    assert built == ["cuda", "cpu"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ray-gpus", "1"], "--ray-gpus needs --ray"),
        (["--ray", "--device", "cuda"], "--device cuda with --ray: the actors get no GPU from Ray"),
        (["--ray", "--ray-gpus", "1", "--device", "cuda:1"], "leave --device out"),
    ],
)
def test_devices_ray_does_not_schedule_are_refused(argv, message):
    pytest.importorskip("ray.data")
    from kprpe.errors import CommandError

    with pytest.raises(CommandError, match=re.escape(message)):
        _runner_for(argv)
