"""One CLI vocabulary (docs/cli.md): the same option for the same thing, deprecated spellings that still work
and warn, errors prefixed with the full command, and one output convention (summary on a terminal, compact
JSON with --json or on a pipe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kprpe.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
TINY_WEIGHTS = ROOT / "tests" / "fixtures" / "tiny_kprpe.safetensors"
IJB = ["eval", "ijb", "--weights", "w", "--tid-mid", "t", "--pairs", "p", "--landmarks", "l", "--images", "i"]
IJB += ["-o", "o"]


def _parse(capsys, *argv):
    args = build_parser().parse_args([str(a) for a in argv])
    return args, capsys.readouterr().err


def _gallery(path: Path) -> Path:
    from kprpe.gallery.index import GalleryIndex

    rng = np.random.default_rng(0)
    index = GalleryIndex(8, backend="numpy")
    index.add({name: rng.normal(size=(2, 8)).astype(np.float32) for name in ("ann", "bob", "cyd")})
    index.save(path)
    return path


# ------------------------------------------------------------------------------------ deprecated spellings


@pytest.mark.parametrize(
    "argv, dest, value, old, new",
    [
        (
            ["search", "query", "p.jpg", "--weights", "w", "--index", "g.npz"],
            "gallery",
            "g.npz",
            "--index",
            "--gallery",
        ),
        (["search", "remove", "ann", "--index", "g.npz"], "gallery", "g.npz", "--index", "--gallery"),
        (
            ["search", "enrol", "photos", "--weights", "w", "-o", "g.npz"],
            "gallery",
            "g.npz",
            "-o",
            "--gallery",
        ),
        (["serve", "--weights", "w", "--index", "g.npz"], "gallery", "g.npz", "--index", "--gallery"),
        (
            ["verify", "a", "b", "--weights", "w", "--aligner", "dfa", "--min-aligner-score", "0.5"],
            "min_score",
            0.5,
            "--min-aligner-score",
            "--min-score",
        ),
        (
            [*IJB, "--no-norm"],
            "norm_pooling",
            False,
            "--no-norm",
            "--no-norm-pooling",
        ),
        (
            ["eval", "toolkit", "s", "--weights", "w", "-o", "o", "--ijb-use-norm"],
            "norm_pooling",
            True,
            "--ijb-use-norm",
            "--norm-pooling",
        ),
    ],
)
def test_old_spelling_works_and_warns_with_the_full_command(capsys, argv, dest, value, old, new):
    args, err = _parse(capsys, *argv)
    assert getattr(args, dest) == value
    command = "kprpe " + " ".join(argv[: 2 if argv[0] in ("search", "eval") else 1])
    assert f"{command}: warning: {old} is deprecated, use {new}" in err
    assert err.count("\n") == 1  # one line


@pytest.mark.parametrize(
    "argv, dest, value",
    [
        (["search", "query", "p.jpg", "--weights", "w", "--gallery", "g.npz"], "gallery", "g.npz"),
        (["search", "remove", "ann", "--gallery", "g.npz"], "gallery", "g.npz"),
        (["search", "enrol", "photos", "--weights", "w", "--gallery", "g.npz"], "gallery", "g.npz"),
        (["serve", "--weights", "w", "--gallery", "g.npz"], "gallery", "g.npz"),
        (["verify", "a", "b", "--weights", "w", "--min-score", "0.5"], "min_score", 0.5),
        (
            ["embed", "a", "--weights", "w", "-o", "o.npz", "--aligner", "dfa", "--min-score", "0.5"],
            "min_score",
            0.5,
        ),
        (
            [*IJB, "--norm-pooling"],
            "norm_pooling",
            True,
        ),
        (IJB, "norm_pooling", False),
        (["eval", "toolkit", "s", "--weights", "w", "-o", "o"], "norm_pooling", False),
        (["serve", "--weights", "w", "--landmarks", "request"], "landmarks", "request"),
        (["serve", "--weights", "w.onnx", "--engine", "onnx"], "engine", "onnx"),
        (["serve", "--weights", "w", "--batch-size", "8", "--mode", "unaligned", "-q"], "mode", "unaligned"),
    ],
)
def test_new_spelling_works_without_a_warning(capsys, argv, dest, value):
    args, err = _parse(capsys, *argv)
    assert getattr(args, dest) == value and err == ""


def test_one_ijb_pooling_default_in_both_commands(capsys):
    # eval ijb pooled with the norm by default and eval toolkit without: now one flag, one default
    ijb, _ = _parse(capsys, *IJB)
    toolkit, _ = _parse(capsys, "eval", "toolkit", "s", "--weights", "w", "-o", "o")
    assert ijb.norm_pooling is toolkit.norm_pooling is False


@pytest.mark.parametrize(
    "argv, aligner, flip",
    [
        (["verify", "a", "b", "--weights", "w"], None, True),  # None: chosen from the weights, then the rule
        (["verify", "a", "b", "--weights", "w", "--aligner", "dfa"], "dfa", False),  # the DFA's own pipeline
        (["verify", "a", "b", "--weights", "w", "--aligner", "dfa", "--flip"], "dfa", True),
        (["verify", "a", "b", "--weights", "w", "--no-flip"], None, False),
        (["serve", "--weights", "w", "--aligner", "dfa"], "dfa", False),
        (["serve", "--weights", "w", "--aligner", "dlib"], "dlib", True),
    ],
)
def test_one_flip_rule(capsys, argv, aligner, flip):
    from kprpe.cli.options import flip_enabled

    args, _ = _parse(capsys, *argv)
    assert args.aligner == aligner and flip_enabled(args) is flip


def test_flip_and_no_flip_together_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["verify", "a", "b", "--weights", "w", "--flip", "--no-flip"])
    assert exc.value.code == 2
    assert (
        "kprpe verify: error: argument --no-flip: not allowed with argument --flip" in capsys.readouterr().err
    )


def test_sweep_help_names_only_options_it_has(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "sweep", "--help"])
    assert "--keypoints" not in capsys.readouterr().out
    # its keypoints come from --landmarks: the aligner options (which did nothing) are hidden, deprecated
    sweep = build_parser()._subparsers._group_actions[0].choices["eval"]._subparsers._group_actions[0]
    shown = {s for a in sweep.choices["sweep"]._actions if a.help != "==SUPPRESS==" for s in a.option_strings}
    assert "--landmarks" in shown and not {"--aligner", "--aligner-weights"} & shown


def test_search_needs_a_gallery_in_one_line(capsys):
    assert main(["search", "remove", "ann"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("kprpe search remove: error: --gallery GALLERY is required") and err.count("\n") == 1
    )


def test_removed_flag_of_the_old_gallery_spelling_still_changes_the_gallery(tmp_path, capsys):
    gallery = _gallery(tmp_path / "g.npz")
    assert main(["search", "remove", "ann", "--index", str(gallery)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["identities"] == 2
    assert "warning: --index is deprecated, use --gallery" in captured.err


def test_make_example_data_takes_dash_o_and_still_its_old_positional(tmp_path, capsys):
    small = ["--identities", "2", "--images-per-identity", "2", "--size", "16", "-q"]
    assert main(["make-example-data", "-o", str(tmp_path / "new"), *small]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["output"] == str(tmp_path / "new") and captured.err == ""
    assert main(["make-example-data", str(tmp_path / "old"), *small]) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "old" / "train.rec").is_file()
    assert captured.err.startswith("kprpe make-example-data: warning: a positional DIR is deprecated, use -o")


# --------------------------------------------------------------------------------------------- errors


def test_errors_name_the_full_command(tmp_path, capsys):
    missing = tmp_path / "missing.csv"
    code = main(
        [
            "eval",
            "pairs",
            "--weights",
            str(tmp_path / "w.safetensors"),
            "--pairs",
            str(missing),
            "-o",
            str(tmp_path / "out"),
            "--keypoints",
            "template",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kprpe eval pairs: error: ") and err.count("\n") == 1


# ------------------------------------------------------------------------------------------ landmark files


def _index_csv(path: Path) -> Path:
    path.write_text(
        "idx," + ",".join(f"ldmk_{i}" for i in range(10)) + "\n0," + ",".join(["0.5"] * 10) + "\n"
    )
    return path


def _pixel_list(path: Path) -> Path:
    path.write_text("a.jpg " + " ".join(["50"] * 10) + " 0.9\n")
    return path


def _photo_csv(path: Path) -> Path:
    path.write_text("file,x0,y0,x1,y1,x2,y2,x3,y3,x4,y4\na.jpg," + ",".join(["50"] * 10) + "\n")
    return path


def test_landmark_formats_are_told_apart_by_content(tmp_path):
    from kprpe.landmarks import landmark_file_format

    assert landmark_file_format(_index_csv(tmp_path / "i.csv")) == "index-csv"
    headerless = tmp_path / "h.csv"
    headerless.write_text("3," + ",".join(["0.5"] * 10) + "\n")
    assert landmark_file_format(headerless) == "index-csv"
    assert landmark_file_format(_pixel_list(tmp_path / "p.txt")) == "pixel-list"
    assert landmark_file_format(_photo_csv(tmp_path / "f.csv")) == "photo-list"
    as_json = tmp_path / "f.json"
    as_json.write_text('{"a.jpg": [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]}')
    assert landmark_file_format(as_json) == "photo-list"


@pytest.mark.parametrize(
    "argv, make, found",
    [
        (["eval", "verify", "--weights", "w", "--bin", "x.bin", "-o", "{out}"], _pixel_list, "pixel-list"),
        (["eval", "sweep", "--weights", "w", "--pairs", "p.csv", "-o", "{out}"], _index_csv, "index-csv"),
        (["eval", "pairs", "--weights", "w", "--pairs", "p.csv", "-o", "{out}"], _photo_csv, "photo-list"),
        (["verify", "a.jpg", "b.jpg", "--weights", str(TINY_WEIGHTS)], _index_csv, "index-csv"),
    ],
)
def test_a_landmark_file_of_another_format_is_one_clear_line(tmp_path, capsys, argv, make, found):
    landmarks = make(tmp_path / "lm.txt")
    argv = [a.replace("{out}", str(tmp_path / "out")) for a in argv]
    assert main([*argv, "--landmarks", str(landmarks)]) == 2
    err = capsys.readouterr().err
    command = "kprpe " + " ".join(argv[: 2 if argv[0] == "eval" else 1])
    assert err.startswith(f"{command}: error: --landmarks {landmarks} is a {found} file")
    assert "this command reads" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------- output convention


def test_output_on_a_pipe_is_one_line_of_json_and_a_summary_on_a_terminal(tmp_path, capsys, monkeypatch):
    gallery = _gallery(tmp_path / "g.npz")
    assert (
        main(["search", "remove", "ann", "--gallery", str(gallery)]) == 0
    )  # pytest's stdout: not a terminal
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out) == {
        "gallery": str(gallery),
        "removed": ["ann"],
        "identities": 2,
    }
    monkeypatch.setattr("kprpe.cli.options.stdout_is_terminal", lambda: True)
    assert main(["search", "remove", "bob", "--gallery", str(gallery)]) == 0
    assert capsys.readouterr().out == f"gallery {gallery}: removed bob; 1 identities left\n"
    assert main(["search", "remove", "cyd", "--gallery", str(gallery), "--json"]) == 0  # --json on a terminal
    assert json.loads(capsys.readouterr().out)["identities"] == 0


def _kprpe(tmp_path: Path, *argv: str) -> list[str]:
    return [sys.executable, "-m", "kprpe", *argv]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def test_a_real_pipe_gets_json_and_a_real_terminal_the_summary(tmp_path):
    pty = pytest.importorskip("pty")
    gallery = _gallery(tmp_path / "g.npz")
    piped = subprocess.run(
        _kprpe(tmp_path, "search", "remove", "ann", "--gallery", str(gallery)),
        capture_output=True,
        text=True,
        env=_env(),
        check=True,
    )
    assert json.loads(piped.stdout)["removed"] == ["ann"]
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            _kprpe(tmp_path, "search", "remove", "bob", "--gallery", str(gallery)),
            stdout=follower,
            stderr=subprocess.PIPE,
            env=_env(),
            check=True,
        )
        text = os.read(leader, 4096).decode()
    finally:
        os.close(leader)
        os.close(follower)
    assert done.returncode == 0 and text.strip() == f"gallery {gallery}: removed bob; 1 identities left"


@pytest.mark.parametrize("order", [("--gallery", "--index"), ("--index", "--gallery")])
def test_a_gallery_and_its_old_spelling_together_are_refused(capsys, order):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["search", "remove", "ann", order[0], "a.npz", order[1], "b.npz"])
    assert exc.value.code == 2
    assert "kprpe search remove: error: " in capsys.readouterr().err
