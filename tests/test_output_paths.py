"""One rule for every file a command writes (kprpe.files.check_output_path): never one of its inputs (links
resolved), never an existing file inside an input folder, and never another existing file without --overwrite.
Each command that writes a file is run against it, and the input is checked byte for byte afterwards."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kprpe import files
from kprpe.cli import main

TINY_WEIGHTS = Path(__file__).resolve().parent / "fixtures" / "tiny_kprpe.safetensors"


# ------------------------------------------------------------------------------------------- the rule


def test_an_input_is_refused_however_it_is_named(tmp_path):
    photo = tmp_path / "a.png"
    photo.write_bytes(b"photo")
    (tmp_path / "link.png").symlink_to(photo)
    os.link(photo, tmp_path / "hard.png")
    for out in (photo, tmp_path / "link.png", tmp_path / "hard.png", tmp_path / "." / "a.png"):
        with pytest.raises(files.OutputPathError, match="would overwrite the input"):
            files.check_output_path(out, inputs=[photo], overwrite=True)
    assert photo.read_bytes() == b"photo"


def test_an_existing_file_inside_an_input_folder_is_refused(tmp_path):
    (tmp_path / "gallery" / "ann").mkdir(parents=True)
    (tmp_path / "gallery" / "ann" / "1.png").write_bytes(b"photo")
    with pytest.raises(files.OutputPathError, match="input"):
        files.check_output_path(
            tmp_path / "gallery" / "ann" / "1.png", inputs=[tmp_path / "gallery"], overwrite=True
        )
    # a new file beside the inputs replaces nothing
    assert files.check_output_path(tmp_path / "gallery" / "index.npz", inputs=[tmp_path / "gallery"])


def test_other_existing_files_need_overwrite(tmp_path):
    other = tmp_path / "other.png"
    other.write_bytes(b"old")
    with pytest.raises(files.OutputPathError, match="already exists; pass --overwrite"):
        files.check_output_path(other, inputs=[tmp_path / "a.png"])
    assert files.check_output_path(other, overwrite=True) == other
    with pytest.raises(files.OutputPathError, match="is a folder"):
        files.check_output_path(tmp_path, overwrite=True)
    assert files.check_output_path(tmp_path / "new.png") == tmp_path / "new.png"


def test_non_path_inputs_are_ignored_and_folders_may_not_hold_inputs(tmp_path):
    files.check_not_input(tmp_path / "out.npz", ["minchul/cvlface_adaface_vit_base_kprpe_webface4m"])
    (tmp_path / "photos").mkdir()
    with pytest.raises(files.OutputPathError, match="contains the input"):
        files.check_not_input(tmp_path, [tmp_path / "photos"], folder=True)


# ------------------------------------------------------------------------------------------ every command


def _png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def made_files(tmp_path, capsys):
    """Real inputs (a face photo, a gallery of it, a RecordIO packed from it), so that each command would get
    as far as writing; and one file that is not an input."""
    pytest.importorskip("dlib")
    face = pytest.importorskip("skimage.data").astronaut()
    made = {
        "a": _png(tmp_path / "a.png", face),
        "b": _png(tmp_path / "b.png", np.ascontiguousarray(face[:, ::-1])),
        "gallery_photo": _png(tmp_path / "g" / "ann" / "1.png", face),
        "rec": tmp_path / "d.rec",
        "idx": tmp_path / "d.idx",
        "other": tmp_path / "other.file",
    }
    assert main(["pack", str(tmp_path / "g"), "-o", str(made["rec"]), "-q"]) == 0
    made["other"].write_bytes(b"not ours")
    capsys.readouterr()
    return tmp_path, made


W = str(TINY_WEIGHTS)

# (command line, the file it must leave alone); {x} are paths under tmp_path
WRITES_OVER_AN_INPUT = {
    "verify --visualize": ["verify", "{a}", "{b}", "--weights", W, "--visualize", "{a}", "--overwrite"],
    "verify --show": ["verify", "{a}", "{b}", "--weights", W, "--show", "{b}", "--overwrite"],
    "search enrol -o": ["search", "enrol", "{g}", "-o", "{gallery_photo}", "--weights", W, "--overwrite"],
    "landmarks -o": ["landmarks", "{rec}", "-o", "{rec}", "--mode", "crop", "--overwrite"],
    "landmarks -o (the .idx)": ["landmarks", "{rec}", "-o", "{idx}", "--overwrite"],
    "embed -o": ["embed", "{a}", "-o", "{a}", "--weights", W],
    "align -o": ["align", "{g}", "-o", "{g}"],
    "align --show": ["align", "{a}", "-o", "{tmp}/aligned", "--show", "{a}"],
}

WRITES_OVER_ANOTHER_FILE = {
    "verify --visualize": ["verify", "{a}", "{b}", "--weights", W, "--visualize", "{other}"],
    "verify --show": ["verify", "{a}", "{b}", "--weights", W, "--show", "{other}"],
    "align --show": ["align", "{a}", "-o", "{tmp}/aligned", "--show", "{other}"],
    "search enrol -o": ["search", "enrol", "{g}", "-o", "{other}", "--weights", W],
    "landmarks -o": ["landmarks", "{rec}", "-o", "{other}"],
    "export -o": ["export", "vit_tiny_kprpe", "-o", "{tmp}/other.onnx"],
    "export sidecar": ["export", "vit_tiny_kprpe", "-o", "{tmp}/model.onnx"],
    "pack -o": ["pack", "{g}", "-o", "{tmp}/other.rec"],
}


def _run(argv: list[str], tmp: Path, made: dict, capsys) -> tuple[int, str]:
    values = {**{k: str(v) for k, v in made.items()}, "g": str(tmp / "g"), "tmp": str(tmp)}
    code = main([a.format(**values) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(WRITES_OVER_AN_INPUT))
def test_no_command_writes_over_its_input(name, made_files, capsys):
    tmp, made = made_files
    before = {p: p.read_bytes() for p in tmp.rglob("*") if p.is_file()}
    code, err = _run(WRITES_OVER_AN_INPUT[name], tmp, made, capsys)
    assert code == 2, err
    assert "error:" in err and "input" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in tmp.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("name", sorted(WRITES_OVER_ANOTHER_FILE))
def test_no_command_replaces_an_existing_file_without_overwrite(name, made_files, capsys):
    tmp, made = made_files
    (tmp / "other.idx").write_bytes(b"an index of something else")
    (tmp / "model.onnx.json").write_bytes(b"someone's notes")
    (tmp / "other.onnx").write_bytes(b"someone's model")
    before = {p: p.read_bytes() for p in tmp.rglob("*") if p.is_file()}
    code, err = _run(WRITES_OVER_ANOTHER_FILE[name], tmp, made, capsys)
    assert code == 2, err
    assert "already exists; pass --overwrite" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in tmp.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_a_file_that_is_not_an_input(made_files, capsys):
    tmp, made = made_files
    argv = ["verify", "{a}", "{b}", "--weights", W, "--visualize", "{other}", "--overwrite"]
    code, err = _run(argv, tmp, made, capsys)
    assert code == 0, err
    with Image.open(made["other"]) as picture:
        assert picture.format == "PNG"


def test_eval_never_writes_a_result_file_over_an_input(tmp_path, capsys):
    from kprpe.eval.binfile import write_verification_bin

    rng = np.random.default_rng(0)
    images = []
    for _ in range(8):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
    out = tmp_path / "run"
    out.mkdir()
    data = out / "summary.md"  # a verification set that happens to carry a result file's name
    write_verification_bin(data, images, [True, False, True, False])
    before = data.read_bytes()
    weights = TINY_WEIGHTS.parent / "tiny_vit.safetensors"
    argv = [
        "eval",
        "verify",
        "--weights",
        str(weights),
        "--bin",
        str(data),
        "-o",
        str(out),
        "--no-cache",
        "-q",
    ]
    assert main(argv) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert data.read_bytes() == before
