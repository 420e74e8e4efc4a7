"""`kprpe eval keypoint-noise` on a tiny .bin: a model without keypoints does not move, KP-RPE does."""

from __future__ import annotations

import json

from kprpe.cli import main
from kprpe.eval.keypoint_noise import keypoint_noise_study
from kprpe.eval.runs import EvalSettings, ModelHandle

from .conftest import TINY_KPRPE, TINY_VIT
from .test_cli import _make_bin


def _conditions(weights, bin_path):
    settings = EvalSettings(flip=False, progress=False, cache_dir=None)
    res = keypoint_noise_study(
        ModelHandle(weights),
        [bin_path],
        settings,
        keypoint_source="template",
        sigmas=(0, 2, 8),
        displacements=(16,),
    )
    return res["sets"][bin_path.stem]["conditions"]


def test_plain_vit_ignores_keypoint_noise_and_kprpe_does_not(tmp_path):
    bin_path = _make_bin(tmp_path / "toy.bin", n_pairs=10)
    plain = _conditions(TINY_VIT, bin_path)
    assert [(c["kind"], c["level"]) for c in plain] == [
        ("noise", 0),
        ("noise", 2),
        ("noise", 8),
        ("displace", 16),
    ]
    assert all(abs(c["cosine_mean"] - 1.0) < 1e-5 for c in plain)
    assert len({c["accuracy_mean"] for c in plain}) == 1
    kp = _conditions(TINY_KPRPE, bin_path)
    assert abs(kp[0]["cosine_mean"] - 1.0) < 1e-5  # sigma 0 is the clean embedding itself
    assert kp[2]["cosine_mean"] < kp[1]["cosine_mean"] < 1.0 - 1e-6  # more noise, further away
    assert kp[3]["cosine_mean"] < 1.0 - 1e-6 and kp[3]["cosine_min"] <= kp[3]["cosine_p05"]


def test_cli_writes_report_and_plot(tmp_path, capsys, terminal):
    bin_path = _make_bin(tmp_path / "toy.bin", n_pairs=10)
    out = tmp_path / "run"
    code = main(
        [
            "eval",
            "keypoint-noise",
            "--weights",
            str(TINY_KPRPE),
            "--bin",
            str(bin_path),
            "--keypoints",
            "template",
            "--sigmas",
            "1,4",
            "--displacements",
            "8",
            "-o",
            str(out),
            "--quiet",
            "--no-flip",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    levels = [c["level"] for c in results["sets"]["toy"]["conditions"]]
    assert levels == [0.0, 1.0, 4.0, 8.0]
    assert "noise σ = 4 px" in (out / "summary.md").read_text()
    assert (out / "keypoint_noise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cosine to clean" in capsys.readouterr().out


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    bin_path = _make_bin(tmp_path / "toy.bin", n_pairs=10)
    code = main(
        [
            "eval",
            "keypoint-noise",
            "--weights",
            str(TINY_KPRPE),
            "--bin",
            str(bin_path),
            "--keypoints",
            "template",
            "--displace-index",
            "7",
            "-o",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == 2 and "displace_index" in capsys.readouterr().err
    code = main(["eval", "keypoint-noise", "--weights", str(TINY_KPRPE), "-o", str(tmp_path / "o")])
    assert code == 2 and ".bin" in capsys.readouterr().err
