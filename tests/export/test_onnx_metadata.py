"""ONNX files kprpe did not write, or whose metadata was edited: one OnnxModelError naming the problem, and
a third-party image-only graph embeds with flip TTA; ``export -o`` onto a folder is one line (issue 32
item 10)."""

from __future__ import annotations

import numpy as np
import pytest

from kprpe.cli import main
from reference_vectors import DATA

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from kprpe.export import OnnxEngine, OnnxModelError  # noqa: E402
from kprpe.face.embedder import FaceEmbedder  # noqa: E402

DIM = 8


def _graph_file(path, *, metadata: dict | None = None, rank1: bool = False):
    """A small image-only graph, as another tool would export it: images (N, 3, 112, 112) -> mean colour ->
    a fixed linear map -> embedding (N, 8); ``rank1``: an embedding of shape (N,) instead."""
    weight = np.random.default_rng(0).normal(size=(3, DIM)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["wide"]),
    ]
    if rank1:
        nodes.append(helper.make_node("ReduceMean", ["wide"], ["embedding"], axes=[1], keepdims=0))
        out_shape = ["N"]
    else:
        nodes.append(helper.make_node("Identity", ["wide"], ["embedding"]))
        out_shape = ["N", DIM]
    graph = helper.make_graph(
        nodes,
        "third_party",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def test_third_party_image_only_graph_embeds_with_flip(tmp_path):
    """No kprpe metadata, no keypoints: flip TTA used to fail asking for a permutation of 0 points."""
    embedder = FaceEmbedder(OnnxEngine(_graph_file(tmp_path / "other.onnx")), flip=True)
    crops = np.random.default_rng(1).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    keypoints = np.full((3, embedder.num_keypoints, 2), 0.5, np.float32)
    unit, norms = embedder.embed_crops(crops, keypoints)
    assert unit.shape == (3, DIM) and np.isfinite(unit).all() and (norms > 0).all()
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)  # float32 normalisation


@pytest.mark.parametrize(
    "metadata,message",
    [
        ({"kprpe_config": "[1, 2]"}, "kprpe_config is a JSON list"),
        ({"kprpe_config": "{not json"}, "kprpe_config is not JSON"),
        ({"kprpe_config": '{"num_keypoints": "five"}'}, "num_keypoints must be a whole number"),
        ({"kprpe_config": '{"rel_pos": 3}'}, "rel_pos must be text"),
    ],
)
def test_bad_kprpe_metadata_is_a_model_error(tmp_path, metadata, message):
    with pytest.raises(OnnxModelError, match=message):
        OnnxEngine(_graph_file(tmp_path / "m.onnx", metadata=metadata))


def test_unprefixed_metadata_is_not_read(tmp_path):
    """A 'config' key of another tool is not kprpe's: it used to send the engine after 'kprpe_config'."""
    engine = OnnxEngine(_graph_file(tmp_path / "m.onnx", metadata={"config": '{"rel_pos": 3}'}))
    assert engine.config.output_dim == DIM and engine.config.rel_pos == "none"


def test_rank1_embedding_is_a_model_error(tmp_path):
    with pytest.raises(OnnxModelError, match=r"output 'embedding' must be \(B, D\)"):
        OnnxEngine(_graph_file(tmp_path / "m.onnx", rank1=True))


@pytest.mark.parametrize("taken", ["model.onnx", "model.onnx.json"])
def test_export_onto_a_folder_is_one_line_before_any_work(tmp_path, capsys, taken):
    (tmp_path / taken).mkdir()
    code = main(
        ["export", str(DATA / "tiny_kprpe.safetensors"), "-o", str(tmp_path / "model.onnx"), "--no-check"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "is a folder" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [taken]
