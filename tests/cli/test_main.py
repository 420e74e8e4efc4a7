"""The ``kprpe`` command's structure: shared options spelled once, no command module importing the CLI
back, no torch for ``import kprpe`` or ``kprpe --help``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from kprpe.cli import COMMAND_MODULES, build_parser, main
from kprpe.cli.main import subcommand_parsers

SRC = Path(__file__).resolve().parents[2] / "src" / "kprpe"


def test_command_modules_import_errors_not_the_cli():
    # cli/main.py imports the command modules; a command module importing it back would be a hidden loop
    for name in COMMAND_MODULES:
        path = SRC / Path(*name.split(".")[1:]).with_suffix(".py")
        if not path.exists():  # a group whose package is not there (yet)
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                assert module not in (".main", "kprpe.cli.main", "kprpe.cli", "."), f"{path} imports the CLI"


def _subparser(*names: str):
    parser = build_parser()
    for name in names:
        parser = parser._subparsers._group_actions[0].choices[name]
    return parser


@pytest.mark.parametrize(
    "names",
    [
        ("eval", "verify"),
        ("eval", "sweep"),
        ("embed",),
        ("experiment", "digits"),
        ("bench",),
        ("pack",),
        ("landmarks",),
        ("align",),
    ],
)
def test_output_is_spelled_dash_o_everywhere(names):
    options = {s for a in _subparser(*names)._actions for s in a.option_strings}
    assert {"-o", "--output"} <= options


def test_output_has_one_spelling_and_is_required(capsys):
    args = build_parser().parse_args(["eval", "verify", "--weights", "w", "--bin", "b.bin", "-o", "folder"])
    assert str(args.output) == "folder"
    # the hidden, deprecated --out alias is gone, and no prefix of an option stands for it (0.4.2)
    options = {s for a in _subparser("eval", "verify")._actions for s in a.option_strings}
    assert "--out" not in options
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "verify", "--weights", "w", "--bin", "b.bin", "--out", "folder"])
    assert "required: -o/--output" in capsys.readouterr().err  # --out was not taken for it
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "verify", "--weights", "w", "--bin", "b.bin"])
    assert "-o/--output" in capsys.readouterr().err


def test_options_are_never_matched_by_a_prefix(capsys):
    """argparse took `--lr 3` for `--lr-drops 3` without a word; a prefix also breaks the day an option
    sharing it is added. Every sub-command parser inherits the setting."""
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["experiment", "digits", "--lr-d", "3"])
    assert "unrecognized arguments: --lr-d 3" in capsys.readouterr().err
    assert parser.parse_args(["experiment", "digits", "--lr", "0.002"]).lr == 0.002
    unchecked = [sub.prog for sub in subcommand_parsers(parser) if sub.allow_abbrev]
    assert unchecked == []


def test_one_device_default_for_face_eval_and_bench():
    parser = build_parser()
    embed = parser.parse_args(["embed", "x.jpg", "-o", "e.npz", "--weights", "w"])
    verify = parser.parse_args(["eval", "verify", "--weights", "w", "--bin", "b", "-o", "o"])
    bench = parser.parse_args(["bench"])
    assert embed.device == verify.device == bench.device == "cpu"


def test_bad_option_combination_is_one_line_under_python_m(tmp_path):
    run = subprocess.run([sys.executable, "-m", "kprpe.cli", "train", str(tmp_path / "x.yaml"), "--resume",
                          "--resume-from", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip() == ("kprpe train: error: use either --resume (latest checkpoint of the run) or "
                                  "--resume-from DIR, not both")


def test_main_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_a_closed_pipe_is_not_a_traceback():
    """`kprpe models --json | head -1` once printed a BrokenPipeError traceback."""
    import subprocess
    import sys

    # the command again and again until one write finds the reader gone (the first usually does: its output
    # is larger than a pipe buffer); it stops there, as `kprpe models --json | head -1` would (running the
    # rest of 300 calls into the closed pipe took 10-50 s)
    script = (
        "import sys; from kprpe.cli import main\n"
        "for _ in range(300):\n"
        "    if code := main(['models', '--json']):\n"
        "        sys.exit(code)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # the reader goes away after the first bytes, like `head -c 10`
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert code == 141


@pytest.mark.parametrize(
    "code",
    [
        "import kprpe",
        "import kprpe.errors",
        "import kprpe.face, kprpe.eval, kprpe.streaming, kprpe.gallery",
        "from kprpe.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    ],
)
def test_import_and_help_do_not_load_torch(code):
    # torch's import alone takes ~3 s: the package, its sub-packages and `kprpe --help` (which registers
    # every command group) must leave it to the commands that run a model
    script = f"import sys\n{code}\nprint('torch' in sys.modules, 'kprpe.nn' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert run.stdout.strip().splitlines()[-1] == "False False", run.stdout


def test_lazy_names_load_on_first_use():
    import kprpe
    import kprpe.face

    assert callable(kprpe.create_model) and kprpe.face.FacePipeline.__name__ == "FacePipeline"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kprpe.face.nope  # noqa: B018
    assert "FacePipeline" in dir(kprpe.face)


def test_demo_runs_every_face_family_and_refuses_gait_models(capsys, terminal):
    """`kprpe demo --model ir_18` crashed reading a ViT-only config field; gait models need sequences."""
    from kprpe.cli.main import main

    assert main(["demo", "--model", "ir_18", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "ir_18 (iresnet)" in out and "ignores keypoints" in out
    assert main(["demo", "--model", "vit_tiny_kprpe", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    cosines = [float(v) for v in out.split("cosine(")[1].split("[")[1].split("]")[0].split(",")]
    assert all(c < 1.0 for c in cosines)  # the randomised keypoint table makes moved keypoints matter
    assert main(["demo", "--model", "swingait_2d"]) == 2
    assert "gait model" in capsys.readouterr().err


def test_demo_prints_one_line_of_json_on_a_pipe(capsys):
    """The output convention (docs/cli.md): under pytest stdout is not a terminal."""
    import json

    from kprpe.cli.main import main

    assert main(["demo", "--model", "vit_tiny_kprpe", "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["model"] == "vit_tiny_kprpe" and result["has_kprpe"] and result["trained"] is False
    cosines = result["cosine_moved_keypoints"]
    assert len(cosines) == 2 and all(c < 1.0 for c in cosines)


@pytest.mark.parametrize(
    "module, prefix",
    [
        ("kprpe.bench.kernels", "--batc"),
        ("kprpe.bench.embed_memory", "--count"),
        ("kprpe.bench.partial_fc", "--classe"),
        ("kprpe.bench.index", "--entrie"),
        ("kprpe.bench.vector_db", "--entrie"),
    ],
)
def test_benchmark_scripts_match_options_only_when_spelled_out(module, prefix, capsys):
    """The `python -m kprpe.bench.*` scripts parse their own options: a prefix is refused there too,
    before any work (each option above is the prefix of one the script has)."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main([prefix, "2"])
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {prefix} 2" in capsys.readouterr().err
