"""results.json's parameter count comes from the weights file's header when it can: a re-run whose
embeddings all come from the cache no longer builds the model only to count it, and the count is still the
trainable parameters of the nn.Module (BatchNorm statistics and Swin's position tables left out)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import kprpe
import kprpe.export
import kprpe.nn
from kprpe.cli import main
from kprpe.eval.parameters import BUFFER_SUFFIXES, COUNTED_FAMILIES, header_parameter_count
from kprpe.nn.registry import list_models, preset_family

from .conftest import REPO, TINY_KPRPE, TINY_VIT
from .test_cli import _make_bin

SWIN = REPO / "tests" / "fixtures" / "swin_kprpe" / "tiny_swin_kprpe.safetensors"


def _module_count(path) -> int:
    """The count as results.json always meant it: on the built model."""
    return sum(p.numel() for p in kprpe.load_official(path).parameters())


@pytest.mark.parametrize("preset", [n for n in list_models() if preset_family(n).name in COUNTED_FAMILIES])
def test_every_stored_tensor_but_the_named_buffers_is_a_parameter(preset):
    """The rule behind the header count, for every preset of the counted families (on the meta device: no
    memory): the non-buffer tensors of the state dict are exactly the parameters, none shared."""
    with torch.device("meta"):
        model = kprpe.create_model(preset)
    # shapes, not names: Swin KP-RPE stores its tables under the official key names (a state-dict hook)
    stored = sorted(tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith(BUFFER_SUFFIXES))
    assert stored == sorted(tuple(p.shape) for _, p in model.named_parameters(remove_duplicate=False))
    assert len(list(model.parameters())) == len(stored)  # none shared, so none counted twice


@pytest.fixture(scope="module")
def iresnet_files(tmp_path_factory):
    """IR-18 saved by kprpe (its config inside) and as an official zoo folder (``model.net.`` keys and a
    config.json)."""
    folder = tmp_path_factory.mktemp("ir18")
    model = kprpe.create_model("ir_18").eval()
    saved = kprpe.nn.save_model(model, folder / "saved" / "ir18.safetensors")
    official = folder / "zoo" / "model.safetensors"
    official.parent.mkdir()
    save_file({f"model.net.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(official))
    (official.parent / "config.json").write_text('{"color_space": "RGB"}')  # else a warning: RGB assumed
    return {"saved": saved, "zoo-folder": official.parent}


@pytest.mark.parametrize("which", ["kprpe", "vit", "swin", "ir18-saved", "ir18-zoo-folder"])
def test_header_count_equals_the_built_models(which, iresnet_files):
    path = {"kprpe": TINY_KPRPE, "vit": TINY_VIT, "swin": SWIN, "ir18-saved": iresnet_files["saved"],
            "ir18-zoo-folder": iresnet_files["zoo-folder"] / "model.safetensors"}[which]
    assert header_parameter_count(path) == _module_count(path)


def test_files_the_header_cannot_tell_about_answer_none(tmp_path):
    pt = tmp_path / "tiny.pt"
    torch.save(kprpe.nn.read_state_dict(TINY_KPRPE)[0], pt)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "unknown.safetensors"))
    for name in ("tiny.pt", "broken.safetensors", "unknown.safetensors", "missing.safetensors"):
        assert header_parameter_count(tmp_path / name) is None, name


@pytest.fixture
def loads(monkeypatch):
    """Counts model builds (kprpe.nn.load_official) and ONNX engine loads (kprpe.export.load_engine)."""
    counts = {"torch": 0, "onnx": 0}
    load = kprpe.nn.load_official

    def counting_load(*args, **kwargs):
        counts["torch"] += 1
        return load(*args, **kwargs)

    engine = kprpe.export.load_engine

    def counting_engine(*args, **kwargs):
        counts["onnx"] += 1
        return engine(*args, **kwargs)

    monkeypatch.setattr(kprpe.nn, "load_official", counting_load)
    monkeypatch.setattr(kprpe.export, "load_engine", counting_engine)
    return counts


def _verify(tmp_path, capsys, weights, run: str, *extra) -> dict:
    bin_path = tmp_path / "toy.bin"
    if not bin_path.exists():
        _make_bin(bin_path, n_pairs=10)
    argv = ["eval", "verify", "--weights", str(weights), "--bin", str(bin_path), "--keypoints", "template",
            "-o", str(tmp_path / run), "--cache-dir", str(tmp_path / "cache"), "--quiet", *extra]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    return json.loads((tmp_path / run / "results.json").read_text())


@pytest.mark.parametrize("which", ["kprpe", "swin", "ir18-zoo-folder"])
def test_a_cached_rerun_reports_the_count_without_building_the_model(which, tmp_path, capsys, loads,
                                                                      iresnet_files):
    weights = {"kprpe": TINY_KPRPE, "swin": SWIN, "ir18-zoo-folder": iresnet_files["zoo-folder"]}[which]
    first = _verify(tmp_path, capsys, weights, "first")
    assert loads["torch"] == 1 and first["sets"]["toy"]["embeddings_from_cache"] is False
    second = _verify(tmp_path, capsys, weights, "second")
    assert second["sets"]["toy"]["embeddings_from_cache"] is True
    assert loads["torch"] == 1  # the re-run built nothing
    path = weights / "model.safetensors" if weights.is_dir() else weights
    assert second["parameters"] == first["parameters"] == _module_count(path)


def test_a_pt_checkpoint_is_still_counted_on_the_model(tmp_path, capsys, loads):
    weights = tmp_path / "tiny.pt"
    torch.save(kprpe.nn.read_state_dict(shutil.copy(TINY_KPRPE, tmp_path / "t.safetensors"))[0], weights)
    _verify(tmp_path, capsys, weights, "first")
    second = _verify(tmp_path, capsys, weights, "second")
    assert second["sets"]["toy"]["embeddings_from_cache"] is True
    assert second["parameters"] == _module_count(TINY_KPRPE) and loads["torch"] == 2


def test_a_cached_onnx_rerun_loads_no_engine(tmp_path, capsys, loads):
    """The ONNX engine's count was and is unknown (None); the re-run loaded the engine only to say so."""
    pytest.importorskip("onnxruntime")
    from kprpe.export import export_onnx

    weights = tmp_path / "tiny.onnx"
    export_onnx(TINY_KPRPE, weights, check=False)
    first = _verify(tmp_path, capsys, weights, "first", "--engine", "onnx")
    assert loads["onnx"] == 1
    second = _verify(tmp_path, capsys, weights, "second", "--engine", "onnx")
    assert second["sets"]["toy"]["embeddings_from_cache"] is True
    assert first["parameters"] is None and second["parameters"] is None and loads["onnx"] == 1
