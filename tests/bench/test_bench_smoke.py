"""The benchmark runs end to end on a micro model (timings themselves are not asserted: not a timed test)."""

from __future__ import annotations

import json

from kprpe.cli import main


def test_bench_smoke_writes_every_path(tmp_path, capsys, terminal):
    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--modes", "infer,train", "-o", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert {"torch", "threads", "cpu_count"} <= set(payload["machine"])
    labels = {(r["label"], r["mode"]) for r in payload["results"]}
    assert ("vit_tiny_kprpe[naive](math)", "train") in labels  # the official-style reference
    for impl in ("gather", "index", "onehot", "decomposed", "auto"):
        assert (f"vit_tiny_kprpe[{impl}]", "train") in labels
    for r in payload["results"]:
        assert "error" not in r, r
        assert r["median_s"] > 0 and r["images_per_s"] > 0
        if r["model"] != "vit_tiny_irpe":
            assert r["time_vs_vit"] > 0
            # issue 31: KP-RPE rows read "step MB 0" / "step mem x ViT 0.00" (an RSS delta after warm-up)
            assert r["step_mem_mb"] > 0 and r["step_mem_vs_vit"] > 0, r
    assert "| vit_tiny_kprpe[decomposed] | train |" in capsys.readouterr().out


def test_bench_dense_backward_rows_and_train_batch_sizes(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--smoke", "--modes", "infer,train", "--bias-impls", "auto", "--no-irpe"]
    assert (
        main([*args, "--batch-sizes", "2", "--train-batch-sizes", "3", "--dense-backward", "-o", str(out)])
        == 0
    )
    results = json.loads(out.read_text())["results"]
    rows = {(r["label"], r["mode"], r["batch_size"]) for r in results}
    assert ("vit_tiny_kprpe[auto]{dense-bwd}", "train", 3) in rows  # the path before the custom backward
    assert ("vit_tiny_kprpe[auto]", "train", 3) in rows and ("vit_tiny_kprpe[auto]", "infer", 2) in rows
    for r in results:
        assert "error" not in r, r
        if r["label"] == "vit_tiny_kprpe[auto]" and r["mode"] == "infer":
            assert r["bias_impl_used"] in ("gather", "index", "onehot", "decomposed")
            assert any(t["chosen"] == r["bias_impl_used"] for t in r["auto_timings_s"].values())


def test_bench_gpu_options_fail_cleanly_without_cuda(capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["bench", "--device", "cuda", "--dtype", "bfloat16", "--kprpe-attn-impls", "sdpa,flex"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert main(["bench", "--smoke", "--kprpe-attn-impls", "flex"]) == 2
    assert "compiled on CUDA only" in capsys.readouterr().err


def test_bench_onnx_engine_smoke(tmp_path, capsys, terminal):
    import pytest

    pytest.importorskip("onnxruntime")
    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--engine", "onnx", "-o", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    labels = {r["label"] for r in results}
    assert {"vit_tiny", "vit_tiny_kprpe[auto]", "vit_tiny (onnx)", "vit_tiny_kprpe (onnx)"} == labels
    for r in results:
        assert "error" not in r, r
        if r["engine"] == "onnx":
            assert r["speedup_vs_torch"] > 0 and r["threads"] >= 1
    assert "| vit_tiny_kprpe | 2 |" in capsys.readouterr().out


def test_bench_swin_rows_against_plain_swin(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--family", "swin", "--modes", "infer,train", "-o", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    labels = {(r["label"], r["mode"]) for r in results}
    for mode in ("infer", "train"):
        assert {
            ("swin_small", mode),
            ("swin_small_kprpe[gather]", mode),
            ("swin_small_kprpe[loop]", mode),
        } <= labels
    for r in results:
        assert "error" not in r, r
        assert r["time_vs_vit"] > 0  # against the plain Swin of the same size, mode and batch
