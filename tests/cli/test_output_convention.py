"""The one output convention (docs/cli.md) in the commands that used to print their own plain-text reports:
``kprpe train`` (face and gait), ``bench``, ``experiment digits``, ``experiment gait``, ``gait pack``,
``gait make-synthetic`` and ``eval gait``. Under pytest stdout is a pipe: exactly one line of compact JSON;
the ``terminal`` fixture (tests/conftest.py) gives the human summary. Each run is the smallest that exists."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kprpe.cli import build_parser, main
from kprpe.gait import load_sequence

ROOT = Path(__file__).resolve().parents[2]


def _one_json_line(out: str) -> dict | list:
    """stdout on a pipe: one line of JSON and nothing else (progress, logs and notices go to stderr)."""
    assert out.count("\n") == 1 and out.endswith("\n"), out[:2000]
    return json.loads(out)


@pytest.fixture(autouse=True)
def _few_threads(one_torch_thread):
    """Training here runs on one thread (the machine is shared)."""


# ----------------------------------------------------------------------------------------------- train


def _face_config(tmp_path: Path, synthetic_data: dict) -> Path:
    """Two optimiser steps of a tiny KP-RPE ViT on 32x32 synthetic faces, with its progress bar on."""
    config = {
        "model": {"name": "vit_tiny_kprpe", "overrides": {"img_size": 32, "patch_size": 8}},
        "data": {
            "train": str(synthetic_data["rec"]),
            "landmarks": str(synthetic_data["landmarks"]),
            "batch_size": 16,
            "num_workers": 0,
        },
        "head": {"type": "adaface", "scale": 16},
        "train": {
            "max_steps": 2,
            "log_every": 1,
            "checkpoint_every": 0,
            "tensorboard": False,
            "progress": True,
            "output_dir": str(tmp_path / "run"),
        },
    }
    path = tmp_path / "face.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_face_prints_one_json_line_on_a_pipe_and_a_summary_on_a_terminal(
    tmp_path, capsys, monkeypatch, synthetic_data
):
    config = _face_config(tmp_path, synthetic_data)
    assert main(["train", str(config)]) == 0
    captured = capsys.readouterr()
    result = _one_json_line(captured.out)
    run = tmp_path / "run"
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert result["task"] == "face" and result["steps"] == 2 and result["output"] == str(run)
    assert result["model"] == str(run / "model.safetensors") and Path(result["model"]).is_file()
    assert result["loss"] == logged[-1]["loss"] and result["validation"] is None
    assert str(run / "log.jsonl") in result["files"] and "results" not in result
    assert "train" in captured.err  # the progress bar: on stderr, never between the JSON and its reader

    monkeypatch.setattr("kprpe.cli.options.stdout_is_terminal", lambda: True)
    assert main(["train", str(config), "train.output_dir=" + str(tmp_path / "again"), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("trained 2 steps; final loss ")
    assert f"model: {tmp_path / 'again' / 'model.safetensors'}" in captured.out
    assert captured.err == ""  # -q: no progress bar


def _gait_train_argv(walkers: Path, output_dir: Path, *changes: str) -> list[str]:
    """``kprpe train`` with the shipped configs/gait_tiny.yaml on tiny walkers (short clips, P x K 2 x 2)."""
    return [
        "train",
        str(ROOT / "configs" / "gait_tiny.yaml"),
        f"data.root={walkers}",
        f"data.partition={walkers / 'partition.json'}",
        "data.frames=6",
        "data.skip=2",
        "data.ids_per_batch=2",
        "train.log_every=1",
        "train.checkpoint_every=2",
        f"train.output_dir={output_dir}",
        *changes,
    ]


@pytest.fixture(scope="module")
def gait_run(tmp_path_factory) -> dict:
    """Tiny synthetic walkers and a 2-step gait run on them through ``kprpe train`` on a pipe, validated every
    step (the per-step validation lines must stay off stdout)."""
    from kprpe.gait.synthetic import SyntheticConfig, make_synthetic

    root = tmp_path_factory.mktemp("gait")
    walkers = root / "walkers"
    make_synthetic(walkers, SyntheticConfig(ids=6, sequences_per_id=3, frames=(6, 9), occluder_probability=0))
    out, err = io.StringIO(), io.StringIO()  # a pipe (StringIO is no terminal), as capsys would give
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(_gait_train_argv(walkers, root / "run", "train.max_steps=2", "validation.every=1"))
    finally:
        torch.set_num_threads(threads)
    return dict(code=code, out=out.getvalue(), err=err.getvalue(), walkers=walkers, run=root / "run")


def test_train_gait_prints_its_results_file_as_json(gait_run):
    assert gait_run["code"] == 0, gait_run["err"]
    result = _one_json_line(gait_run["out"])
    results_file = gait_run["run"] / "results.json"
    assert result["task"] == "gait" and result["steps"] == 2
    assert result["results"] == json.loads(results_file.read_text())  # the run's own results file
    assert str(results_file) in result["files"] and result["validation"]["gait3d"]["mAP"] is not None
    assert "step 1: gait3d" in gait_run["err"]  # the validation line of step 1: stderr


def test_train_gait_summary_on_a_terminal(gait_run, capsys, terminal, tmp_path):
    argv = _gait_train_argv(gait_run["walkers"], tmp_path / "run", "train.max_steps=1", "validation.every=0")
    assert main([*argv, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("trained 1 steps; final loss ") and "\ngait3d: Rank-1 " in out
    assert f"Gait3D protocol on the test split: {tmp_path / 'run' / 'results.json'}" in out


# ------------------------------------------------------------------------------------------- eval gait


def _eval_gait_args(gait_run: dict, out: Path) -> list[str]:
    walkers = gait_run["walkers"]
    weights = gait_run["run"] / "model.safetensors"
    return ["eval", "gait", "--data", str(walkers), "--partition", str(walkers / "partition.json"),
            "--weights", str(weights), "-o", str(out)]  # fmt: skip


def test_eval_gait_json_on_a_pipe_summary_on_a_terminal(gait_run, capsys, monkeypatch, tmp_path):
    assert main(_eval_gait_args(gait_run, tmp_path / "e1")) == 0
    captured = capsys.readouterr()
    result = _one_json_line(captured.out)
    assert result["results"] == json.loads((tmp_path / "e1" / "results.json").read_text())
    assert result["files"] == [str(tmp_path / "e1" / "results.json")]
    assert result["output"] == str(tmp_path / "e1")
    assert "sequences" in captured.err  # the embedding progress bar

    monkeypatch.setattr("kprpe.cli.options.stdout_is_terminal", lambda: True)
    assert main([*_eval_gait_args(gait_run, tmp_path / "e2"), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("gait3d (") and "mAP" in captured.out and captured.err == ""


def test_eval_gait_takes_the_device_option(gait_run, capsys, tmp_path):
    """--device like every command that runs a model (docs/cli.md); an unusable one is one line, exit 2."""
    assert main([*_eval_gait_args(gait_run, tmp_path / "cpu"), "--device", "cpu", "-q"]) == 0
    capsys.readouterr()
    assert main([*_eval_gait_args(gait_run, tmp_path / "bad"), "--device", "nosuchdevice", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kprpe eval gait: error: cannot use device 'nosuchdevice'")
    assert "Traceback" not in err


# ----------------------------------------------------------------------------------------------- bench


def test_bench_rows_as_json_on_a_pipe_and_the_table_on_a_terminal(tmp_path, capsys, monkeypatch):
    from kprpe.cli import bench

    smoke = ["bench", "--smoke", "--modes", "infer", "--bias-impls", "auto", "--no-irpe", "-q"]
    assert main([*smoke, "-o", str(tmp_path / "b.json")]) == 0
    captured = capsys.readouterr()
    result = _one_json_line(captured.out)
    written = json.loads((tmp_path / "b.json").read_text())
    assert result["results"] == written["results"] and result["machine"] == written["machine"]
    assert [r["label"] for r in result["results"]] == ["vit_tiny", "vit_tiny_kprpe[auto]"]
    assert "bench" not in captured.err  # -q: no progress bar
    # on a terminal the same rows as the Markdown table (the rows measured above, not timed again)
    monkeypatch.setattr(bench, "run_suite", lambda *a, **k: written["results"])
    monkeypatch.setattr("kprpe.cli.options.stdout_is_terminal", lambda: True)
    assert main([*smoke, "-o", str(tmp_path / "b2.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "| vit_tiny_kprpe[auto] | infer | 2 |" in out
    assert out.endswith(f"wrote {tmp_path / 'b2.json'}\n")


# ----------------------------------------------------------------------------------- experiment digits

DIGITS_MICRO = ["experiment", "digits", "--data", "uci", "--models", "abs", "--mean-head-models", "none"]
DIGITS_MICRO += ["--regimes", "none", "--seeds", "1", "--epochs", "1", "--train-limit", "40"]
DIGITS_MICRO += ["--test-limit", "10", "--width", "16", "--depth", "1", "--workers", "1", "--no-plots"]


def test_experiment_digits_headline_as_json_and_the_table_on_a_terminal(tmp_path, capsys, monkeypatch):
    assert main([*DIGITS_MICRO, "-o", str(tmp_path / "d"), "-q"]) == 0
    captured = capsys.readouterr()
    result = _one_json_line(captured.out)
    recorded = json.loads((tmp_path / "d" / "digits_results.json").read_text())
    cell = recorded["summary"]["flatten"]["none"]["abs"]
    assert result["results"] == str(tmp_path / "d" / "digits_results.json") and result["data"] == "uci"
    numbers = {metric + suffix: cell[metric][key] for metric in ("clean", "affnist")
               for suffix, key in (("", "mean"), ("_std", "std"))}  # fmt: skip
    assert result["headline"] == [dict(head="flatten", regime="none", model="abs", seeds=1, **numbers)]
    assert str(tmp_path / "d" / "digits_table.md") in result["files"] and result["quick"] is False
    assert "digits: training" not in captured.err  # -q: no progress bar
    # on a terminal: the table (re-rendered from the results file: no training)
    monkeypatch.setattr("kprpe.cli.options.stdout_is_terminal", lambda: True)
    again = ["experiment", "digits", "--from-results", str(tmp_path / "d" / "digits_results.json")]
    assert main([*again, "-o", str(tmp_path / "r"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Digits experiment") and "| Abs-PE (`abs`) |" in out
    assert out == (tmp_path / "r" / "digits_table.md").read_text() + "\n"
    assert main([*again, "-o", str(tmp_path / "r2"), "--no-plots", "--json"]) == 0  # --json on a terminal
    assert _one_json_line(capsys.readouterr().out)["headline"] == result["headline"]


def test_experiment_digits_no_progress_is_a_deprecated_spelling_of_quiet(tmp_path, capsys):
    assert main([*DIGITS_MICRO, "-o", str(tmp_path / "d"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert _one_json_line(captured.out)["headline"][0]["model"] == "abs"
    assert (
        "kprpe experiment digits: warning: --no-progress is deprecated, use -q/--quiet (the old spelling "
        "goes in kprpe 0.5)\n" in captured.err
    )
    assert "digits: training" not in captured.err  # it still turns the progress bar off
    parser = build_parser()
    assert parser.parse_args(["experiment", "digits", "--no-progress"]).quiet is True
    assert parser.parse_args(["experiment", "digits"]).quiet is False
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["experiment", "digits", "-q", "--no-progress"])
    assert exc.value.code == 2 and "give it once" in capsys.readouterr().err


def test_experiment_digits_quick_notice_goes_to_stderr_beside_the_json(tmp_path, capsys):
    quick = ["experiment", "digits", "--quick", "--data", "uci", "-o", str(tmp_path / "q"), "--epochs", "1"]
    quick += ["--train-limit", "40", "--test-limit", "10", "--width", "16", "--depth", "1", "--workers", "1"]
    assert main([*quick, "--mean-head-models", "abs", "-q", "--no-plots"]) == 0  # one training
    captured = capsys.readouterr()
    result = _one_json_line(captured.out)
    assert result["quick"] is True and [row["model"] for row in result["headline"]] == ["abs"]
    assert "SHORT RUN (--quick)" in captured.err  # the warning that it is no result: still shown


def test_experiment_digits_list_models_by_the_convention(capsys, terminal):
    assert main(["experiment", "digits", "--list-models", "--json"]) == 0
    rows = _one_json_line(capsys.readouterr().out)
    assert {"name": "abs", "label": "Abs-PE", "group": "main"}.items() <= rows[0].items()
    assert main(["experiment", "digits", "--list-models"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("abs ")


# ------------------------------------------------------------------------------------- experiment gait


def test_experiment_gait_json_on_a_pipe_summary_on_a_terminal(tmp_path, capsys, monkeypatch):
    argv = ["experiment", "gait", "--quick", "--steps", "1", "--ids", "8", "--sequences", "3"]
    argv += ["--variants", "baseline", "-o", str(tmp_path / "g")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    result = _one_json_line(captured.out)
    recorded = json.loads((tmp_path / "g" / "gait_results.json").read_text())
    assert result["summary"] == recorded["summary"] and list(result["summary"]) == ["baseline"]
    assert result["quick"] is True and result["runs"] == 1 and result["missing"] == []
    assert result["results"] == str(tmp_path / "g" / "gait_results.json")
    assert "training baseline seed 0" in captured.err and "NOT a result" in captured.err
    # on a terminal (the finished run is reused: nothing trains): the table, then the --quick warning
    monkeypatch.setattr("kprpe.cli.options.stdout_is_terminal", lambda: True)
    assert main([*argv, "-q"]) == 0
    captured = capsys.readouterr()
    assert "| baseline | misaligned | 1 |" in captured.out and "NOT a result" in captured.out
    assert captured.err == ""


# ---------------------------------------------------------------------------------------- gait commands


def _silhouettes(root: Path, empty: bool = False) -> Path:
    """Two walkers x two walks of eight 64x44 frames (a bar that sways), and with ``empty`` a walk folder
    without frames (skipped by the pack)."""
    for ident in range(2):
        for walk in range(2):
            folder = root / f"{ident:04d}" / f"walk{walk}" / "000"
            folder.mkdir(parents=True)
            for t in range(8):
                frame = np.zeros((64, 44), np.uint8)
                left = 14 + (t + ident + walk) % 4
                frame[8:60, left : left + 12] = 255
                Image.fromarray(frame).save(folder / f"{t:03d}.png")
    if empty:
        (root / "0009" / "walk0" / "000").mkdir(parents=True)
    return root


def test_gait_pack_json_on_a_pipe_summary_on_a_terminal(tmp_path, capsys, monkeypatch):
    sils = _silhouettes(tmp_path / "sils", empty=True)
    args = ["gait", "pack", str(sils), "-o", str(tmp_path / "packed"), "-q"]
    assert main(args) == 1  # one sequence skipped: exit 1, the result still printed
    captured = capsys.readouterr()
    result = _one_json_line(captured.out)
    assert result["sequences"] == 4 and result["frames"] == 32
    assert result["output"] == str(tmp_path / "packed")
    assert result["partition"] == {"train_ids": 1, "test_ids": 1, "probes": 1}
    assert result["files"] == [str(tmp_path / "packed" / "partition.json")]
    assert [s["sequence"] for s in result["skipped"]] == [str(sils / "0009" / "walk0" / "000")]
    assert "sequences were skipped (exit status 1" in captured.err
    monkeypatch.setattr("kprpe.cli.options.stdout_is_terminal", lambda: True)
    assert main([*args, "--allow-skipped"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("packed 0 sequences (0 frames) to ") and "; kept 4 from an earlier run\n" in out
    assert "SKIPPED 1 sequences:" in out


def test_gait_make_synthetic_json_on_a_pipe_summary_on_a_terminal(tmp_path, capsys, monkeypatch):
    args = ["gait", "make-synthetic", "-o", str(tmp_path / "w"), "--ids", "3", "--sequences", "2"]
    args += ["--frames", "5,6", "-q"]
    assert main(args) == 0
    result = _one_json_line(capsys.readouterr().out)
    meta = json.loads((tmp_path / "w" / "synthetic.json").read_text())
    assert result["walkers"] == 3 and result["sequences"] == 6 == len(meta["sequences"])
    frames = [load_sequence(folder)["sils"].shape[0] for folder in (tmp_path / "w").glob("*/*/*")]
    assert len(frames) == 6 and result["frames"] == sum(frames)
    assert result["partition"]["train_ids"] + result["partition"]["test_ids"] == 3
    assert str(tmp_path / "w" / "synthetic.json") in result["files"]
    monkeypatch.setattr("kprpe.cli.options.stdout_is_terminal", lambda: True)
    assert main(args) == 0  # its own earlier output is replaced as a whole
    out = capsys.readouterr().out
    assert out == (
        f"wrote 6 sequences ({sum(frames)} frames) of 3 walkers to {tmp_path / 'w'}; partition.json: "
        f"{result['partition']['train_ids']} train / {result['partition']['test_ids']} test ids, "
        f"{result['partition']['probes']} probes\n"
    )
