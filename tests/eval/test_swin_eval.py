"""``kprpe eval`` protocols and the alignment sweep with a Swin-KP-RPE checkpoint beside a ViT one."""

from __future__ import annotations

import json

from kprpe.cli import main

from .conftest import REPO, TINY_KPRPE
from .test_cli import _make_bin

SWIN = REPO / "tests" / "fixtures" / "swin_kprpe" / "tiny_swin_kprpe.safetensors"


def _run(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_and_sweep_take_swin(tmp_path, capsys, photo_pairs):
    bin_path = _make_bin(tmp_path / "toy.bin", n_pairs=10)
    code, _, err = _run(
        capsys,
        "verify",
        "--weights",
        SWIN,
        "--bin",
        bin_path,
        "--keypoints",
        "template",
        "-o",
        tmp_path / "v",
        "--no-cache",
        "--quiet",
    )
    assert code == 0, err
    result = json.loads((tmp_path / "v" / "results.json").read_text())["sets"]["toy"]
    assert result["num_pairs"] == 10 and 0 <= result["kfold"]["accuracy_mean"] <= 1
    code, _, err = _run(
        capsys,
        "sweep",
        "--weights",
        f"swin={SWIN}",
        "--weights",
        f"vit={TINY_KPRPE}",
        "--pairs",
        photo_pairs / "pairs.csv",
        "--landmarks",
        photo_pairs / "landmarks.txt",
        "--t",
        "0,1",
        "-o",
        tmp_path / "sweep",
        "--no-cache",
        "--quiet",
    )
    assert code == 0, err
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert table["checkpoints"] == ["swin", "vit"] and len(table["accuracy"]["swin"]) == 2
