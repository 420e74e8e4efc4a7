"""ONNX export and the ONNX Runtime engine: parity with PyTorch and the official vectors, metadata, bad
input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kprpe
from kprpe.cli import main
from reference_vectors import DATA, load_vectors

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from kprpe.export import (  # noqa: E402
    OnnxEngine,
    OnnxInputError,
    OnnxModelError,
    export_onnx,
    load_engine,
    sidecar_path,
)
from kprpe.export.onnx import EXPORT_BATCH  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)


def _reference_model(name: str):
    overrides = {"num_heads": 4} if name == "vit" else {}
    return kprpe.load_official(DATA / f"tiny_{name}.safetensors", **overrides)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The three reference models exported once: name -> path."""
    folder = tmp_path_factory.mktemp("onnx")
    paths = {}
    for name in ("kprpe", "irpe", "vit"):
        paths[name] = folder / f"tiny_{name}.onnx"
        export_onnx(_reference_model(name), paths[name], check=False)
    return paths


@pytest.mark.parametrize("name", ["kprpe", "irpe", "vit"])
def test_onnxruntime_matches_official_vectors_at_another_batch_size(exported, name):
    ref = load_vectors(name)
    assert ref["images"].shape[0] != EXPORT_BATCH  # the graph runs at a batch size it was not traced at
    engine = load_engine(exported[name])
    keypoints = ref["keypoints"] if name == "kprpe" else None
    got = engine(ref["images"], keypoints)
    torch.testing.assert_close(got, ref["output"], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(got, _reference_model(name)(ref["images"], keypoints), **TOL)
    single = engine(ref["images"][1:2], None if keypoints is None else keypoints[1:2])  # batch 1 as well
    torch.testing.assert_close(single, ref["output"][1:2], **TOL)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(kp_input="absolute"),
        dict(kp_sharing="head"),
        dict(kp_sharing="shared"),
        dict(kp_sharing="layer"),
        dict(kp_hidden=16),
        dict(kp_hidden=16, kp_mlp="relu_layernorm", kp_sharing="layer"),
        dict(kp_input="absolute", kp_sharing="shared", kp_hidden=8),
        dict(kp_input="query_position"),
        dict(num_keypoints=3),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_every_kprpe_variant_exports_with_parity(tmp_path, overrides):
    torch.manual_seed(0)
    model = kprpe.create_model("vit_tiny_kprpe", img_size=32, **overrides).eval()
    with torch.no_grad():  # f starts at zero; give the bias something to do
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, check=False)
    engine = OnnxEngine(path)
    assert engine.uses_keypoints == model.uses_keypoints
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    keypoints = torch.rand(5, model.config.num_keypoints, 2) * 1.2 - 0.1
    kp = keypoints if model.uses_keypoints else None
    with torch.no_grad():
        expected = model(images, kp)
    torch.testing.assert_close(engine(images, kp), expected, **TOL)


def test_metadata_sidecar_and_graph(exported):
    path = exported["kprpe"]
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["kprpe_version"] == kprpe.__version__
    config = json.loads(meta["kprpe_config"])
    assert config["rel_pos"] == "kprpe" and config["depth"] == 2 and config["num_heads"] == 4
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}  # no custom operators
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
    }
    assert inputs == {"images": ["batch", 3, 112, 112], "keypoints": ["batch", 5, 2]}
    assert [o.name for o in proto.graph.output] == ["embedding"]
    # the (N, N) bucket index is a constant of the graph, not computed from anything at run time
    ids = load_vectors("kprpe")["bucket_ids"].numpy()
    constants = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer]
    constants += [
        onnx.numpy_helper.to_array(a.t)
        for n in proto.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    ]
    assert any(c.shape == ids.shape and np.array_equal(c, ids) for c in constants)
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["inputs"]["keypoints"]["shape"] == ["batch", 5, 2]
    assert sidecar["inputs"]["images"]["range"] == [-1.0, 1.0]
    assert sidecar["outputs"]["embedding"]["shape"] == ["batch", 32]
    assert sidecar["config"] == config and sidecar["opset"] >= 17


def test_export_cli_records_parity_and_fp16(tmp_path, capsys):
    out = tmp_path / "vit.onnx"
    assert main(["export", str(DATA / "tiny_vit.safetensors"), "-o", str(out), "--set", "num_heads=4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["inputs"] == ["images"] and summary["parity"]["batch"] != EXPORT_BATCH
    assert summary["parity"]["max_abs_diff"] < 1e-4
    half = tmp_path / "kprpe16.onnx"
    assert (
        main(["export", str(DATA / "tiny_kprpe.safetensors"), "-o", str(half), "--fp16", "--no-check"]) == 0
    )
    capsys.readouterr()
    engine = OnnxEngine(half)
    assert engine.precision == "float16"
    ref = load_vectors("kprpe")
    got = engine(ref["images"], ref["keypoints"])
    assert got.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(got, ref["output"])
    assert cosine.min() > 0.999


def test_bad_files_and_inputs_are_clear_errors(exported, tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(OnnxModelError, match="junk.onnx is not a loadable ONNX model"):
        OnnxEngine(junk)
    with pytest.raises(OnnxModelError, match="not found"):
        OnnxEngine(tmp_path / "missing.onnx")
    # a valid ONNX file without the expected inputs
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(other))
    with pytest.raises(OnnxModelError, match=r"expected an input 'images'.*inputs x\[1, 4\]"):
        OnnxEngine(other)

    vit, kp_model = OnnxEngine(exported["vit"]), OnnxEngine(exported["kprpe"])
    images, keypoints = torch.zeros(2, 3, 112, 112), torch.full((2, 5, 2), 0.5)
    with pytest.raises(OnnxInputError, match="takes no keypoints"):
        vit(images, keypoints)
    with pytest.raises(OnnxInputError, match="needs keypoints"):
        kp_model(images)
    with pytest.raises(
        OnnxInputError, match=r"images must have shape \(B, 3, 112, 112\).*\(2, 1, 112, 112\)"
    ):
        vit(torch.zeros(2, 1, 112, 112))
    with pytest.raises(OnnxInputError, match=r"keypoints must have shape \(2, 5, 2\).*\(3, 5, 2\)"):
        kp_model(images, torch.full((3, 5, 2), 0.5))
    with pytest.raises(OnnxInputError, match="NaN"):
        kp_model(images, torch.full((2, 5, 2), float("nan")))

    # the CLI: one line, exit 2, no traceback
    assert main(["export", "no_such_model_or_file", "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "kprpe export: error:" in err and "no_such_model_or_file" in err and "Traceback" not in err
    assert main(["export", "vit_tiny", "-o", str(tmp_path / "x.txt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
